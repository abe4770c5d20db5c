"""The ``lpipes`` command line."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lpipes import __version__
from lpipes.api.limits import HttpLimits, RequestLimits
from lpipes.errors import LpipesError

log = logging.getLogger("lpipes")

DEMO_ARCH = "qwen3"


def _split(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--split takes comma-separated layer indices like 2,4; got {text!r}"
        ) from None


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument(
        "--max-tokens", type=_nonneg_int, default=64, help="tokens to generate at most (default 64)"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy decoding")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    p.add_argument(
        "--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0 = off)"
    )
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (reproducible output)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); never printed")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating to exactly --max-tokens tokens")
    p.add_argument(
        "--raw", action="store_true", help="send the prompt as plain text, without the model's chat template"
    )
    p.add_argument(
        "--split",
        type=_split,
        default=[],
        metavar="A,B,...",
        help="cut the layers at these indices and run each span as its own executor (in-process network)",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "float16", "bfloat16"],
        default="auto",
        help="weight and compute dtype; auto (default): float16 where the native executor runs the "
        "architecture, else float32",
    )
    p.add_argument(
        "--executor",
        choices=["auto", "native", "reference"],
        default="auto",
        help="layer executor: native (fused fp16 kernels, llama family), reference (transformers' "
        "own layers), "
        "or auto (default): native where supported, else reference",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lpipes",
        description="Peer-to-peer distributed inference for open-weight language models.",
    )
    parser.add_argument("--version", action="version", version=f"lpipes {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging on stderr (-vv for debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = sub.add_parser(
        "generate",
        help="generate text from a local or hub model, optionally split into layer spans",
        description="Generate a completion and print only the generated text to stdout (logs go to stderr).",
    )
    gen.add_argument("--model", required=True, help="local Hugging Face model directory or hub id")
    gen.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    _add_generation_args(gen)

    demo = sub.add_parser(
        "demo",
        help="serve a small random-weight model, split into three spans, over the OpenAI-compatible API",
        description=(
            "Build (once, seeded) a tiny random-weight model in the lpipes cache, split its layers over "
            "three in-process spans and serve it over the OpenAI-compatible API until Ctrl-C. With --prompt, "
            "generate once and print instead. The weights are random, so the text is gibberish: the demo "
            "shows the machinery, not a model."
        ),
    )
    demo.add_argument(
        "--arch", default=DEMO_ARCH, help=f"architecture of the demo model (default {DEMO_ARCH})"
    )
    demo.add_argument(
        "--listen",
        default="127.0.0.1:8000",
        metavar="HOST:PORT",
        help="address of the API (default 127.0.0.1:8000)",
    )
    demo.add_argument("--prompt", default=None, help="generate once for this prompt, print it and exit")
    demo.add_argument(
        "--max-tokens", type=_nonneg_int, default=24, help="tokens to generate with --prompt (default 24)"
    )
    serve = sub.add_parser(
        "serve",
        help="serve a model from a node configuration over the OpenAI-compatible API",
        description="Run the node of a node.toml. An origin (end_model = true, [api]) serves "
        "/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics (Prometheus) and "
        "/lpipes/status on [api].listen with continuous batching; it runs alone when it holds every layer "
        "and has no [network] table, else it joins the peer network and routes the layers it does not "
        "hold to layer peers. A layer peer (no [api]) joins the network, takes its span (explicit or "
        '"auto") and runs it for the origins (docs/api.md, docs/configuration.md).',
    )
    serve.add_argument(
        "--config", required=True, help="the node's TOML configuration (see docs/configuration.md)"
    )
    from lpipes.cli import client, init

    init.register(sub)
    client.register(sub)
    return parser


def check_api_listen(listen: str, api_keys: Sequence[str]) -> tuple[str, int]:
    """``(host, port)`` of an API address that is free now (a clear error rather than uvicorn's log line
    after the engine started); warns when it listens beyond localhost without api_keys."""
    host, _, port = listen.rpartition(":")
    try:
        with socket.create_server((host, int(port))):
            pass
    except OSError as exc:
        raise LpipesError(
            f"cannot listen on {listen}: {exc.strerror or exc}; choose another address"
        ) from None
    if not api_keys and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the API listens on %s without api_keys: anyone who can reach it can use it", host)
    return host, int(port)


def _run_server(
    generator: Any,
    name: str,
    listen: str,
    info: Any,
    api_keys: Sequence[str] = (),
    engine_options: dict[str, int] | None = None,
    banner: str | None = None,
    request_limits: RequestLimits | None = None,
    http_limits: HttpLimits | None = None,
) -> int:
    """Serve the API until interrupted. ``request_limits`` / ``http_limits``
    (:mod:`lpipes.api.limits`): ``[api]``'s; ``None`` gives their defaults."""
    import uvicorn

    from lpipes.api.connections import server_config
    from lpipes.api.server import Service, build_app
    from lpipes.generation.engine import Engine

    host, port = check_api_listen(listen, api_keys)
    engine = Engine(generator, **(engine_options or {}))
    app = build_app(Service(engine, name, info=info, api_keys=api_keys, limits=request_limits))
    print(banner or f"serving {name} on http://{listen}/v1 (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:  # pragma: no cover - platforms without uvloop
        loop = "asyncio"
    config = server_config(app, host, port, http_limits or HttpLimits(), loop=loop)
    freeze_startup_objects()
    try:
        uvicorn.Server(config).run()
    finally:
        engine.close()
    return 0


def freeze_startup_objects() -> None:
    """Collect once, then put every object alive now (modules, the model's Python objects) out of the
    garbage collector's sight (``gc.freeze``), just before a node starts serving.

    A full collection scans every tracked object: in a node with a Qwen3-0.6B-shaped model loaded
    (~400k objects) one took 230-270 ms, holding the GIL, so every request's stream stalls. Python runs
    one whenever the objects promoted since the last exceed a quarter of the long-lived ones, which a
    long-running server reaches sooner or later. Frozen, they are skipped (a full collection then takes
    well under a millisecond); objects made later are collected as before. The collection first keeps
    startup's garbage from being frozen with them."""
    gc.collect()
    gc.freeze()


def _executor_names(generator: Any) -> list[str]:
    """What runs each stage: ``native``, ``reference``, or ``network`` (layers routed to peers)."""
    from lpipes.node import RemoteStage
    from lpipes.runtime.native import NativeExecutor

    return [
        "network"
        if isinstance(s, RemoteStage)
        else "native"
        if isinstance(s, NativeExecutor)
        else "reference"
        for s in generator.stages
    ]


def _serve(config_path: str) -> int:
    from lpipes.cli.serve import serve

    return serve(config_path)


def _demo(args: argparse.Namespace) -> int:
    from lpipes.api.server import NodeInfo
    from lpipes.config import ApiConfig
    from lpipes.runtime.local import build_local_generator

    try:
        ApiConfig(listen=args.listen)
    except ValueError:
        raise LpipesError(
            f"--listen must be HOST:PORT with a port in 1..65535, got {args.listen!r}"
        ) from None
    path = demo_model(args.arch)
    split = [2, 4]
    print(f"demo model: {path} (random weights), layers split into [0,2) [2,4) [4,6)", file=sys.stderr)
    if args.prompt is not None:
        demo_args = argparse.Namespace(
            prompt=args.prompt,
            max_tokens=args.max_tokens,
            temperature=0.0,
            top_p=1.0,
            top_k=0,
            seed=None,
            stop=[],
            ignore_eos=True,
            raw=False,
            split=split,
            dtype="auto",
            executor="auto",
        )
        return _run_generation(path, demo_args)
    generator = build_local_generator(path, split=split, dtype="auto")
    url = f"http://{args.listen}"
    body = json.dumps(
        {"model": path.name, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}
    )
    banner = (
        f"serving the demo model as {path.name!r} on {url}/v1 (Ctrl-C to stop). Try:\n"
        f"  lpipes chat --url {url}\n"
        f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'"
    )
    info = NodeInfo(node_id="demo", source=str(path), executors=_executor_names(generator))
    return _run_server(generator, path.name, args.listen, info, banner=banner)


def _cache_dir() -> Path:
    base = os.environ.get("LPIPES_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lpipes"
    )
    return Path(base)


def demo_model(arch: str = DEMO_ARCH) -> Path:
    """Path of the seeded demo checkpoint, building it on first use."""
    from lpipes.models.tiny import TINY_ARCHS, make_tiny_checkpoint

    if arch not in TINY_ARCHS:
        raise LpipesError(f"no demo model for architecture {arch!r}; choose one of {', '.join(TINY_ARCHS)}")
    path = _cache_dir() / f"demo-{arch}"
    if not (path / "lpipes-tiny.json").is_file():
        log.info("building the demo model in %s", path)
        make_tiny_checkpoint(path, arch, seed=0)
    return path


def _run_generation(model: str | Path, args: argparse.Namespace, revision: str | None = None) -> int:
    from lpipes.generation.loop import GenerationRequest
    from lpipes.generation.sampling import SamplingParams
    from lpipes.runtime.local import build_local_generator

    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )
    generator = build_local_generator(
        model, split=args.split, dtype=args.dtype, executor=args.executor, revision=revision
    )
    em = generator.end_model
    if args.raw or not getattr(em.tokenizer, "chat_template", None):
        prompt_ids = em.encode_prompt(args.prompt)
    else:
        prompt_ids = em.encode_chat([{"role": "user", "content": args.prompt}])
    log.info("prompt: %d tokens; spans: %s", len(prompt_ids), [(s.start, s.end) for s in generator.stages])
    finish = None
    n = 0
    for event in generator.generate([GenerationRequest(prompt_ids, params)]):
        sys.stdout.write(event.text)
        sys.stdout.flush()
        n += 1
        finish = event.finish_reason
    sys.stdout.write("\n")
    log.info("generated %d tokens (finish reason: %s)", n, finish)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    # qh3 warns of every connection its peer closes (routine here: links are re-opened on demand);
    # -vv shows them.
    logging.getLogger("quic").setLevel(logging.DEBUG if args.verbose >= 2 else logging.ERROR)
    try:
        handler = getattr(args, "handler", None)
        if handler is not None:
            return handler(args)
        if args.command == "generate":
            return _run_generation(args.model, args, revision=args.revision)
        if args.command == "serve":
            return _serve(args.config)
        if args.command == "demo":
            return _demo(args)
    except LpipesError as exc:
        print(f"lpipes: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
