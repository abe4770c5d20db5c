"""`lpipes serve --config node.toml`: run one node — alone, as the origin of a network, or as a layer peer.

* An origin (``end_model = true``, with ``[api]``) that holds every layer and has no ``[network]``
  table serves alone, as before the network existed.
* Otherwise the node joins the peer network (``[network]``; defaults apply when the table is absent):
  it listens for peers over QUIC, gossips with its bootstrap peers, takes its span (explicit, or
  ``"auto"``: the best span for the least-covered layers within ``max_memory_gb``), loads it, and
  announces itself ready. An origin then serves the API, running its own span (which starts at
  layer 0) and routing the remaining layers over the network; a layer peer runs its span for the
  origins that route to it, until SIGINT/SIGTERM.

The API and the network share one uvloop event loop; compute runs on worker threads.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Any

from lpipes.config import ModelConfig, NodeConfig, load_config
from lpipes.errors import LpipesError

log = logging.getLogger(__name__)

GiB = 1 << 30
# An ``auto`` layer peer checks this many times, a gossip interval (at least AUTO_SETTLE_MIN_S) apart,
# that no peer starting with it claimed the same window (see _settle_auto_span).
AUTO_SETTLE_ROUNDS = 3
AUTO_SETTLE_MIN_S = 0.5


def _capacity(ckpt: Any, start: int, dtype: Any, budget_bytes: float) -> int:
    """Most consecutive layers from ``start`` whose weights fit ``budget_bytes``."""
    from lpipes.runtime.local import weight_bytes

    n, total = 0, 0
    for i in range(start, ckpt.num_layers):
        total += weight_bytes(ckpt, i, i + 1, dtype)
        if total > budget_bytes:
            break
        n += 1
    return n


def _check_explicit(path: str, m: ModelConfig, ckpt: Any, dtype: Any) -> tuple[int, int]:
    from lpipes.runtime.local import weight_bytes

    assert m.span is not None
    start, end = m.span
    if end > ckpt.num_layers:
        raise LpipesError(f"{path}: layers {list(m.span)} exceed the model's {ckpt.num_layers} layers")
    if m.end_model and start != 0:
        raise LpipesError(
            f"{path}: an origin's own layers must start at layer 0 (got {list(m.span)}); "
            "leave the later layers to layer peers"
        )
    need = weight_bytes(ckpt, start, end, dtype)
    if need > m.max_memory_gb * GiB:
        raise LpipesError(
            f"{path}: layers {list(m.span)} need {need / GiB:.2f} GiB of weights in {dtype}, over "
            f"max_memory_gb = {m.max_memory_gb}; raise max_memory_gb or take fewer layers"
        )
    return start, end


def serve(config_path: str) -> int:
    from lpipes.models.checkpoint import open_checkpoint
    from lpipes.runtime.local import resolve_dtype

    cfg = load_config(config_path)
    if len(cfg.models) != 1:
        raise LpipesError(
            f"{config_path}: a node serves one [[models]] entry for now (got {len(cfg.models)})"
        )
    m = cfg.models[0]
    if m.end_model and cfg.api is None:
        raise LpipesError(f"{config_path}: an origin (end_model = true) needs an [api] table to serve")
    if not m.end_model and cfg.api is not None:
        raise LpipesError(
            f"{config_path}: [api] needs end_model = true (the tokenizer and head live on the origin)"
        )
    ckpt = open_checkpoint(m.source)
    dtype = resolve_dtype(ckpt, m.dtype, m.executor)
    L = ckpt.num_layers
    span: tuple[int, int] | None
    if m.span is not None:
        span = _check_explicit(config_path, m, ckpt, dtype)
    elif m.end_model:
        span = (0, _capacity(ckpt, 0, dtype, m.max_memory_gb * GiB))
        if m.keep_first_span and span[1] == 0:
            raise LpipesError(
                f"{config_path}: keep_first_span needs at least one layer here, but not one fits "
                f"max_memory_gb = {m.max_memory_gb}"
            )
    else:
        span = None  # chosen after joining the network
    networked = "network" in cfg.model_fields_set or not m.end_model
    if not networked and span != (0, L):
        # An origin without [network] serves alone: it must hold every layer.
        from lpipes.runtime.local import weight_bytes

        need = weight_bytes(ckpt, 0, L, dtype)
        if m.span is None:
            raise LpipesError(
                f"{config_path}: the {L} layers need {need / GiB:.2f} GiB of weights in {dtype}, over "
                f"max_memory_gb = {m.max_memory_gb}; raise max_memory_gb, or add a [network] table so "
                "layer peers can hold the rest"
            )
        raise LpipesError(
            f"{config_path}: layers {list(m.span)} do not cover all {L} layers; a node without a "
            "[network] table serves alone and must hold every layer (add [network] to use layer peers)"
        )
    if not networked:
        return _serve_alone(config_path, cfg, dtype)
    return asyncio_run(_serve_networked(config_path, cfg, ckpt, dtype, span))


def asyncio_run(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - platforms without uvloop
        return asyncio.run(coro)


def _serve_alone(config_path: str, cfg: NodeConfig, dtype: Any) -> int:
    from lpipes.api.server import NodeInfo
    from lpipes.cli.main import _executor_names, _run_server
    from lpipes.runtime.local import build_local_generator

    m = cfg.models[0]
    assert cfg.api is not None
    generator = build_local_generator(
        m.source, dtype=dtype, executor=m.executor, kv_cache_bytes=int(m.kv_cache_gb * GiB)
    )
    name = model_name(m)
    info = NodeInfo(node_id=cfg.node_id, source=m.source, executors=_executor_names(generator))
    return _run_server(
        generator,
        name,
        cfg.api.listen,
        info,
        api_keys=cfg.api.api_keys,
        engine_options=cfg.api.engine_options(),
        request_limits=cfg.api.request_limits(),
        http_limits=cfg.api.http_limits(),
        banner=f"serving {name} on http://{cfg.api.listen}/v1 (node {cfg.node_id}; Ctrl-C to stop)",
    )


def model_name(m: ModelConfig) -> str:
    return m.id or (m.path.name if m.path else m.source)


async def _serve_networked(
    config_path: str, cfg: NodeConfig, ckpt: Any, dtype: Any, span: tuple[int, int] | None
) -> int:
    from lpipes.net.auth import load_key
    from lpipes.node import Node

    m = cfg.models[0]
    net = cfg.network
    key = load_key(net.key_file) if net.key_file is not None else None
    settings = node_settings(cfg, ckpt, dtype, key)
    node = Node(settings)
    loop = asyncio.get_running_loop()
    engine = None
    try:
        try:
            address = await node.start()
        except OSError as exc:
            raise LpipesError(
                f"{config_path}: cannot listen for peers on {net.listen}: {exc.strerror or exc}"
            ) from None
        known = await node.join(net.join_timeout_s)
        auto = span is None
        if auto:
            # Size the window from layer 0's weights, then shrink it to what fits from its start.
            if _capacity(ckpt, 0, dtype, m.max_memory_gb * GiB) == 0:
                raise LpipesError(
                    f"{config_path}: not one layer fits max_memory_gb = {m.max_memory_gb}; raise it"
                )
            span = _auto_span(node, ckpt, dtype, m)
            log.info("layers auto: took [%d, %d) (knew %d peer(s))", *span, known)
            if node.faults.claim_delay_ms:
                await asyncio.sleep(node.faults.claim_delay_ms / 1000.0)
        node.span = span
        await node.announce()
        if auto and not m.end_model:
            node.span = await _settle_auto_span(node, ckpt, dtype, m)
        stages = await loop.run_in_executor(None, _load_span, m, span, dtype)
        if m.end_model:
            node.local_cache = getattr(stages[0], "cache", None) if stages else None
        else:
            node.executor = stages[0]
        node.ready = True
        await node.announce()
        where = f"layers [{span[0]}, {span[1]})" if span[1] > span[0] else "no layers"
        print(
            f"node {cfg.node_id}: {where} of {settings.model}, peers on quic://{address}"
            + ("" if key else " (open network: no key_file)"),
            file=sys.stderr,
            flush=True,
        )
        from lpipes.cli.main import freeze_startup_objects

        if not m.end_model:
            freeze_startup_objects()
            await _wait_for_signal()
            return 0
        engine, server = _origin_server(cfg, ckpt, dtype, stages, node, span)
        freeze_startup_objects()
        await server.serve()
        return 0
    finally:
        if engine is not None:
            await loop.run_in_executor(None, engine.close)
        await node.close()


def _same_model_peers(node: Any) -> list[Any]:
    """The records of the known peers that serve this node's model."""
    return [p for p in node.membership.peers() if p.model_hash == node.s.model_hash]


def _auto_span(node: Any, ckpt: Any, dtype: Any, m: ModelConfig) -> tuple[int, int]:
    """The ``auto`` span for the network this node knows now (see ``choose_span``)."""
    from lpipes.swarm.planning import choose_span

    same = _same_model_peers(node)
    spans = [p.span for p in same if not p.end_model]
    origin_ends = [p.end for p in same if p.end_model]
    budget = m.max_memory_gb * GiB
    cap = _capacity(ckpt, 0, dtype, budget)
    start, end = choose_span(ckpt.num_layers, cap, spans, origin_ends=origin_ends)
    return (start, start + min(end - start, _capacity(ckpt, start, dtype, budget)))


async def _settle_auto_span(node: Any, ckpt: Any, dtype: Any, m: ModelConfig) -> tuple[int, int]:
    """Give up an ``auto`` span that a peer starting at the same time claimed too (``rival_claim``):
    every gossip round (``AUTO_SETTLE_ROUNDS`` of them, before any weight is loaded), look for such a
    claim; on one, take a new span with it counted and announce that."""
    from lpipes.swarm.planning import rival_claim

    span = node.span
    for _ in range(AUTO_SETTLE_ROUNDS):
        await asyncio.sleep(max(AUTO_SETTLE_MIN_S, node.s.gossip_interval_s))
        await node.announce()  # an exchange with every known peer: their claims, fresh
        rival = rival_claim(node.s.node_id, span, _same_model_peers(node))
        if rival is None:
            continue  # the next round may still bring a claim from a peer that joined a bit later
        new = _auto_span(node, ckpt, dtype, m)
        log.info(
            "layers auto: %s claimed [%d, %d) at the same time and keeps it; taking [%d, %d)",
            rival.node_id,
            rival.start,
            rival.end,
            *new,
        )
        span = node.span = new
        await node.announce()
    return span


def node_settings(cfg: NodeConfig, ckpt: Any, dtype: Any, key: bytes | None) -> Any:
    """The :class:`~lpipes.node.NodeSettings` of a networked node: its ``[network]`` keys (limits
    included), its model's shape and the network key."""
    from lpipes.node import NodeSettings, model_fingerprint
    from lpipes.wire import WireLimits

    m = cfg.models[0]
    net = cfg.network
    return NodeSettings(
        node_id=cfg.node_id,
        listen=net.listen,
        advertise=net.advertise,
        bootstrap=list(net.bootstrap),
        key=key,
        model=model_name(m),
        model_hash=model_fingerprint(ckpt.text_config),
        num_layers=ckpt.num_layers,
        hidden_size=int(ckpt.text_config.hidden_size),
        dtype=str(dtype).removeprefix("torch."),
        end_model=m.end_model,
        gossip_interval_s=net.gossip_interval_s,
        peer_timeout_s=net.peer_timeout_s,
        session_timeout_s=net.session_timeout_s,
        step_timeout_s=net.step_timeout_s,
        max_sessions=net.max_sessions,
        limits=WireLimits(max_frame_bytes=net.max_frame_bytes),
        busy_poll_s=net.busy_poll_us / 1e6,
    )


def _load_span(m: ModelConfig, span: tuple[int, int], dtype: Any) -> list[Any]:
    from lpipes.models.checkpoint import open_checkpoint
    from lpipes.runtime.local import make_executor

    if span[1] <= span[0]:
        return []
    ckpt = open_checkpoint(m.source, layers=span, end_model=False)
    return [
        make_executor(ckpt, *span, dtype=dtype, executor=m.executor, kv_cache_bytes=int(m.kv_cache_gb * GiB))
    ]


def _origin_server(
    cfg: NodeConfig, ckpt: Any, dtype: Any, stages: list[Any], node: Any, span: tuple[int, int]
) -> tuple[Any, Any]:
    import uvicorn

    from lpipes.api.connections import server_config
    from lpipes.api.server import NodeInfo, Service, build_app
    from lpipes.cli.main import _executor_names, check_api_listen
    from lpipes.generation.engine import Engine
    from lpipes.generation.loop import Generator
    from lpipes.models.checkpoint import open_checkpoint
    from lpipes.models.end_model import EndModel
    from lpipes.node import RemoteStage
    from lpipes.runtime.native import NativeExecutor

    m = cfg.models[0]
    api = cfg.api
    assert api is not None
    end_ckpt = open_checkpoint(m.source, end_model=True)
    native = bool(stages) and all(isinstance(s, NativeExecutor) for s in stages)
    end_model = EndModel(end_ckpt, dtype=dtype, native_head=native)
    chain = list(stages)
    if span[1] < ckpt.num_layers:
        chain.append(RemoteStage(node, span[1], ckpt.num_layers))
    generator = Generator(end_model, chain)
    host, port = check_api_listen(api.listen, api.api_keys)
    engine = Engine(generator, **api.engine_options())
    name = model_name(m)
    info = NodeInfo(node_id=cfg.node_id, source=m.source, executors=_executor_names(generator))
    app = build_app(Service(engine, name, info=info, api_keys=api.api_keys, limits=api.request_limits()))
    print(
        f"serving {name} on http://{api.listen}/v1 (node {cfg.node_id}; Ctrl-C to stop)",
        file=sys.stderr,
        flush=True,
    )
    return engine, uvicorn.Server(server_config(app, host, port, api.http_limits()))


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
