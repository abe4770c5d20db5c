"""Decode throughput of one model split over 1, 2 and 3 ``lpipes serve`` processes on 127.0.0.1.

Two seeded random-weight fp16 checkpoints, built once with ``lpipes.models.tiny.make_tiny_checkpoint``
under ``$LPIPES_CACHE/bench`` (else ``~/.cache/lpipes/bench``):

* ``qwen3-0.6b``: the Qwen3-0.6B shape: 28 layers, hidden 1024, intermediate 3072, 16 query and 8 KV
  heads of 128, vocabulary 151936, tied embeddings (``--quick``: 8 layers). The tiny offline tokenizer
  has 512 tokens; the checkpoint gets a copy whose vocabulary is padded to the model's 151936 ids (id
  ``i`` >= 512 decodes to `` w<i>``; encoding is unchanged), so the LM head costs what the real one does
  and every generated id shows in the text. This gives the end-to-end ratios.
* ``thin``: 3 layers with the same hidden size (so the same 2 KiB hidden state per token crosses each
  link) but almost no compute (2 query / 1 KV heads of 128, intermediate 256, the tokenizer's 512-token
  vocabulary): a step is ~1 ms of compute, so the per-hop overhead stands out of the timing noise of a
  shared machine (1.5 % of a 0.6B step is lost in it). ``--skip-thin`` leaves it out.

For each model and thread count, every configuration's real ``python -m lpipes.cli.main serve``
processes run at once (API on a free TCP port, QUIC on free UDP ports, all bound to 127.0.0.1; network
key, gossip every 0.5 s, ``dtype = "float16"``: the native fused fp16 executor); the script waits for
``/health`` and, when networked, until the origin sees every layer covered by ready peers:

* ``1 proc``: one origin holding every layer and no ``[network]`` table (no QUIC at all);
* ``2 procs``: origin [0, L/2) + a layer peer [L/2, L);
* ``3 procs``: origin + two layer peers, the layers split as evenly as rounding allows
  ([0, 9) [9, 19) [19, 28)).

A decode step on k >= 2 processes crosses k links: origin -> peer 1 -> ... -> peer k-1 -> origin (each
hop forwards to the next; the last returns the hidden state to the origin).

Measurement, through the OpenAI API (``/v1/completions``, one request at a time, streaming off, greedy
``temperature = 0``, ``ignore_eos``): after two warm-up requests per configuration, each round sends
to every configuration in turn (the first one rotating) the same prompt with ``max_tokens`` = S (16)
and then S + N (N = ``--tokens``, default 64; 4N for ``thin``); ms/token = (t(S+N) - t(S)) / N, which
cancels prefill, the first token and the HTTP round trip. Idle configurations only gossip, so a
disturbance on a shared machine hits all configurations of a round alike. Reported: the median over
``--repeats`` rounds with its min-max spread; the tok/s ratio to ``1 proc`` (same model and threads,
same run) from the medians and, in ``paired``, the median of the per-round ratios (each round's
configurations ran seconds apart: steadier on a drifting machine); the per-hop overhead
(ms/token(k procs) - ms/token(1 proc)) / k. Targets: >= 0.95 for 3 procs, <= 0.3 ms per hop; they are
printed, not asserted. The greedy text of the S+N request must be identical in every round and
configuration of a model (batch-invariant fp16 kernels; the fp32 residual stream crosses the wire):
a mismatch is printed loudly and makes the exit status 1. Every started process is killed by PID at
the end, also on errors.

Threads: every process gets ``LPIPES_NUM_THREADS`` (lpipes' kernel thread pool) and ``OMP_NUM_THREADS``
(torch) = ``--threads``; default 1 for every process of every configuration, so the 6 processes never
ask for more than the 2 cores of a small VM and each configuration computes on the same single core
(the pipeline runs its stages one after another: only one process computes at a time).
``--threads 1,2`` repeats everything with 2 threads per process (the idle processes' pool workers
then spin ~50-100 us after each region, which costs the others a core briefly).

Busy-polling: ``--busy-poll-us 0,3000`` runs every networked configuration once per value of
``[network] busy_poll_us`` (0, the default: off), all up at once and measured in the same interleaved
rounds, so the table shows what polling for the next frame instead of sleeping saves per hop.

Absolute times on shared machines are noisy: run on an otherwise idle machine (the 1-minute load
average before and after is printed and stored) and rerun when the spread is wide. Writes JSON with the
machine description to ``bench/results/pipeline-<date>.json``.

    python bench/pipeline.py --quick              # 8-layer 0.6B shape, 32 tokens, 3 rounds: smoke run
    python bench/pipeline.py                      # 28 layers, 64 tokens, 8 rounds (~4 min on 2 cores)
    python bench/pipeline.py --threads 1,2 --procs 1,3 --skip-thin --json /tmp/p.json
    python bench/pipeline.py --only-thin --busy-poll-us 0,3000   # the per-hop cost, polling or not
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHORT_TOKENS = 16  # max_tokens of the short request of each pair
PROMPT = "The quick brown fox jumps over the lazy dog."
STARTUP_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 900.0
BUILD_VERSION = 1  # bump when a checkpoint recipe changes: cached ones are rebuilt
TARGET_RATIO = 0.95  # 3 procs vs 1 proc, tok/s
TARGET_HOP_MS = 0.3

# Qwen3-0.6B's config.json, as overrides of the tiny qwen3 config (which has the rest: q/k norms, no bias).
QWEN3_06B = {
    "vocab_size": 151936,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
}
# Same hidden size (same bytes per hop), next to no compute; the tiny tokenizer's vocabulary.
THIN = {
    "hidden_size": 1024,
    "intermediate_size": 256,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 128,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}


@dataclass
class ModelSpec:
    name: str
    layers: int
    config: dict[str, Any]
    tokens: int  # N: decode tokens measured per round


# ------------------------------------------------------------------------------ checkpoint
def cache_root() -> Path:
    """``$LPIPES_CACHE/bench``, else ``$XDG_CACHE_HOME/lpipes/bench`` or ``~/.cache/lpipes/bench``
    (the same base as ``lpipes serve --demo``)."""
    base = os.environ.get("LPIPES_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lpipes"
    )
    return Path(base) / "bench"


def padded_tokenizer(vocab_size: int) -> Any:
    """The tiny offline tokenizer with its BPE vocabulary padded to ``vocab_size`` ids.

    The padding pieces (``Ġw<id>``: byte-level for " w<id>") have no merges, so encoding is unchanged;
    they only let every id the model can emit decode to its own text.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from lpipes.models.tiny import CHATML_TEMPLATE, build_tokenizer

    spec = json.loads(build_tokenizer().backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), vocab_size):
        piece = f"Ġw{i}"
        if piece in vocab:
            raise RuntimeError(f"the tiny tokenizer already has {piece!r}")
        vocab[piece] = i
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_checkpoint(spec: ModelSpec, seed: int, path: Path | None = None) -> Path:
    """``spec``'s fp16 checkpoint, built once (into ``path`` or the cache) and reused while its recipe
    is unchanged."""
    from lpipes.models.tiny import MODEL_VOCAB_SIZE, make_tiny_checkpoint

    path = path or cache_root() / f"pipeline-{spec.name}-{spec.layers}l-seed{seed}"
    recipe = {"version": BUILD_VERSION, "seed": seed, "num_layers": spec.layers, "config": spec.config}
    marker = path / "bench-pipeline.json"
    if marker.is_file() and json.loads(marker.read_text()) == recipe:
        return path
    print(f"building the {spec.name} checkpoint ({spec.layers} layers) in {path} ...", file=sys.stderr)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    make_tiny_checkpoint(
        tmp,
        "qwen3",
        seed=seed,
        num_layers=spec.layers,
        max_shard_size="400MB",
        dtype="float16",
        config_overrides=spec.config,
    )
    vocab = spec.config.get("vocab_size", MODEL_VOCAB_SIZE)
    if vocab != MODEL_VOCAB_SIZE:
        padded_tokenizer(vocab).save_pretrained(tmp)
    marker = tmp / "bench-pipeline.json"
    marker.write_text(json.dumps(recipe))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


# ------------------------------------------------------------------------------- processes
def int_list(text: str) -> list[int]:
    """A comma-separated command-line list of integers ("1,2,3")."""
    return [int(x) for x in text.split(",") if x.strip()]


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spans(num_layers: int, procs: int) -> list[tuple[int, int]]:
    """``procs`` consecutive spans covering the layers, as even as rounding allows."""
    cuts = [round(i * num_layers / procs) for i in range(procs + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


@dataclass
class Proc:
    name: str
    config: Path
    log: Path
    popen: subprocess.Popen


@dataclass
class Cluster:
    """The ``lpipes serve`` processes of one configuration; always ``stop()`` it (kills by PID)."""

    root: Path
    model: Path
    threads: int
    busy_poll_us: int = 0
    procs: list[Proc] = field(default_factory=list)
    api: str = ""

    def start(self, layer_spans: list[tuple[int, int]]) -> None:
        key = self.root / "network.key"
        key.write_text(secrets.token_hex(32) + "\n")
        networked = len(layer_spans) > 1
        quic = [free_port(socket.SOCK_DGRAM) for _ in layer_spans]
        self.api = f"127.0.0.1:{free_port(socket.SOCK_STREAM)}"
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "LPIPES_NUM_THREADS": str(self.threads),
            "OMP_NUM_THREADS": str(self.threads),
        }
        env.pop("LPIPES_TRACE_FRAMES", None)
        for i, (start, end) in enumerate(layer_spans):
            name = "origin" if i == 0 else f"peer{i}"
            lines = [f'node_id = "{name}"']
            if networked:
                lines += [
                    "[network]",
                    f'listen = "127.0.0.1:{quic[i]}"',
                    f'key_file = "{key}"',
                    "gossip_interval_s = 0.5",
                    "join_timeout_s = 60.0",
                    f"busy_poll_us = {self.busy_poll_us}",
                ]
                if i > 0:
                    lines.append(f'bootstrap = ["127.0.0.1:{quic[0]}"]')
            if i == 0:
                lines += ["[api]", f'listen = "{self.api}"']
            lines += [
                "[[models]]",
                f'path = "{self.model}"',
                f"layers = [{start}, {end}]",
                'dtype = "float16"',
                f"end_model = {'true' if i == 0 else 'false'}",
            ]
            cfg = self.root / f"{name}.toml"
            cfg.write_text("\n".join(lines) + "\n")
            log = self.root / f"{name}.log"
            with open(log, "wb") as out:
                popen = subprocess.Popen(
                    [sys.executable, "-m", "lpipes.cli.main", "serve", "--config", str(cfg)],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=out,
                )
            self.procs.append(Proc(name, cfg, log, popen))

    def _check_alive(self) -> None:
        for p in self.procs:
            if p.popen.poll() is not None:
                tail = p.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{p.name} exited with {p.popen.returncode}:\n{tail}")

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Until the API answers ``/health`` and, when networked, the origin sees every layer covered by
        ready peers (the route is planned from that view at the first request)."""
        from lpipes.cli.netstatus import query_network
        from lpipes.config import load_config

        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the processes were not ready within {timeout:.0f} s; logs in {self.root}"
                )
            try:
                if httpx.get(f"http://{self.api}/health", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        if len(self.procs) == 1:
            return
        cfg = load_config(self.procs[0].config)
        while True:
            self._check_alive()
            try:
                data = query_network(cfg, timeout=5.0)
                ready = [p for p in data["peers"] if p["ready"]]
                if len(ready) >= len(self.procs) and not data["uncovered"]:
                    return
            except Exception as exc:  # noqa: BLE001 - retried until the deadline
                data = {"error": repr(exc)}
            if time.monotonic() > deadline:
                raise RuntimeError(f"the network did not cover every layer within {timeout:.0f} s: {data}")
            time.sleep(0.25)

    def stop(self) -> None:
        for p in self.procs:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(timeout=15)


# ------------------------------------------------------------------------------ measuring
def complete(client: httpx.Client, model: str, max_tokens: int) -> tuple[float, str]:
    """Seconds for one greedy completion of ``max_tokens`` tokens, and its text."""
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": False,
    }
    t0 = time.perf_counter()
    r = client.post("/v1/completions", json=body)
    dt = time.perf_counter() - t0
    r.raise_for_status()
    data = r.json()
    got = data["usage"]["completion_tokens"]
    if got != max_tokens:
        raise RuntimeError(f"asked for {max_tokens} tokens, got {got}")
    return dt, data["choices"][0]["text"]


@contextlib.contextmanager
def stopped_at_exit(clusters: dict[Any, Cluster]) -> Iterator[dict[Any, Cluster]]:
    """Yields ``clusters`` to fill; on an error prints every process's log tail, and always stops every
    cluster (each process killed by PID)."""
    try:
        yield clusters
    except BaseException:
        for c in clusters.values():
            for p in c.procs:
                print(f"--- {p.name} of {len(c.procs)} log (tail) ---", file=sys.stderr)
                print(p.log.read_text(errors="replace")[-2000:], file=sys.stderr)
        raise
    finally:
        for c in clusters.values():
            c.stop()


Config = tuple[int, int]  # (processes, busy_poll_us)


def label(cfg: Config) -> str:
    k, poll = cfg
    return f"{k} proc(s)" + (f" poll {poll}" if poll else "")


def configs_for(procs: list[int], polls: list[int]) -> list[Config]:
    """Every process count, the networked ones once per busy-poll value (one process has no network)."""
    return [(k, poll) for k in procs for poll in ([0] if k == 1 else polls)]


def run_threads(model: Path, spec: ModelSpec, configs: list[Config], threads: int, repeats: int) -> dict:
    """Every configuration up at once, measured in interleaved rounds (one request pair per
    configuration per round, the starting configuration rotating); all processes are killed at the end."""
    results: dict[Config, dict] = {}
    # Clusters stop (exit first) before the temporary folders holding their logs are removed.
    with contextlib.ExitStack() as stack, stopped_at_exit({}) as clusters:
        for cfg in configs:
            k, poll = cfg
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"lpipes-bench-pipeline-{k}-"))
            cluster = clusters[cfg] = Cluster(Path(tmp), model, threads, busy_poll_us=poll)
            print(f"{spec.name}: starting {label(cfg)}, {threads} thread(s) each ...", file=sys.stderr)
            t0 = time.monotonic()
            cluster.start(spans(spec.layers, k))
            cluster.wait_ready()
            results[cfg] = {
                "model": spec.name,
                "spans": [list(s) for s in spans(spec.layers, k)],
                "threads": threads,
                "busy_poll_us": poll,
                "startup_s": time.monotonic() - t0,
            }
        clients = {
            cfg: stack.enter_context(httpx.Client(base_url=f"http://{c.api}", timeout=REQUEST_TIMEOUT_S))
            for cfg, c in clusters.items()
        }
        names = {cfg: c.get("/v1/models").json()["data"][0]["id"] for cfg, c in clients.items()}
        for cfg in configs:  # warm-up: the first route, page faults, allocator and caches
            for _ in range(2):
                complete(clients[cfg], names[cfg], SHORT_TOKENS + 8)
        rounds: list[dict[Config, float]] = []
        texts: dict[Config, list[str]] = {cfg: [] for cfg in configs}
        for r in range(repeats):
            this: dict[Config, float] = {}
            for cfg in configs[r % len(configs) :] + configs[: r % len(configs)]:
                t_short, _ = complete(clients[cfg], names[cfg], SHORT_TOKENS)
                t_long, text = complete(clients[cfg], names[cfg], SHORT_TOKENS + spec.tokens)
                this[cfg] = (t_long - t_short) / spec.tokens * 1000.0
                texts[cfg].append(text)
            rounds.append(this)
            line = ", ".join(f"{label(cfg)} {this[cfg]:.2f}" for cfg in configs)
            print(f"  round {r + 1}/{repeats} ms/token: {line}", file=sys.stderr, flush=True)
        for cfg in configs:
            per_token = [rd[cfg] for rd in rounds]
            ms = statistics.median(per_token)
            results[cfg].update(
                ms_per_token=ms,
                ms_per_token_min=min(per_token),
                ms_per_token_max=max(per_token),
                ms_per_token_rounds=per_token,
                tok_s=1000.0 / ms,
                text=texts[cfg][0],
                deterministic=all(t == texts[cfg][0] for t in texts[cfg]),
            )
            if (1, 0) in results:
                results[cfg]["ratio_paired"] = statistics.median(rd[(1, 0)] / rd[cfg] for rd in rounds)
    return results


# ------------------------------------------------------------------------------- reporting
def machine() -> dict[str, Any]:
    import importlib.metadata

    import torch

    import lpipes

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO)
        commit = git.stdout.strip()
    except OSError:
        commit = ""

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return ""

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "isa": lpipes.cpu_features().get("best_isa"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "qh3": version("qh3"),
        "uvloop": version("uvloop"),
        "commit": commit,
    }


def report(results: dict[str, dict]) -> list[str]:
    """Adds ratios and per-hop overheads to ``results``, prints the table and returns the mismatch
    messages (empty when the texts agree)."""
    problems: list[str] = []
    ref_text: dict[str, str] = {}
    print(
        f"\n{'model':<11} {'thr':>3} {'procs':>5} {'poll us':>7} {'spans':<22} {'ms/token':>9} "
        f"{'min-max':>13} {'tok/s':>8} {'vs 1 proc':>9} {'paired':>7} {'links':>5} {'ms/hop':>7} "
        f"{'same text':>9}"
    )
    for r in results.values():
        base = results.get(f"{r['model']}/{r['threads']}x1")
        k = len(r["spans"])
        ref = ref_text.setdefault(r["model"], r["text"])
        r["same_text"] = r["text"] == ref and r["deterministic"]
        if not r["same_text"]:
            why = (
                "differs between rounds" if not r["deterministic"] else "differs from the first configuration"
            )
            who = f"{r['model']}, {label((k, r['busy_poll_us']))}, {r['threads']} thread(s)"
            problems.append(f"{who}: the greedy text {why}")
        r["links_per_step"] = k if k > 1 else 0
        r["ratio_vs_1proc"] = base["ms_per_token"] / r["ms_per_token"] if base else None
        r["ms_per_hop"] = (r["ms_per_token"] - base["ms_per_token"]) / k if base and k > 1 else None
        spread = f"{r['ms_per_token_min']:.2f}-{r['ms_per_token_max']:.2f}"
        span_s = " ".join(f"[{a},{b})" for a, b in r["spans"])
        ratio = f"{r['ratio_vs_1proc']:.3f}x" if base else "-"
        paired = f"{r['ratio_paired']:.3f}x" if "ratio_paired" in r else "-"
        hop = f"{r['ms_per_hop']:.3f}" if r["ms_per_hop"] is not None else "-"
        print(
            f"{r['model']:<11} {r['threads']:>3} {k:>5} {r['busy_poll_us']:>7} {span_s:<22} "
            f"{r['ms_per_token']:>9.3f} {spread:>13} "
            f"{r['tok_s']:>8.1f} {ratio:>9} {paired:>7} {r['links_per_step']:>5} {hop:>7} "
            f"{'yes' if r['same_text'] else 'NO':>9}"
        )
    print(
        "\nms/token: median over rounds of (t(S+N) - t(S)) / N. vs 1 proc: tok/s ratio to the single process "
        "(same model,\nthreads and run), from the medians; paired: median of the per-round ratios. ms/hop: "
        f"(ms/token - 1 proc's) / links\ncrossed per step (k for k procs). Targets: >= {TARGET_RATIO} for 3 "
        f"procs of the full model, <= {TARGET_HOP_MS} ms per hop."
    )
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 layers, 32 tokens, 3 rounds: a smoke run")
    ap.add_argument("--tokens", type=int, help="N, decode tokens measured per round (default 64; quick 32)")
    ap.add_argument("--repeats", type=int, help="rounds (default 8; quick 3)")
    ap.add_argument("--threads", default="1", help="comma-separated threads per process (default 1)")
    ap.add_argument("--procs", default="1,2,3", help="comma-separated process counts (default 1,2,3)")
    ap.add_argument("--layers", type=int, help="layers of the 0.6B-shaped model (default 28; quick 8)")
    ap.add_argument(
        "--busy-poll-us",
        default="0",
        help="comma-separated [network] busy_poll_us values; each networked configuration runs once per "
        "value (default 0: off)",
    )
    ap.add_argument("--skip-thin", action="store_true", help="leave out the thin per-hop model")
    ap.add_argument("--only-thin", action="store_true", help="only the thin per-hop model (quick hop checks)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, help="checkpoint directory of the 0.6B-shaped model")
    ap.add_argument("--json", type=Path, help="results file (default bench/results/pipeline-<date>.json)")
    args = ap.parse_args()
    tokens = args.tokens or (32 if args.quick else 64)
    repeats = args.repeats or (3 if args.quick else 8)
    layers = args.layers or (8 if args.quick else 28)
    threads = int_list(args.threads)
    procs = sorted(set(int_list(args.procs)))
    polls = list(dict.fromkeys(int_list(args.busy_poll_us)))
    if tokens < 1 or repeats < 1 or not threads or min(threads) < 1 or not procs or not 1 <= procs[0]:
        ap.error("--tokens, --repeats, --threads and --procs must be >= 1")
    if not polls or not all(0 <= p <= 1_000_000 for p in polls):
        ap.error("--busy-poll-us: values from 0 to 1000000")
    if args.skip_thin and args.only_thin:
        ap.error("--skip-thin and --only-thin exclude each other")
    specs = [] if args.only_thin else [(ModelSpec("qwen3-0.6b", layers, QWEN3_06B, tokens), args.cache)]
    if not args.skip_thin:
        specs.append((ModelSpec("thin", 3, THIN, 4 * tokens), None))
    for spec, _ in specs:
        if procs[-1] > spec.layers:
            ap.error(f"--procs: {procs[-1]} processes but {spec.name} has {spec.layers} layers")
    models = [(spec, build_checkpoint(spec, args.seed, path)) for spec, path in specs]

    load_before = os.getloadavg()
    results: dict[str, dict] = {}
    for spec, path in models:
        for t in threads:
            for (k, poll), r in run_threads(path, spec, configs_for(procs, polls), t, repeats).items():
                results[f"{spec.name}/{t}x{k}" + (f"/poll{poll}" if poll else "")] = r
    load_after = os.getloadavg()

    desc = machine()
    print(
        f"\nmachine: {desc['cpu']}, {desc['cores']} cores, isa={desc['isa']}; python {desc['python']}, "
        f"torch {desc['torch']}, qh3 {desc['qh3']}; S={SHORT_TOKENS}, {repeats} rounds; "
        f"1-min load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    problems = report(results)
    for msg in problems:
        print(f"\n!!! OUTPUT MISMATCH: {msg} !!!", file=sys.stderr)
    out = args.json or HERE / "results" / f"pipeline-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "pipeline",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": desc,
        "load_average_1min": {"before": load_before[0], "after": load_after[0]},
        "models": {
            spec.name: {
                "path": str(path),
                "layers": spec.layers,
                "config": spec.config,
                "tokens": spec.tokens,
            }
            for spec, path in models
        },
        "method": {"prompt": PROMPT, "short_tokens": SHORT_TOKENS, "repeats": repeats, "quick": args.quick},
        "targets": {"ratio_3_procs_min": TARGET_RATIO, "ms_per_hop_max": TARGET_HOP_MS},
        "mismatches": problems,
        "results": {k: {kk: vv for kk, vv in v.items() if kk != "text"} for k, v in results.items()},
        "text_heads": {r["model"]: r["text"][:120] for r in results.values()},
    }
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    return 1 if problems else 0


def exit_on_sigterm() -> None:
    """SIGTERM (``kill``, a CI timeout) unwinds like Ctrl-C, so every started server is still killed."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


if __name__ == "__main__":
    exit_on_sigterm()
    raise SystemExit(main())
