"""Micro-benchmark of the lpipes CPU kernels (csrc/kernels) against the machine and torch.

Measures, each with warmup and the median of repeats:

* ``read_memory`` bandwidth (GB/s) over a 1 GiB buffer: the machine's achievable read bandwidth;
* ``linear_f16`` GEMV (M = 1) on the Qwen3-0.6B shapes, as weight GB/s and as a % of that bandwidth.
  Weights are rotated over enough copies to exceed the last-level cache, as in a real decode step
  where every layer's weights come from DRAM ("cold"); the single-copy, cache-resident rate is also
  shown ("hot");
* small-M ``linear_f16`` GEMM (prefill chunks) GFLOP/s against torch fp32 ``x @ w32.T`` (w32 converted
  beforehand, not timed) and torch fp16 ``x.half() @ w.T``.

Prints a table and the ratios, and writes bench/results/kernels.json with the git commit and
``lpipes.cpu_features()``.

    python bench/kernels.py                  # all
    python bench/kernels.py --repeats 20 --skip-gemm
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import time
from pathlib import Path

import torch

import lpipes
from lpipes import kernels

# (name, K, N): decode shapes of a Qwen3-0.6B layer (hidden 1024, MLP 3072) and its LM head.
GEMV_SHAPES = [
    ("mlp_up   K=1024 N=3072", 1024, 3072),
    ("mlp_down K=3072 N=1024", 3072, 1024),
    ("lm_head  K=1024 N=151936", 1024, 151936),
]
GEMM_MS = [16, 128, 512]
# Weights are rotated over copies totalling at least this many bytes (the L3 here is 32 MiB).
COLD_BYTES = 512 << 20
# Pause between torch and lpipes timings, so the other library's spinning workers have gone to sleep.
SETTLE_S = 0.05


def median_time(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def bench_read_memory(args) -> float:
    nbytes = args.read_gib << 30
    buf = torch.ones(nbytes, dtype=torch.uint8)
    dt = median_time(lambda: kernels.read_memory(buf, isa=args.isa), args.warmup, args.repeats)
    return nbytes / dt / 1e9


def call_overheads(args) -> tuple[float, float]:
    """Seconds per call of kernels.linear and kernels.read_memory on tiny inputs (Python + binding cost)."""
    x, w, out = torch.randn(1, 16), torch.randn(16, 16).half(), torch.empty(1, 16)
    # The fastest of several medians: a fixed cost, so interference only ever adds to it.
    lin = min(median_time(lambda: kernels.linear(x, w, out=out, isa=args.isa), 200, 2000) for _ in range(5))
    rd = min(median_time(lambda: kernels.read_memory(w, isa=args.isa), 200, 2000) for _ in range(5))
    return lin, rd


def bench_gemv(args, name: str, K: int, N: int, bandwidth: float, overheads: tuple[float, float]) -> dict:
    wbytes = N * K * 2
    copies = max(1, math.ceil(COLD_BYTES / wbytes))
    gen = torch.Generator().manual_seed(0)
    ws = [(torch.randn(N, K, generator=gen) * 0.05).half() for _ in range(copies)]
    x = torch.randn(1, K, generator=gen)
    out = torch.empty(1, N)

    def run_cold():
        for w in ws:
            kernels.linear(x, w, out=out, isa=args.isa)

    def run_read():
        for w in ws:
            kernels.read_memory(w, isa=args.isa)

    # Memory bandwidth drifts on a shared machine: pair every GEMV pass with a read_memory pass over
    # the same bytes and report the median of the ratios as well as the median times.
    for _ in range(args.warmup):
        run_read()
        run_cold()
    t_gemv, t_read, ratios = [], [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run_read()
        t1 = time.perf_counter()
        run_cold()
        t2 = time.perf_counter()
        t_read.append(t1 - t0)
        t_gemv.append(t2 - t1)
        ratios.append((t1 - t0) / (t2 - t1))
    cold = statistics.median(t_gemv) / copies
    read = statistics.median(t_read) / copies
    # The native executor calls the kernel from C++; without the Python call overhead:
    kernel_ratio = statistics.median(
        [(r / copies - overheads[1]) / (g / copies - overheads[0]) for r, g in zip(t_read, t_gemv)]
    )
    hot_reps = max(args.repeats, int(0.2 / max(cold, 1e-6)))
    hot = median_time(lambda: kernels.linear(x, ws[0], out=out, isa=args.isa), args.warmup * 4, hot_reps)
    return {
        "shape": name,
        "K": K,
        "N": N,
        "weight_bytes": wbytes,
        "copies": copies,
        "cold_us": cold * 1e6,
        "cold_gbs": wbytes / cold / 1e9,
        "paired_read_gbs": wbytes / read / 1e9,
        "pct_of_paired_read": 100.0 * statistics.median(ratios),
        "pct_of_paired_read_kernel_only": 100.0 * kernel_ratio,
        "pct_of_read_bw": 100.0 * wbytes / cold / 1e9 / bandwidth,
        "hot_us": hot * 1e6,
        "hot_gbs": wbytes / hot / 1e9,
    }


def timed(fn, n: int) -> float:
    """Seconds per call of fn, over n back-to-back calls."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def bench_gemm(args, name: str, K: int, N: int, M: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    w = (torch.randn(N, K, generator=gen) * 0.05).half()
    w32 = w.float()
    x = torch.randn(M, K, generator=gen)
    out = torch.empty(M, N)
    flop = 2.0 * M * N * K
    fns = {
        "lpipes": lambda: kernels.linear(x, w, out=out, isa=args.isa),
        "torch_fp32": lambda: x @ w32.T,
    }
    if not args.skip_torch_fp16:
        fns["torch_fp16"] = lambda: x.half() @ w.T
    # Alternate the contenders within every repeat (and let the other library's spinning workers go to
    # sleep in between), so drifting machine load hits them alike; each sample lasts >= ~20 ms.
    calls = {}
    for k, fn in fns.items():
        fn()
        calls[k] = max(1, int(0.02 / timed(fn, 1)))
        time.sleep(SETTLE_S)
    times = {k: [] for k in fns}
    for rep in range(args.gemm_repeats):
        for k, fn in fns.items():
            if k == "torch_fp16" and rep >= max(1, args.gemm_repeats // 3):
                continue  # slow; fewer samples
            times[k].append(timed(fn, calls[k]))
            time.sleep(SETTLE_S)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio32 = statistics.median([t32 / tlp for tlp, t32 in zip(times["lpipes"], times["torch_fp32"])])
    row = {
        "shape": name,
        "M": M,
        "K": K,
        "N": N,
        "lpipes_gflops": flop / med["lpipes"] / 1e9,
        "torch_fp32_gflops": flop / med["torch_fp32"] / 1e9,
        "torch_fp16_gflops": flop / med["torch_fp16"] / 1e9 if "torch_fp16" in med else None,
        "speedup_vs_torch_fp32": ratio32,
        "speedup_vs_torch_fp16": med["torch_fp16"] / med["lpipes"] if "torch_fp16" in med else None,
    }
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--isa", default="auto", help="kernel variant: auto|scalar|avx2|avx512 (default auto)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15, help="repeats for bandwidth and GEMV timings")
    p.add_argument("--gemm-repeats", type=int, default=7)
    p.add_argument("--read-gib", type=int, default=1, help="read_memory buffer size in GiB")
    p.add_argument("--threads", type=int, default=0, help="lpipes and torch threads (0: leave as is)")
    p.add_argument("--skip-gemv", action="store_true")
    p.add_argument("--skip-gemm", action="store_true")
    p.add_argument(
        "--skip-torch-fp16", action="store_true", help="torch fp16 matmul is slow on CPUs without it"
    )
    p.add_argument("--gemm-lm-head", action="store_true", help="also time the LM-head shape as a GEMM (slow)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "kernels.json"))
    args = p.parse_args()

    from lpipes import _C

    if args.threads > 0:
        _C.set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    isa = kernels.resolve_isa(args.isa)
    feats = lpipes.cpu_features()
    print(f"lpipes kernels: isa={isa}, threads={_C.num_threads()}, torch threads={torch.get_num_threads()}")

    bandwidth = bench_read_memory(args)
    print(f"\nread_memory ({args.read_gib} GiB): {bandwidth:.1f} GB/s")

    gemv_rows = []
    overheads = (0.0, 0.0)
    if not args.skip_gemv:
        overheads = call_overheads(args)
        print(
            f"\ncall overhead (Python + binding, tiny input): linear {overheads[0] * 1e6:.1f} us, "
            f"read_memory {overheads[1] * 1e6:.1f} us"
        )
        print(
            "GEMV (linear_f16, M=1): weight bytes / time. cold = weights from DRAM (rotated copies), "
            "%bw = vs the 1 GiB read_memory rate,\n%pair = vs read_memory over the same weights, run "
            "alternately (median ratio), %kern = the same without the call overheads; hot = one "
            "cache-resident copy"
        )
        print(
            f"{'shape':<26}{'cold us':>10}{'GB/s':>8}{'%bw':>8}{'pair GB/s':>11}{'%pair':>8}{'%kern':>8}"
            f"{'hot us':>9}{'hot GB/s':>10}"
        )
        for name, K, N in GEMV_SHAPES:
            r = bench_gemv(args, name, K, N, bandwidth, overheads)
            gemv_rows.append(r)
            print(
                f"{name:<26}{r['cold_us']:>10.1f}{r['cold_gbs']:>8.1f}{r['pct_of_read_bw']:>7.1f}%"
                f"{r['paired_read_gbs']:>11.1f}{r['pct_of_paired_read']:>7.1f}%"
                f"{r['pct_of_paired_read_kernel_only']:>7.1f}%{r['hot_us']:>9.1f}{r['hot_gbs']:>10.1f}"
            )
        total_bytes = sum(r["weight_bytes"] for r in gemv_rows)
        total_time = sum(r["cold_us"] for r in gemv_rows) * 1e-6
        print(
            f"{'all three (bytes-weighted)':<26}{'':>10}{total_bytes / total_time / 1e9:>8.1f}"
            f"{100 * total_bytes / total_time / 1e9 / bandwidth:>7.1f}%"
        )

    gemm_rows = []
    if not args.skip_gemm:
        shapes = GEMV_SHAPES if args.gemm_lm_head else GEMV_SHAPES[:2]
        print(
            "\nGEMM (linear_f16, fp16 W, fp32 x) GFLOP/s (median) vs torch fp32 x @ w32.T and fp16 "
            "x.half() @ w.T;\nvs fp32 = median of the paired (alternating) time ratios"
        )
        print(f"{'shape':<26}{'M':>5}{'lpipes':>9}{'t fp32':>9}{'t fp16':>9}{'vs fp32':>9}{'vs fp16':>9}")
        for name, K, N in shapes:
            for M in GEMM_MS:
                r = bench_gemm(args, name, K, N, M)
                gemm_rows.append(r)
                f16 = r["torch_fp16_gflops"]
                s16 = r["speedup_vs_torch_fp16"]
                print(
                    f"{name:<26}{M:>5}{r['lpipes_gflops']:>9.1f}{r['torch_fp32_gflops']:>9.1f}"
                    f"{(f16 or float('nan')):>9.1f}{r['speedup_vs_torch_fp32']:>8.2f}x"
                    f"{(s16 or float('nan')):>8.2f}x"
                )

    result = {
        "benchmark": "kernels",
        "git_commit": git_commit(),
        "cpu_features": feats,
        "isa": isa,
        "threads": _C.num_threads(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "read_bandwidth_gbs": bandwidth,
        "call_overhead_us": {"linear": overheads[0] * 1e6, "read_memory": overheads[1] * 1e6},
        "gemv": gemv_rows,
        "gemm": gemm_rows,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
