"""lpipes: peer-to-peer distributed inference for open-weight language models.

The package is importable without its heavy dependencies loaded: submodules
(`lpipes.models`, `lpipes.runtime`, `lpipes.generation`, `lpipes.cli`) import
torch and transformers only when used.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from lpipes.errors import LpipesError

try:
    __version__ = version("lpipes")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"


def cpu_features() -> dict[str, object]:
    """Report the SIMD features of this CPU and the kernel variant lpipes will use.

    Returns a dict with boolean keys ``avx512f``, ``avx512bw``, ``avx512vl``,
    ``avx512_fp16``, ``avx2``, ``fma``, ``f16c``, ``neon`` and the strings ``arch``
    and ``best_isa`` (``"avx512"``, ``"avx2"``, ``"neon"`` or ``"scalar"``).
    """
    from lpipes import _C

    return _C.cpu_features()


__all__ = ["LpipesError", "__version__", "cpu_features"]
