"""The peer network end to end: real `lpipes serve` processes on 127.0.0.1 talking QUIC.

An origin (end model, API, first span) and layer peers; output compared with transformers' greedy
output through the OpenAI API; ``auto`` assignment; failover when a layer peer is killed
mid-stream (with and without a redundant peer); authentication; hostile frames sent to a live peer;
and the privacy boundary (every frame a layer peer decoded, as its frame trace records it).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import transformers
from netharness import (
    Network,
    client,
    hf_greedy,
    new_network,
    tiny_network_model,
    transformers_model,
)

from lpipes.models.tiny import make_tiny_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_network_model(tmp_path_factory)


@pytest.fixture(scope="module")
def hf(model_dir):
    return transformers_model(model_dir)


# ------------------------------------------------------------------------- three peers
@pytest.fixture(scope="module")
def three(tmp_path_factory, model_dir):
    net = new_network(tmp_path_factory, model_dir)
    try:
        net.start("origin", layers="[0, 2]", origin=True)
        net.start("peer-a", layers="[2, 4]", bootstrap=net.address("origin"))
        net.start("peer-b", layers="[4, 6]", bootstrap=net.address("origin"))
        net.wait_coverage("origin", 3)
        yield net
    finally:
        net.stop_all()


def test_three_peers_match_transformers(three, hf):
    prompt = "The peer network"
    _tokens, text = hf_greedy(hf, prompt, 16)
    reply = client(three.api("origin")).completions.create(
        model="tiny-qwen3", prompt=prompt, temperature=0, max_tokens=16, extra_body={"ignore_eos": True}
    )
    assert reply.choices[0].text == text
    stream = client(three.api("origin")).completions.create(
        model="tiny-qwen3",
        prompt=prompt,
        temperature=0,
        max_tokens=16,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == text


def test_concurrent_requests_match_alone_and_cancels_free_every_kv_block(three, hf):
    """Concurrent greedy requests (different prompts and lengths) batch on every node and each gets
    the tokens it gets alone (transformers); then a mixed load where some streams are dropped
    mid-way leaves no KV block used on any node."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    base = three.api("origin")
    jobs = [
        ("The peer network", 12),
        ("Hello there, how are you doing today, my friend?", 7),
        ("a", 16),
        ("Batching concurrent sessions' decode steps into one layer call", 9),
        ("one two three four five six seven eight nine ten", 14),
    ]
    expected = [hf_greedy(hf, p, n)[1] for p, n in jobs]

    def complete(job: tuple[str, int]) -> str:
        prompt, n = job
        reply = client(base).completions.create(
            model="tiny-qwen3", prompt=prompt, temperature=0, max_tokens=n, extra_body={"ignore_eos": True}
        )
        return reply.choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        assert list(pool.map(complete, jobs)) == expected
    engine = httpx.get(base + "/lpipes/status", timeout=10).json()["engine"]
    assert engine["max_batch_seen"] > 1, engine

    rng = random.Random(7)
    plans = [rng.choice([None, 1, 3, 8]) for _ in range(8)]  # None: read to the end; k: drop after k chunks

    def stream(i: int) -> int:
        s = client(base).completions.create(
            model="tiny-qwen3",
            prompt=f"stream {i} " + "words " * rng.randint(1, 30),
            temperature=0,
            max_tokens=40,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        n = 0
        for _chunk in s:
            n += 1
            if plans[i] is not None and n >= plans[i]:
                s.close()  # the client goes away: the server cancels the request
                break
        return n

    with ThreadPoolExecutor(len(plans)) as pool:
        list(pool.map(stream, range(len(plans))))
    assert any(p is not None for p in plans) and any(p is None for p in plans)
    deadline = time.monotonic() + 20
    used: dict = {}
    while time.monotonic() < deadline:
        used = {p["node_id"]: p["kv_blocks_used"] for p in three.status("origin")["peers"]}
        if set(used) == {"origin", "peer-a", "peer-b"} and not any(used.values()):
            break
        time.sleep(0.3)
    assert set(used) == {"origin", "peer-a", "peer-b"} and not any(used.values()), used


def test_status_json_lists_every_peer(three):
    data = three.status("peer-a")
    by_id = {p["node_id"]: p for p in data["peers"]}
    assert set(by_id) == {"origin", "peer-a", "peer-b"}
    assert data["coverage"] == [1] * 6 and data["uncovered"] == []
    for p in by_id.values():
        for key in (
            "node_id",
            "address",
            "model",
            "layers",
            "kv_blocks_used",
            "kv_blocks_total",
            "last_seen",
        ):
            assert key in p
        assert p["kv_blocks_total"] > 0 and abs(time.time() - p["last_seen"]) < 10
    assert by_id["peer-b"]["layers"] == [4, 6] and by_id["origin"]["end_model"]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lpipes.cli.main",
            "status",
            "--config",
            str(three.procs["origin"].config),
            "--json",
        ],
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert {p["node_id"] for p in json.loads(out.stdout)["peers"]} == {"origin", "peer-a", "peer-b"}


def test_layer_peers_never_see_token_ids(three, hf):
    tok, _ = hf
    prompt = "secret words go here"
    ids = tok(prompt)["input_ids"]
    client(three.api("origin")).completions.create(
        model="tiny-qwen3", prompt=prompt, temperature=0, max_tokens=4, extra_body={"ignore_eos": True}
    )
    allowed_meta = {"step", "origin", "reply_to", "sessions", "lens", "route", "hop"}
    seen_forward = 0
    for name in ("peer-a", "peer-b"):
        for f in three.frames(name):
            assert f["type"] in ("FORWARD", "END_SESSION", "GOSSIP", "PING", "HELLO"), f["type"]
            if f["type"] != "FORWARD":
                assert not f["tensors"]
                continue
            seen_forward += 1
            assert set(f["meta"]) == allowed_meta
            assert set(f["tensors"]) == {"hidden", "positions"}
            assert f["tensors"]["hidden"][0] == "float32" and f["tensors"]["positions"][0] == "int64"
            # Each session's positions are 0..n-1 then one per step: never the prompt's token ids.
            off = 0
            for n in f["meta"]["lens"]:
                pos = f["positions"][off : off + n]
                off += n
                assert pos == list(range(pos[0], pos[0] + len(pos)))
                if len(pos) >= 3:  # (one number may equal a token id by chance)
                    assert pos != ids[: len(pos)] or pos == list(range(len(pos)))
            assert off == len(f["positions"])
            assert prompt not in json.dumps(f["meta"])
    assert seen_forward >= 2 * 4  # the prefill and 3 decode steps, on each peer


def test_hostile_frames_get_errors_and_the_peer_keeps_serving(three, hf):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from lpipes.net.auth import load_key
    from lpipes.net.transport import PeerConnection, read_frame
    from lpipes.wire import Frame, MessageType, WireLimits, encode_bytes

    host, _, port = three.address("peer-a").rpartition(":")
    key = load_key(three.key)

    async def send_raw(conn, data: bytes):
        stream = await conn.open_stream()
        stream.writer.write(data)
        stream.writer.write_eof()
        try:
            return await read_frame(stream.reader, timeout=10)
        except Exception as exc:  # noqa: BLE001
            return exc

    async def run(blobs: list[bytes]):
        conn = await PeerConnection.open(host, int(port), node_id="fuzzer", key=key)
        try:
            replies = [await send_raw(conn, b) for b in blobs]
            pong = await conn.request(Frame(MessageType.PING), timeout=10)
            return replies, pong
        finally:
            await conn.close()

    good = encode_bytes(Frame(MessageType.PING, {"x": 1}))
    oversized = bytearray(good)
    oversized[24:32] = (1 << 40).to_bytes(8, "little")  # frame_len far over the limit
    forward_bad_meta = encode_bytes(
        Frame(
            MessageType.FORWARD,
            {"step": 1, "token_ids": [1, 2, 3]},
            {"hidden": torch.zeros(3, 64), "positions": torch.arange(3)},
        ),
        WireLimits(),
    )
    blobs = [b"garbage" * 10, bytes(good[:20]), bytes(good[:-3]), bytes(oversized), bytes(forward_bad_meta)]
    replies, pong = asyncio.run(run(blobs))
    assert pong.type == MessageType.PONG
    for blob, reply in zip(blobs, replies):
        assert isinstance(reply, Frame) and reply.type == MessageType.ERROR, (blob[:40], reply)
        assert reply.meta["code"] == "bad_frame"

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.binary(min_size=1, max_size=200), min_size=1, max_size=3))
    def fuzz(blobs):
        replies, pong = asyncio.run(run(blobs))
        assert pong.type == MessageType.PONG
        for r in replies:
            assert r is None or isinstance(r, (Frame, Exception))

    fuzz()
    # And it still computes: a generation through it matches transformers.
    _tokens, text = hf_greedy(hf, "still alive", 6)
    reply = client(three.api("origin")).completions.create(
        model="tiny-qwen3", prompt="still alive", temperature=0, max_tokens=6, extra_body={"ignore_eos": True}
    )
    assert reply.choices[0].text == text


def test_wrong_key_is_refused(three, tmp_path):
    from lpipes.net.auth import AuthError
    from lpipes.net.transport import PeerConnection

    host, _, port = three.address("origin").rpartition(":")
    with pytest.raises(AuthError):
        asyncio.run(PeerConnection.open(host, int(port), node_id="intruder", key=b"x" * 32))
    bad_key = tmp_path / "wrong.key"
    bad_key.write_text(secrets.token_hex(32))
    intruder = three.start(
        "intruder", layers="[2, 6]", bootstrap=three.address("origin"), key=bad_key, wait=False
    )
    deadline = time.monotonic() + 60
    while b"peers on quic://" not in intruder.log.read_bytes() and intruder.proc.poll() is None:
        assert time.monotonic() < deadline, intruder.log.read_text()[-2000:]
        time.sleep(0.3)
    time.sleep(1.5)  # several gossip rounds
    ids = {p["node_id"] for p in three.status("origin")["peers"]}
    assert "intruder" not in ids
    three.kill("intruder")


# -------------------------------------------------------------------------------- failover
def _stream_tokens(base: str, prompt: str, n: int):
    return client(base).completions.create(
        model="tiny-qwen3",
        prompt=prompt,
        temperature=0,
        max_tokens=n,
        stream=True,
        logprobs=0,
        extra_body={"ignore_eos": True},
    )


def _active_peer(net: Network, names: list[str]) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for name in names:
            me = net.status(name)["peers"][0]
            if me["kv_blocks_used"] > 0:
                return name
        time.sleep(0.05)
    pytest.fail("no peer holds the session's KV")


def test_killing_a_redundant_peer_mid_stream_keeps_the_same_tokens(tmp_path_factory, model_dir, hf):
    net = new_network(tmp_path_factory, model_dir)
    prompt = "Failover keeps going"
    n = 1200
    expected, text = hf_greedy(hf, prompt, n)
    try:
        net.start("origin", layers="[0, 2]", origin=True)
        net.start("b1", layers="[2, 6]", bootstrap=net.address("origin"))
        net.start("b2", layers="[2, 6]", bootstrap=net.address("origin"))
        net.wait_coverage("origin", 3)
        stream = _stream_tokens(net.api("origin"), prompt, n)
        chunks = []
        killed = None
        for chunk in stream:
            chunks.append(chunk)
            if killed is None and len(chunks) == 20:
                killed = _active_peer(net, ["b1", "b2"])
                net.kill(killed)
        assert killed is not None
        streamed = "".join(c.choices[0].text for c in chunks if c.choices)
        assert len([c for c in chunks if c.choices]) == n
        assert streamed == text
        # The survivor did the rest; the origin marked the dead one.
        survivor = "b2" if killed == "b1" else "b1"
        assert any(f["type"] == "FORWARD" for f in net.frames(survivor))
        assert "marked as failed" in net.procs["origin"].log.read_text()
    finally:
        net.stop_all()


def test_without_redundancy_the_client_gets_an_error_within_5s(tmp_path_factory, model_dir):
    net = new_network(tmp_path_factory, model_dir)
    try:
        net.start("origin", layers="[0, 2]", origin=True)
        net.start("only", layers="[2, 6]", bootstrap=net.address("origin"))
        net.wait_coverage("origin", 2)
        stream = _stream_tokens(net.api("origin"), "no spare peer", 1500)
        killed_at = None
        with pytest.raises(openai.APIError) as err:
            for i, _chunk in enumerate(stream):
                if i == 10:
                    net.kill("only")
                    killed_at = time.monotonic()
        assert killed_at is not None
        assert time.monotonic() - killed_at < 5.0
        assert "peer network" in str(err.value)
        # New requests fail fast too (503), never hang.
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as err2:
            client(net.api("origin")).completions.create(model="tiny-qwen3", prompt="x", max_tokens=2)
        assert err2.value.status_code == 503 and time.monotonic() - t0 < 5.0
    finally:
        net.stop_all()


def test_layer_peer_kv_pools_gate_admission(tmp_path_factory, model_dir, hf):
    """A layer peer's KV pool smaller than the load: the origin queues requests until the peer has
    room (never failing a step over on a full pool), every request gets transformers' tokens, and
    one that could never fit that pool is refused at once."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    cfg = json.loads((model_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    block_bytes = 4 * 2 * cfg["num_key_value_heads"] * 16 * head_dim * 4  # 4 layers, K+V, fp32
    blocks = 8  # 128 token positions per session at most, and in all
    net = new_network(tmp_path_factory, model_dir)
    try:
        net.start("origin", layers="[0, 2]", origin=True)
        net.start(
            "small",
            layers="[2, 6]",
            bootstrap=net.address("origin"),
            extra_model=f"kv_cache_gb = {(blocks * block_bytes + 512) / (1 << 30):.12f}",
        )
        data = net.wait_coverage("origin", 2)
        small = next(p for p in data["peers"] if p["node_id"] == "small")
        assert small["kv_blocks_total"] == blocks, small
        base = net.api("origin")

        # Each needs 3-4 blocks for its whole length: four at once would need twice the pool.
        jobs = [(f"request {i}: the pool is small", 40) for i in range(4)]
        expected = [hf_greedy(hf, p, n)[1] for p, n in jobs]

        def complete(job: tuple[str, int]) -> str:
            prompt, n = job
            reply = client(base).completions.create(
                model="tiny-qwen3",
                prompt=prompt,
                temperature=0,
                max_tokens=n,
                extra_body={"ignore_eos": True},
            )
            return reply.choices[0].text

        with ThreadPoolExecutor(len(jobs)) as pool:
            assert list(pool.map(complete, jobs)) == expected
        engine = httpx.get(base + "/lpipes/status", timeout=10).json()["engine"]
        assert engine["failovers"] == 0, engine

        # More than the peer's whole pool: refused before any work (400), not failed mid-stream.
        with pytest.raises(openai.BadRequestError) as err:
            client(base).completions.create(
                model="tiny-qwen3", prompt="too long", max_tokens=blocks * 16, extra_body={"ignore_eos": True}
            )
        assert "context" in str(err.value).lower()
    finally:
        net.stop_all()


def test_auto_assignment_covers_every_layer(tmp_path_factory, model_dir, hf):
    from lpipes.models.checkpoint import open_checkpoint
    from lpipes.runtime.local import weight_bytes

    ckpt = open_checkpoint(model_dir)
    two_layers_gb = (weight_bytes(ckpt, 0, 2, "float32") + 1024) / (1 << 30)
    net = new_network(tmp_path_factory, model_dir)
    budget = f"max_memory_gb = {two_layers_gb:.9f}"
    try:
        net.start("origin", layers='"auto"', origin=True, extra_model=budget)
        net.start("p1", layers='"auto"', bootstrap=net.address("origin"), extra_model=budget)
        net.start("p2", layers='"auto"', bootstrap=net.address("origin"), extra_model=budget)
        data = net.wait_coverage("origin", 3)
        spans = sorted(tuple(p["layers"]) for p in data["peers"])
        assert spans == [(0, 2), (2, 4), (4, 6)]
        _tokens, text = hf_greedy(hf, "auto", 8)
        reply = client(net.api("origin")).completions.create(
            model="tiny-qwen3", prompt="auto", temperature=0, max_tokens=8, extra_body={"ignore_eos": True}
        )
        assert reply.choices[0].text == text
    finally:
        net.stop_all()


def test_auto_peers_started_together_take_different_spans(tmp_path_factory, model_dir):
    # Two auto layer peers that start together see the same network and choose the same window
    # (made certain here: each makes its choice known only 3 s later); the one with the higher node
    # id must notice the other's claim and move.
    from lpipes.models.checkpoint import open_checkpoint
    from lpipes.runtime.local import weight_bytes

    ckpt = open_checkpoint(model_dir)
    budget = f"max_memory_gb = {(weight_bytes(ckpt, 0, 2, 'float32') + 1024) / (1 << 30):.9f}"
    net = new_network(tmp_path_factory, model_dir)
    try:
        net.start("origin", layers="[0, 2]", origin=True)
        peers = [
            net.start(
                name,
                layers='"auto"',
                bootstrap=net.address("origin"),
                extra_model=budget,
                env={"LPIPES_FAULTS": "claim_delay_ms=3000"},  # both choose before either is known
                wait=False,
            )
            for name in ("p1", "p2")
        ]
        for p in peers:
            net.wait_ready(p)
        data = net.wait_coverage("origin", 3)
        spans = {p["node_id"]: tuple(p["layers"]) for p in data["peers"]}
        assert sorted(spans.values()) == [(0, 2), (2, 4), (4, 6)], spans
    finally:
        net.stop_all()


def test_per_layer_inputs_travel_with_the_hidden_states(tmp_path_factory):
    # Gemma 4 layers take per-layer inputs next to the hidden state; a remote span gets its slice.
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("net-g4") / "tiny-gemma4", "gemma4_text", seed=0)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    full = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    full.generation_config.eos_token_id = None
    ids = tok("per layer")["input_ids"]
    out = full.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :]
    net = new_network(tmp_path_factory, path)
    try:
        net.start("origin", layers="[0, 2]", origin=True)
        net.start("rest", layers="[2, 6]", bootstrap=net.address("origin"))
        net.wait_coverage("origin", 2)
        reply = client(net.api("origin")).completions.create(
            model="tiny-gemma4",
            prompt="per layer",
            temperature=0,
            max_tokens=8,
            extra_body={"ignore_eos": True},
        )
        assert reply.choices[0].text == tok.decode(out, skip_special_tokens=True)
        forwards = [f for f in net.frames("rest") if f["type"] == "FORWARD"]
        assert forwards and all(f["tensors"]["per_layer"][1][1] == 4 for f in forwards)
    finally:
        net.stop_all()
