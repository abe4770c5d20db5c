"""Fixtures that start real `lpipes serve` processes on 127.0.0.1 and always stop them by PID."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    base: str  # http://127.0.0.1:PORT
    model: str  # the served model's name (its directory name)
    path: Path  # the checkpoint directory
    config: Path  # the node.toml the server was started from
    pid: int


def _wait_healthy(proc: subprocess.Popen, base: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}: {proc.stderr.read().decode()}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail("server did not become healthy in time")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def start_server(tiny_checkpoint, tmp_path_factory) -> Iterator[Callable[..., Served]]:
    """``start_server(arch="qwen3", api_extra="", model_extra="")`` → a running server (one per arguments).

    ``api_extra`` / ``model_extra`` are TOML lines appended to the ``[api]`` / ``[[models]]`` tables.
    Every server started is killed by PID at the end of the session.
    """
    procs: list[subprocess.Popen] = []
    started: dict[tuple, Served] = {}

    def start(arch: str = "qwen3", api_extra: str = "", model_extra: str = 'dtype = "float32"\n') -> Served:
        key = (arch, api_extra, model_extra)
        if key in started:
            return started[key]
        path = tiny_checkpoint(arch)
        port = free_port()
        cfg = tmp_path_factory.mktemp("serve") / "node.toml"
        cfg.write_text(
            f'node_id = "solo"\n[api]\nlisten = "127.0.0.1:{port}"\n{api_extra}'
            f'[[models]]\npath = "{path}"\nend_model = true\n{model_extra}'
        )
        started[key] = serve_config(cfg, f"http://127.0.0.1:{port}", path)
        return started[key]

    def serve_config(cfg: Path, base: str, path: Path) -> Served:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lpipes.cli.main", "serve", "--config", str(cfg)],
            env={**os.environ, "HF_HUB_OFFLINE": "1", "LPIPES_NUM_THREADS": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        procs.append(proc)
        _wait_healthy(proc, base)
        return Served(base, path.name, path, cfg, proc.pid)

    start.serve_config = serve_config  # type: ignore[attr-defined]

    try:
        yield start
    finally:
        for proc in procs:
            proc.kill()  # by PID, always
            proc.wait(timeout=30)
            proc.stderr.close()


@pytest.fixture(scope="module")
def server(start_server) -> Served:
    """The default server: the tiny qwen3 checkpoint in float32, no API keys."""
    return start_server()


@pytest.fixture(scope="session", name="free_port")
def free_port_fixture() -> Callable[[], int]:
    """``free_port()``: a TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_port


@pytest.fixture(scope="session")
def wait_healthy() -> Callable[[subprocess.Popen, str], None]:
    """``wait_healthy(proc, base_url)``: return once /health answers 200; fail if the process exits."""
    return _wait_healthy
