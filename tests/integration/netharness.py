"""A harness for networks of real `lpipes serve` processes on 127.0.0.1 (QUIC between them).

Every process is started with its own TOML file, log and frame trace under one temporary folder,
and killed by PID in :meth:`Network.stop_all`.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest
import torch

from lpipes.cli.netstatus import query_network
from lpipes.config import load_config
from lpipes.models.checkpoint import open_checkpoint
from lpipes.node import Faults, Node, NodeSettings
from lpipes.runtime.local import make_executor
from lpipes.swarm.planning import Hop

STARTUP_TIMEOUT_S = 120


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_process_node(node_id: str, key: bytes | None, *, bootstrap=(), **settings) -> Node:
    """A node in this process, on 127.0.0.1 with real QUIC, for tests of the network layer itself (no
    model: records, links, handshakes); ``settings`` override the defaults below."""
    defaults = {
        "listen": "127.0.0.1:0",
        "model": "tiny",
        "model_hash": "0" * 16,
        "num_layers": 6,
        "hidden_size": 8,
        "gossip_interval_s": 60.0,  # gossip only when a test asks (join, announce)
    }
    return Node(
        NodeSettings(node_id=node_id, bootstrap=tuple(bootstrap), key=key, **{**defaults, **settings})
    )


def step_node(node_id: str, key: bytes, hidden: int, end_model: bool = False, **settings) -> Node:
    """An in-process node of a two-layer model for step tests (``settings``: more NodeSettings)."""
    return Node(
        NodeSettings(
            node_id=node_id,
            listen="127.0.0.1:0",
            key=key,
            model="tiny",
            model_hash="h",
            num_layers=2,
            hidden_size=hidden,
            end_model=end_model,
            gossip_interval_s=60.0,
            **settings,
        )
    )


async def two_hops(path, faults: Faults, scenario, **settings) -> None:
    """origin → peer-a [0, 1) → peer-b [1, 2) → origin: in-process nodes on this loop, real QUIC,
    ``faults`` injected on peer-a, ``settings`` on every node; runs ``scenario(origin, route, hidden)``
    (``two_hops.nodes``: peer-a, peer-b, origin)."""
    key = secrets.token_bytes(32)
    nodes: list[Node] = []
    two_hops.nodes = nodes  # for a scenario that reaches into the peers
    try:
        hops = []
        for name, (start, end) in (("peer-a", (0, 1)), ("peer-b", (1, 2))):
            ckpt = open_checkpoint(path, layers=(start, end), end_model=False)
            hidden = int(ckpt.text_config.hidden_size)
            node = step_node(name, key, hidden, **settings)
            nodes.append(node)
            await node.start()
            node.executor = make_executor(
                ckpt, start, end, dtype=torch.float32, executor="reference", kv_cache_bytes=1 << 22
            )
            node.span, node.ready = (start, end), True
            hops.append(Hop(name, node.address, start, end))
        nodes[0].faults = faults
        origin = step_node("origin", key, hidden, end_model=True, **settings)
        nodes.append(origin)
        await origin.start()
        await scenario(origin, hops, hidden)
    finally:
        for node in nodes:
            await node.close()


def one_step(
    origin: Node, route: list[Hop], hidden: int, session: str, pos: int, x: torch.Tensor | None = None
):
    """The awaitable of one decode step of ``session`` at ``pos`` over ``route`` (random input by default)."""
    x = torch.randn(1, hidden) if x is None else x
    return origin.run_step(route, [session], [1], {"hidden": x, "positions": torch.tensor([pos])})


CONTEXT = 2048  # room for long streams in the failover tests


@dataclass
class Proc:
    name: str
    config: Path
    proc: subprocess.Popen
    log: Path
    trace: Path
    log_offset: int = 0  # where this run's lines start in ``log`` (a restart appends)


@dataclass
class Network:
    root: Path
    model: Path
    key: Path
    procs: dict[str, Proc] = field(default_factory=dict)

    def start(
        self,
        name: str,
        *,
        layers: str,
        origin: bool = False,
        bootstrap: str | None = None,
        key: Path | None = None,
        extra_model: str = "",
        extra_api: str = "",
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> Proc:
        """Write ``name``'s TOML file and start it (``env``: extra environment, e.g. fault injection)."""
        quic = free_port(socket.SOCK_DGRAM)
        lines = [
            f'node_id = "{name}"',
            "[network]",
            f'listen = "127.0.0.1:{quic}"',
            f'key_file = "{key or self.key}"',
            "gossip_interval_s = 0.3",
            "peer_timeout_s = 3.0",
            "join_timeout_s = 5.0",
        ]
        if bootstrap:
            lines.append(f'bootstrap = ["{bootstrap}"]')
        if origin:
            lines += ["[api]", f'listen = "127.0.0.1:{free_port()}"', extra_api]
        lines += [
            "[[models]]",
            f'path = "{self.model}"',
            f"layers = {layers}",
            'dtype = "float32"',
            f"end_model = {'true' if origin else 'false'}",
            extra_model,
        ]
        cfg = self.root / f"{name}.toml"
        cfg.write_text("\n".join(lines) + "\n")
        return self.launch(name, cfg, env=env, wait=wait)

    def launch(self, name: str, cfg: Path, *, env: dict[str, str] | None = None, wait: bool = True) -> Proc:
        """Start ``lpipes serve --config cfg`` as ``name`` (again, after :meth:`kill`: same address)."""
        log = self.root / f"{name}.log"
        trace = self.root / f"{name}.frames.jsonl"
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "LPIPES_NUM_THREADS": "1",
            "LPIPES_TRACE_FRAMES": str(trace),
            **(env or {}),
        }
        offset = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "lpipes.cli.main", "-v", "serve", "--config", str(cfg)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=out,
            )
        p = Proc(name, cfg, proc, log, trace, offset)
        self.procs[name] = p
        if wait:
            self.wait_ready(p)
        return p

    def address(self, name: str) -> str:
        return load_config(self.procs[name].config).network.listen

    def api(self, name: str) -> str:
        cfg = load_config(self.procs[name].config)
        assert cfg.api is not None
        return f"http://{cfg.api.listen}"

    def status(self, name: str) -> dict:
        return query_network(load_config(self.procs[name].config), timeout=5.0)

    def wait_ready(self, p: Proc) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if p.proc.poll() is not None:
                pytest.fail(f"{p.name} exited with {p.proc.returncode}:\n{p.log.read_text()[-3000:]}")
            log = p.log.read_bytes()[p.log_offset :]
            if b" of " in log and b"peers on quic://" in log:
                if "[api]" not in p.config.read_text():
                    return
                try:
                    with urllib.request.urlopen(self.api(p.name) + "/health", timeout=2) as r:
                        if r.status == 200:
                            return
                except OSError:
                    pass
            time.sleep(0.2)
        pytest.fail(f"{p.name} did not become ready:\n{p.log.read_text()[-3000:]}")

    def wait_coverage(self, name: str, n_peers: int, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        data: dict = {}
        while time.monotonic() < deadline:
            data = self.status(name)
            ready = [p for p in data["peers"] if p["ready"]]
            if len(ready) >= n_peers and not data["uncovered"]:
                return data
            time.sleep(0.2)
        pytest.fail(f"the network did not cover every layer in time: {data}")

    def kill(self, name: str) -> None:
        p = self.procs[name]
        p.proc.send_signal(signal.SIGKILL)
        p.proc.wait(timeout=30)

    def restart(self, name: str, *, wait: bool = True) -> Proc:
        """Start a killed node again from its own TOML file (same node id, same address)."""
        return self.launch(name, self.procs[name].config, wait=wait)

    def signal(self, name: str, sig: int) -> None:
        """Send ``sig`` (e.g. SIGSTOP / SIGCONT) to ``name``'s process, by PID."""
        self.procs[name].proc.send_signal(sig)

    def rss_mb(self, name: str) -> float:
        """Resident memory of ``name``'s process, MiB."""
        with open(f"/proc/{self.procs[name].proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS for {name}")

    def kv_used(self, name: str) -> dict[str, int]:
        """Every peer's used KV blocks, as ``name`` sees the network."""
        return {p["node_id"]: p["kv_blocks_used"] for p in self.status(name)["peers"]}

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.proc.poll() is None:
                p.proc.kill()  # by PID, always
            p.proc.wait(timeout=30)

    def frames(self, name: str) -> list[dict]:
        path = self.procs[name].trace
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]


def new_network(tmp_path_factory, model_dir: Path) -> Network:
    root = tmp_path_factory.mktemp("net")
    key = root / "network.key"
    key.write_text(secrets.token_hex(32) + "\n")
    return Network(root, model_dir, key)


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)


def hf_greedy(hf, prompt: str, n: int) -> tuple[list[int], str]:
    """transformers' greedy continuation of ``prompt`` (``hf`` = (tokenizer, full model))."""
    tok, full = hf
    ids = tok(prompt)["input_ids"]
    out = full.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids) :]
    return out.tolist(), tok.decode(out, skip_special_tokens=True)


def tiny_network_model(tmp_path_factory) -> Path:
    """The seeded tiny Qwen3 checkpoint the network tests share (context ``CONTEXT``)."""
    from lpipes.models.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("net-model") / "tiny-qwen3",
        "qwen3",
        seed=0,
        config_overrides={"max_position_embeddings": CONTEXT},
    )


def transformers_model(path: Path):
    """(tokenizer, full float32 model) of ``path``, EOS off (fixed-length greedy references)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path)
    full = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    full.generation_config.eos_token_id = None
    return tok, full
