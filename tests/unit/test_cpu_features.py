"""The native extension builds, imports without torch, and reports CPU features consistently."""

from __future__ import annotations

import platform
import subprocess
import sys

import lpipes
from lpipes import _C

BOOL_KEYS = ("avx512f", "avx512bw", "avx512vl", "avx512_fp16", "avx2", "fma", "f16c", "neon")


def test_report_shape():
    feats = lpipes.cpu_features()
    assert set(feats) == {*BOOL_KEYS, "arch", "best_isa"}
    assert all(isinstance(feats[k], bool) for k in BOOL_KEYS)
    assert feats["best_isa"] in {"avx512", "avx2", "neon", "scalar"}
    assert feats == _C.cpu_features()


def test_consistent_with_kernel_choice():
    f = lpipes.cpu_features()
    if f["best_isa"] == "avx512":
        assert f["avx512f"] and f["avx512bw"] and f["avx512vl"] and f["f16c"] and f["fma"]
    if f["best_isa"] == "avx2":
        assert f["avx2"] and f["fma"] and f["f16c"]
    if f["avx512bw"] or f["avx512vl"]:
        assert f["avx512f"]


def test_matches_linux_cpuinfo():
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return
    flags = set()
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    f = lpipes.cpu_features()
    assert f["arch"] == "x86_64"
    # The kernel lists a flag only when the OS also enables its state, as our check requires.
    for ours, theirs in [
        ("avx2", "avx2"),
        ("fma", "fma"),
        ("f16c", "f16c"),
        ("avx512f", "avx512f"),
        ("avx512bw", "avx512bw"),
    ]:
        assert f[ours] == (theirs in flags), ours


def test_extension_does_not_import_torch():
    code = "import sys, lpipes; lpipes.cpu_features(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
