"""Shared fixtures of the kernel tests: the kernel variants (isa) this CPU can run."""

from __future__ import annotations

import pytest

import lpipes

ISAS = ("scalar", "avx2", "avx512")


def isa_available(isa: str) -> bool:
    """Whether this CPU (and build) can run kernel variant ``isa``, from lpipes.cpu_features()."""
    f = lpipes.cpu_features()
    if isa == "scalar":
        return True
    if f["arch"] != "x86_64":
        return False
    if isa == "avx2":
        return bool(f["avx2"] and f["fma"] and f["f16c"])
    if isa == "avx512":
        return bool(f["avx512f"] and f["avx512bw"] and f["avx512vl"] and f["fma"] and f["f16c"])
    raise ValueError(isa)


def _isa_params():
    return [
        pytest.param(
            i, marks=pytest.mark.skipif(not isa_available(i), reason=f"this CPU cannot run the {i} kernels")
        )
        for i in ISAS
    ]


@pytest.fixture(params=_isa_params())
def isa(request: pytest.FixtureRequest) -> str:
    """Each kernel variant in turn (scalar twin, AVX2, AVX-512), skipped where the CPU lacks it."""
    return request.param


@pytest.fixture(params=_isa_params()[1:])
def simd_isa(request: pytest.FixtureRequest) -> str:
    """Each SIMD variant in turn (compared against the scalar twin)."""
    return request.param


@pytest.fixture
def unavailable_isa() -> str:
    """A kernel variant this CPU cannot run (skips where it runs them all)."""
    missing = [i for i in ISAS if not isa_available(i)]
    if not missing:
        pytest.skip("this CPU runs every kernel variant")
    return missing[0]
