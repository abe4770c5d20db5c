"""Decode speed of lpipes' executors against transformers, and against the memory-bandwidth limit.

Builds (once, seeded, under bench/.cache — never committed) a random-weight fp16 checkpoint
with the Qwen3-0.6B shape, then measures in one run:

* the machine's memory read bandwidth (lpipes' multi-threaded SIMD reader over 1 GiB);
* decode tokens/s (64 greedy tokens after a 20-token prompt, EOS ignored) and the time to
  first token of a 512-token prompt, for: lpipes native fp16, lpipes reference fp16 and fp32,
  transformers ``generate`` fp16 and fp32.

Decode tok/s is (tokens - 1) / (time of last token - time of first token), so prefill is
excluded. "% of limit" is weight bytes read per token × tok/s ÷ measured bandwidth: 100 %
means every weight byte is streamed once per token at full memory speed. Ratios are to
transformers fp16 in the same run (absolute numbers on shared machines are noisy).

    python bench/decode.py                 # everything
    python bench/decode.py --only native,hf-fp16 --tokens 32
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
QWEN3_06B = dict(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=0,
)
RUNS = ("native", "ref-fp16", "ref-fp32", "hf-fp16", "hf-fp32")


def build_checkpoint(path: Path, seed: int) -> Path:
    """A Qwen3-0.6B-shaped fp16 checkpoint with random weights (std 0.02) and the offline tiny tokenizer."""
    import transformers

    from lpipes.models.tiny import build_tokenizer

    if (path / "config.json").is_file():
        return path
    print(f"building the Qwen3-0.6B-shaped random checkpoint in {path} ...", file=sys.stderr)
    torch.manual_seed(seed)
    config = transformers.Qwen3Config(**QWEN3_06B)
    model = transformers.Qwen3ForCausalLM(config).to(torch.float16)
    model.save_pretrained(path, max_shard_size="400MB")
    build_tokenizer().save_pretrained(path)
    del model
    gc.collect()
    return path


def memory_bandwidth(repeats: int = 7) -> float:
    """Bytes/s read by lpipes' multi-threaded SIMD reader over a 1 GiB buffer (median of `repeats`:
    on a shared VM the best single pass can be an outlier far above what a model run ever sees)."""
    from lpipes import _C

    buf = torch.ones(1 << 30, dtype=torch.uint8)
    _C.read_memory(buf)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _C.read_memory(buf)
        rates.append(buf.numel() / (time.perf_counter() - t0))
    return statistics.median(rates)


def weight_bytes_per_token(path: Path) -> int:
    """Bytes of every weight read once per decode token: all layers plus the LM head (fp16)."""
    c = QWEN3_06B
    h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    per_layer = h * (heads + 2 * kv) * d + heads * d * h + 3 * h * i + 2 * h + 2 * d
    return 2 * (c["num_hidden_layers"] * per_layer + c["vocab_size"] * h + h)


def prompt_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 500, (n,), generator=g).tolist()


def time_lpipes(
    path: Path, executor: str, dtype: str, prompt: list[int], long_prompt: list[int], tokens: int
) -> dict:
    from lpipes.generation.loop import GenerationRequest
    from lpipes.generation.sampling import SamplingParams
    from lpipes.runtime.local import build_local_generator

    gen = build_local_generator(path, dtype=dtype, executor=executor)
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    gen.generate_text(prompt[:4], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    stamps, out = [], []
    for ev in gen.generate([GenerationRequest(prompt, params)]):
        stamps.append(time.perf_counter())
        out.append(ev.token)
    t0 = time.perf_counter()
    next(iter(gen.generate([GenerationRequest(long_prompt, SamplingParams(max_tokens=1, ignore_eos=True))])))
    ttft = time.perf_counter() - t0
    return {"tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "ttft_512_s": ttft, "tokens": out}


def time_hf(path: Path, dtype: str, prompt: list[int], long_prompt: list[int], tokens: int) -> dict:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = None
    stamps: list[float] = []

    class Stamp(transformers.generation.streamers.BaseStreamer):
        def put(self, value):  # called with the prompt first, then each new token
            stamps.append(time.perf_counter())

        def end(self):
            pass

    ids = torch.tensor([prompt])
    with torch.inference_mode():
        model.generate(ids[:, :4], max_new_tokens=2, do_sample=False)  # warm-up
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, streamer=Stamp())
        t0 = time.perf_counter()
        model.generate(torch.tensor([long_prompt]), max_new_tokens=1, do_sample=False)
        ttft = time.perf_counter() - t0
    new = stamps[1:]  # drop the prompt callback
    return {
        "tok_s": (len(new) - 1) / (new[-1] - new[0]),
        "ttft_512_s": ttft,
        "tokens": out[0, len(prompt) :].tolist(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens to decode (default 64)")
    ap.add_argument("--prompt-tokens", type=int, default=20)
    ap.add_argument("--long-prompt-tokens", type=int, default=512)
    ap.add_argument("--only", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=HERE / ".cache" / "qwen3-0.6b-shape")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "decode.json")
    args = ap.parse_args()
    runs = [r.strip() for r in args.only.split(",") if r.strip()]
    unknown = set(runs) - set(RUNS)
    if unknown:
        ap.error(f"unknown runs {sorted(unknown)}; choose from {','.join(RUNS)}")

    import lpipes

    path = build_checkpoint(args.cache, args.seed)
    prompt = prompt_ids(args.prompt_tokens, args.seed)
    long_prompt = prompt_ids(args.long_prompt_tokens, args.seed + 1)
    bandwidth = memory_bandwidth()
    per_token = weight_bytes_per_token(path)
    limit = bandwidth / per_token
    results: dict[str, dict] = {}
    for run in runs:
        print(f"running {run} ...", file=sys.stderr)
        if run == "native":
            r = time_lpipes(path, "native", "float16", prompt, long_prompt, args.tokens)
        elif run.startswith("ref-"):
            r = time_lpipes(path, "reference", "float" + run[-2:], prompt, long_prompt, args.tokens)
        else:
            r = time_hf(path, "float" + run[-2:], prompt, long_prompt, args.tokens)
        results[run] = r
        gc.collect()

    base = results.get("hf-fp16", {}).get("tok_s")
    hf_ttfts = [results[r]["ttft_512_s"] for r in ("hf-fp16", "hf-fp32") if r in results]
    best_hf_ttft = min(hf_ttfts) if hf_ttfts else None
    machine = f"{platform.machine()} {os.cpu_count()} CPUs, isa={lpipes.cpu_features()['best_isa']}"
    print(
        f"\nmachine: {machine}; read bandwidth {bandwidth / 1e9:.1f} GB/s; weights read per token "
        f"{per_token / 1e9:.3f} GB; bandwidth limit {limit:.1f} tok/s"
    )
    header = ("run", "tok/s", "vs hf-fp16", "% of limit", "ttft 512 (s)", "vs best hf")
    print(f"{header[0]:<10} {header[1]:>8} {header[2]:>11} {header[3]:>11} {header[4]:>13} {header[5]:>11}")
    for run, r in results.items():
        ratio = f"{r['tok_s'] / base:.2f}x" if base else "-"
        ttft_ratio = f"{r['ttft_512_s'] / best_hf_ttft:.2f}x" if best_hf_ttft else "-"
        pct = 100 * r["tok_s"] / limit
        ttft = r["ttft_512_s"]
        print(f"{run:<10} {r['tok_s']:>8.2f} {ratio:>11} {pct:>10.1f}% {ttft:>13.3f} {ttft_ratio:>11}")
    if "native" in results and "ref-fp32" in results:
        same = results["native"]["tokens"] == results["ref-fp32"]["tokens"]
        print(f"native greedy tokens equal reference fp32: {same}")
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE)
        commit = git.stdout.strip()
    except OSError:
        commit = ""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": machine,
        "cpu_features": lpipes.cpu_features(),
        "commit": commit,
        "torch": torch.__version__,
        "bandwidth_bytes_s": bandwidth,
        "weight_bytes_per_token": per_token,
        "limit_tok_s": limit,
        "results": {k: {kk: vv for kk, vv in v.items() if kk != "tokens"} for k, v in results.items()},
    }
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
