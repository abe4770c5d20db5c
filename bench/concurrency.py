"""Aggregate decode throughput and time to first token under 1, 2, 4, 8 and 16 concurrent streams.

Target (printed, not asserted): on one node and on 3 processes on 127.0.0.1, 8 concurrent streams
decode at >= 5x the aggregate tok/s of one stream; also report the time to first token under load.

Model: the seeded random-weight fp16 Qwen3-0.6B-shaped checkpoint of ``pipeline.py`` (28 layers, hidden
1024, vocabulary 151936 with the padded tiny tokenizer, tied embeddings; ``--quick``: 8 layers,
``--layers`` sets it), built once with ``pipeline.build_checkpoint`` and shared with ``pipeline.py``'s
cache (``$LPIPES_CACHE/bench``, else ``~/.cache/lpipes/bench``).

Configurations, started with ``pipeline.Cluster`` as real ``python -m lpipes.cli.main serve`` processes
(API on a free TCP port, QUIC on free UDP ports, all on 127.0.0.1, ``dtype = "float16"``), all up at
once and measured in interleaved rounds:

* ``1 proc``: one origin holding every layer, no ``[network]`` table (no QUIC);
* ``3 procs``: origin + two layer peers, the layers split as evenly as rounding allows
  (``pipeline.spans``: [0, 9) [9, 19) [19, 28)).

The origin's engine steps every admitted sequence in one batched forward pass (continuous batching);
``[api] max_batch_size`` (the server default, 16, which ``pipeline.Cluster`` leaves as is; it is read
back from the origin's config and must be >= the largest ``--streams``) lets every stream batch together.

Method. Per configuration one warm-up request (one ``/v1/completions`` request with all the prompts,
4 tokens each: the widest batch runs once). Then ``--repeats`` rounds (default 3; quick 1); in each
round, for every C in ``--streams`` (default 1,2,4,8,16) and every configuration (the first one
rotating from round to round), C streaming requests are sent at once from one asyncio
``httpx.AsyncClient``: ``/v1/completions``, ``stream: true``, greedy ``temperature: 0``,
``ignore_eos: true``, ``max_tokens`` = N (``--tokens``, default 64; quick 24), request i with its own
prompt ``"request {i}: " + pipeline.PROMPT``. Every SSE chunk with a choice is one generated token
(one chunk per token, see docs/api.md) and is timestamped on arrival; each stream must deliver exactly
N tokens and end with ``finish_reason: "length"``.

Definitions, per burst of C streams (times on the client's monotonic clock):

* TTFT_i = arrival of stream i's first token - the moment its request was sent. Reported: the median
  over the C streams (p50) and the maximum, each as the median over the rounds. Under load it includes
  waiting for the batch step in progress and the prefills of the other streams admitted with it.
* Aggregate decode tok/s = (tokens of all streams that arrived strictly after t_all) / (t_end - t_all),
  where t_all = the last stream's first token (from then on every stream is admitted, prefilled and
  decoding) and t_end = the last token of any stream. Prefill and TTFT are left out; every token
  decoded once every stream has its first token is counted, so a server that serialised the streams
  would score no better than one stream. For C = 1 it is (N - 1) / (last token - first token).
* vs 1 stream: the ratio of the median aggregate tok/s to the median at C = 1 of the same configuration
  and thread count, in the same run. ms/step = 1000 C / aggregate tok/s: the time between one stream's
  tokens, i.e. one batched step.

Reported values are medians over the rounds. Correctness: greedy decoding of one prompt must give the
same text whatever it is batched with, so prompt i's completion must be identical in every round, every
C > i and every configuration; a mismatch is printed loudly (with the first differing character) and
makes the exit status 1. The kernels are batch invariant (``linear_f16`` sums every output in one
order for any batch, see docs/architecture.md), so a mismatch is a bug.
``lpipes_preemptions_total`` of each origin is read at the end (KV-pool
preemption would repeat prefills and distort the numbers). Every started process is killed by PID at
the end, also on errors (``pipeline.Cluster.stop``).

Threads: every process gets ``LPIPES_NUM_THREADS`` and ``OMP_NUM_THREADS`` = ``--threads`` (default 1;
a comma-separated list repeats everything per thread count), as in ``pipeline.py``. The client runs in
this process and competes for the same cores. Absolute numbers on a shared machine are noisy: run on an
otherwise idle machine (the 1-minute load average before and after is printed and stored). Writes JSON
with the machine description to ``bench/results/concurrency-<date>.json`` (or ``--json``).

    python bench/concurrency.py --quick                 # 8 layers, 24 tokens, 1 round: smoke run
    python bench/concurrency.py                         # 28 layers, 64 tokens, 3 rounds
    python bench/concurrency.py --procs 1 --streams 1,8 --repeats 5 --json /tmp/c.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pipeline  # noqa: E402 - the sibling benchmark's checkpoint and process helpers
from pipeline import QWEN3_06B, Cluster, ModelSpec  # noqa: E402

HERE = pipeline.HERE
WARMUP_TOKENS = 4
TARGET_STREAMS = 8
TARGET_RATIO = 5.0  # aggregate tok/s at TARGET_STREAMS vs one stream


def prompt(i: int) -> str:
    return f"request {i}: {pipeline.PROMPT}"


@dataclass
class Stream:
    sent: float
    times: list[float] = field(default_factory=list)  # arrival of each token's chunk
    text: str = ""
    finish_reason: str | None = None


async def stream_one(client: httpx.AsyncClient, model: str, i: int, max_tokens: int) -> Stream:
    """One streamed greedy completion of prompt ``i``; every chunk with a choice is one token."""
    body = {
        "model": model,
        "prompt": prompt(i),
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    s = Stream(sent=time.perf_counter())
    usage = None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"request {i}: HTTP {r.status_code}: {(await r.aread())[:500]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"request {i}: error event {event['error']}")
            if event.get("choices"):
                s.times.append(time.perf_counter())
                choice = event["choices"][0]
                s.text += choice.get("text") or ""
                s.finish_reason = choice.get("finish_reason") or s.finish_reason
            elif event.get("usage"):
                usage = event["usage"]
    if len(s.times) != max_tokens or s.finish_reason != "length":
        raise RuntimeError(
            f"request {i}: asked for {max_tokens} tokens, got {len(s.times)} chunks "
            f"(finish_reason {s.finish_reason!r}, usage {usage})"
        )
    if usage is None or usage["completion_tokens"] != max_tokens:
        raise RuntimeError(f"request {i}: usage {usage} does not count {max_tokens} tokens")
    return s


async def burst(client: httpx.AsyncClient, model: str, c: int, max_tokens: int) -> dict[str, Any]:
    """C streams at once; the aggregate decode tok/s and the TTFTs as defined in the module docstring."""
    streams = await asyncio.gather(*(stream_one(client, model, i, max_tokens) for i in range(c)))
    t_all = max(s.times[0] for s in streams)
    t_end = max(s.times[-1] for s in streams)
    decoded = sum(1 for s in streams for t in s.times if t > t_all)
    ttft = [(s.times[0] - s.sent) * 1000.0 for s in streams]
    return {
        "tok_s": decoded / (t_end - t_all) if t_end > t_all else float("nan"),
        "decode_tokens": decoded,
        "decode_window_s": t_end - t_all,
        "ttft_ms": ttft,
        "ttft_p50_ms": statistics.median(ttft),
        "ttft_max_ms": max(ttft),
        "first_token_spread_ms": (t_all - min(s.times[0] for s in streams)) * 1000.0,
        "texts": [s.text for s in streams],
    }


def preemptions(api: str) -> float | None:
    with contextlib.suppress(httpx.HTTPError):
        for line in httpx.get(f"http://{api}/metrics", timeout=10.0).text.splitlines():
            if line.startswith("lpipes_preemptions_total "):
                return float(line.split()[1])
    return None


async def measure(
    apis: dict[str, str], streams: list[int], tokens: int, repeats: int
) -> dict[str, dict[int, list[dict]]]:
    """Warm-up, then ``repeats`` interleaved rounds over every C and configuration."""
    limits = httpx.Limits(max_connections=max(streams) + 8, max_keepalive_connections=max(streams) + 8)
    runs: dict[str, dict[int, list[dict]]] = {k: {c: [] for c in streams} for k in apis}
    async with contextlib.AsyncExitStack() as stack:
        clients = {
            k: await stack.enter_async_context(
                httpx.AsyncClient(base_url=f"http://{a}", timeout=pipeline.REQUEST_TIMEOUT_S, limits=limits)
            )
            for k, a in apis.items()
        }
        names = {k: (await c.get("/v1/models")).json()["data"][0]["id"] for k, c in clients.items()}
        for k, c in clients.items():  # warm-up: the first route and the widest batch, once
            body = {
                "model": names[k],
                "prompt": [prompt(i) for i in range(max(streams))],
                "max_tokens": WARMUP_TOKENS,
                "temperature": 0,
                "ignore_eos": True,
            }
            (await c.post("/v1/completions", json=body)).raise_for_status()
        order = list(apis)
        for r in range(repeats):
            for c in streams:
                for k in order[r % len(order) :] + order[: r % len(order)]:
                    res = await burst(clients[k], names[k], c, tokens)
                    runs[k][c].append(res)
                    print(
                        f"  round {r + 1}/{repeats} {k:<12} C={c:<3} {res['tok_s']:8.1f} tok/s, TTFT p50 "
                        f"{res['ttft_p50_ms']:7.1f} ms, max {res['ttft_max_ms']:7.1f} ms",
                        file=sys.stderr,
                        flush=True,
                    )
    return runs


def run_threads(
    model: Path, spec: ModelSpec, procs: list[int], threads: int, streams: list[int], repeats: int
) -> tuple[dict[str, dict], dict[str, dict[int, list[dict]]]]:
    """Every configuration up at once, measured; all processes are killed at the end."""
    from lpipes.config import load_config

    info: dict[str, dict] = {}
    # Clusters stop (exit first) before the temporary folders holding their logs are removed.
    with contextlib.ExitStack() as stack, pipeline.stopped_at_exit({}) as clusters:
        for k in procs:
            key = f"{k} proc{'s' if k > 1 else ''}/{threads}t"
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"lpipes-bench-concurrency-{k}-"))
            cluster = clusters[key] = Cluster(Path(tmp), model, threads)
            print(f"{spec.name}: starting {k} process(es), {threads} thread(s) each ...", file=sys.stderr)
            t0 = time.monotonic()
            cluster.start(pipeline.spans(spec.layers, k))
            cluster.wait_ready()
            batch = load_config(cluster.procs[0].config).api.max_batch_size
            if batch < max(streams):
                raise RuntimeError(
                    f"the origin's [api] max_batch_size is {batch} < {max(streams)} streams: they would "
                    "not all batch together"
                )
            info[key] = {
                "procs": k,
                "threads": threads,
                "spans": [list(s) for s in pipeline.spans(spec.layers, k)],
                "max_batch_size": batch,
                "startup_s": time.monotonic() - t0,
            }
        runs = asyncio.run(measure({k: c.api for k, c in clusters.items()}, streams, spec.tokens, repeats))
        for k, c in clusters.items():
            info[k]["preemptions"] = preemptions(c.api)
    return info, runs


def check_texts(runs: dict[str, dict[int, list[dict]]]) -> tuple[list[str], dict[int, list[dict]]]:
    """Prompt i's completion must be the same in every configuration, C and round. Returns one message
    per prompt with more than one completion, and every prompt's distinct completions with the runs
    ("config C=c rR") that gave each, in order of first appearance."""
    variants: dict[int, list[dict]] = {}
    for key, by_c in runs.items():
        for c, rounds in by_c.items():
            for r, res in enumerate(rounds):
                for i, text in enumerate(res["texts"]):
                    seen = variants.setdefault(i, [])
                    match = next((v for v in seen if v["text"] == text), None)
                    if match is None:
                        match = {"text": text, "runs": []}
                        seen.append(match)
                    match["runs"].append(f"{key} C={c} r{r + 1}")
    problems: list[str] = []
    for i, seen in variants.items():
        if len(seen) < 2:
            continue
        ref = seen[0]["text"]
        lines = [f"prompt {i}: {len(seen)} different completions"]
        for n, v in enumerate(seen):
            text = v["text"]
            at = next((j for j, (a, b) in enumerate(zip(text, ref)) if a != b), min(len(text), len(ref)))
            diff = (
                "" if n == 0 else f", differs from A at character {at}: {text[max(0, at - 10) : at + 40]!r}"
            )
            lines.append(f"  {chr(65 + n)}: {', '.join(v['runs'])}{diff}")
        problems.append("\n".join(lines))
    return problems, variants


def report(info: dict[str, dict], runs: dict[str, dict[int, list[dict]]]) -> dict[str, dict]:
    """Prints the table and target lines; returns the per-configuration, per-C summary."""
    summary: dict[str, dict] = {}
    print(
        f"\n{'config':<12} {'streams':>7} {'agg tok/s':>9} {'min-max':>13} {'vs 1 stream':>11} "
        f"{'ms/step':>8} {'TTFT p50 ms':>11} {'TTFT max ms':>11}"
    )
    for key, by_c in runs.items():
        summary[key] = {}
        for c, rounds in by_c.items():
            rates = [r["tok_s"] for r in rounds]
            summary[key][c] = {
                "tok_s": statistics.median(rates),
                "tok_s_min": min(rates),
                "tok_s_max": max(rates),
                "ttft_p50_ms": statistics.median(r["ttft_p50_ms"] for r in rounds),
                "ttft_max_ms": statistics.median(r["ttft_max_ms"] for r in rounds),
            }
        base = summary[key].get(1)
        for c, s in summary[key].items():
            s["ratio_vs_1"] = s["tok_s"] / base["tok_s"] if base else None
            s["ms_per_step"] = 1000.0 * c / s["tok_s"]
            ratio = f"{s['ratio_vs_1']:.2f}x" if base else "-"
            spread = f"{s['tok_s_min']:.1f}-{s['tok_s_max']:.1f}"
            print(
                f"{key:<12} {c:>7} {s['tok_s']:>9.1f} {spread:>13} {ratio:>11} {s['ms_per_step']:>8.1f} "
                f"{s['ttft_p50_ms']:>11.1f} {s['ttft_max_ms']:>11.1f}"
            )
    print(
        "\nagg tok/s: tokens arriving after the last stream's first token / (last token - that moment), "
        "median over rounds;\nvs 1 stream: ratio to C = 1 of the same configuration in this run; ms/step "
        "= 1000 C / agg tok/s;\nTTFT: send -> first token per stream, p50 and max over the streams, median "
        "over rounds."
    )
    print(f"target: {TARGET_STREAMS} streams >= {TARGET_RATIO:g}x one stream")
    for key, by_c in summary.items():
        s = by_c.get(TARGET_STREAMS)
        if s is None or s["ratio_vs_1"] is None:
            print(f"  {key}: not measured (needs C = 1 and C = {TARGET_STREAMS} in --streams)")
            continue
        verdict = "PASS" if s["ratio_vs_1"] >= TARGET_RATIO else "FAIL"
        print(f"  {key}: {s['ratio_vs_1']:.2f}x  {verdict}")
    for key, i in info.items():
        if i.get("preemptions"):
            print(f"  note: {key} preempted {i['preemptions']:.0f} sequence(s) for KV space")
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 layers, 24 tokens, 1 round: a smoke run")
    ap.add_argument("--streams", default="1,2,4,8,16", help="comma-separated concurrency levels")
    ap.add_argument("--tokens", type=int, help="N, max_tokens of every stream (default 64; quick 24)")
    ap.add_argument("--repeats", type=int, help="rounds (default 3; quick 1)")
    ap.add_argument("--threads", default="1", help="comma-separated threads per process (default 1)")
    ap.add_argument("--procs", default="1,3", help="comma-separated process counts (default 1,3)")
    ap.add_argument("--layers", type=int, help="layers of the 0.6B-shaped model (default 28; quick 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, help="checkpoint directory of the 0.6B-shaped model")
    ap.add_argument("--json", type=Path, help="results file (default bench/results/concurrency-<date>.json)")
    args = ap.parse_args()
    tokens = args.tokens or (24 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 3)
    layers = args.layers or (8 if args.quick else 28)
    streams = sorted(set(pipeline.int_list(args.streams)))
    threads = pipeline.int_list(args.threads)
    procs = sorted(set(pipeline.int_list(args.procs)))
    if tokens < 2:
        ap.error("--tokens must be >= 2 (the first token is not a decode token)")
    if repeats < 1 or not streams or streams[0] < 1 or not threads or min(threads) < 1:
        ap.error("--repeats, --streams and --threads must be >= 1")
    if not procs or procs[0] < 1 or procs[-1] > layers:
        ap.error(f"--procs must be between 1 and the {layers} layers")
    from lpipes.config import ApiConfig

    if streams[-1] > ApiConfig().max_batch_size:  # pipeline.Cluster leaves [api] max_batch_size as is
        ap.error(
            f"--streams: at most [api] max_batch_size = {ApiConfig().max_batch_size} stream(s) batch together"
        )
    spec = ModelSpec("qwen3-0.6b", layers, QWEN3_06B, tokens)
    path = pipeline.build_checkpoint(spec, args.seed, args.cache)

    load_before = os.getloadavg()
    info: dict[str, dict] = {}
    runs: dict[str, dict[int, list[dict]]] = {}
    for t in threads:
        i, r = run_threads(path, spec, procs, t, streams, repeats)
        info.update(i)
        runs.update(r)
    load_after = os.getloadavg()

    desc = pipeline.machine()
    print(
        f"\nmachine: {desc['cpu']}, {desc['cores']} cores, isa={desc['isa']}; python {desc['python']}, "
        f"torch {desc['torch']}, qh3 {desc['qh3']}; {spec.name} {layers} layers, {tokens} tokens per stream, "
        f"{repeats} round(s); 1-min load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    summary = report(info, runs)
    problems, variants = check_texts(runs)
    for msg in problems:
        print(f"\n!!! OUTPUT MISMATCH !!! {msg}", file=sys.stderr)
    if not problems:
        print("greedy text: every prompt gave the same completion in every configuration, C and round")
    out = args.json or HERE / "results" / f"concurrency-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "concurrency",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": desc,
        "load_average_1min": {"before": load_before[0], "after": load_after[0]},
        "model": {"name": spec.name, "path": str(path), "layers": layers, "config": spec.config},
        "method": {
            "prompt": prompt(0),
            "tokens": tokens,
            "streams": streams,
            "repeats": repeats,
            "warmup_tokens": WARMUP_TOKENS,
            "quick": args.quick,
        },
        "targets": {"streams": TARGET_STREAMS, "ratio_vs_1_min": TARGET_RATIO},
        "configs": info,
        "summary": {k: {str(c): v for c, v in by_c.items()} for k, by_c in summary.items()},
        "rounds": {
            k: {
                str(c): [{kk: vv for kk, vv in r.items() if kk != "texts"} for r in rs]
                for c, rs in by_c.items()
            }
            for k, by_c in runs.items()
        },
        "mismatches": problems,
        "completions": {str(i): v for i, v in variants.items()},  # each distinct text and its runs
    }
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    return 1 if problems else 0


if __name__ == "__main__":
    pipeline.exit_on_sigterm()
    raise SystemExit(main())
