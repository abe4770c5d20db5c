"""`lpipes chat` and `lpipes status`: pure helpers, plus the commands against a real `lpipes serve`."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator

import httpx
import pytest
from rich.console import Console

from lpipes.cli.client import (
    ApiClient,
    ChatSession,
    ServerError,
    chat_loop,
    error_message,
    human_bytes,
    human_duration,
    iter_sse_deltas,
    normalize_url,
    status_table,
    url_from_listen,
    validate_status,
)
from lpipes.errors import LpipesError

TIMEOUT_S = 120

SAMPLE_STATUS = {
    "node_id": "solo",
    "version": "0.1.0",
    "uptime_s": 3725.5,
    "model": {
        "name": "tiny-qwen3",
        "source": "/models/tiny-qwen3",
        "num_layers": 6,
        "context_length": 256,
        "end_model": True,
        "dtype": "float16",
    },
    "stages": [
        {
            "layers": [0, 6],
            "executor": "native",
            "kv_blocks_used": 300,
            "kv_blocks_total": 1200,
            "kv_block_size": 16,
            "kv_block_bytes": 4096,
            "sessions": 2,
            "something_new": {"ignored": True},
        }
    ],
    "requests": {"active": 1, "queued": 3, "served": 10},
    "extra_top_level": [1, 2, 3],
}


def _cli(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    env.pop("LPIPES_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "lpipes.cli.main", *args],
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=TIMEOUT_S,
        env=env,
    )


def _complete(base: str, model: str, messages: list[dict[str, str]], max_tokens: int = 8) -> str:
    r = httpx.post(
        base + "/v1/chat/completions",
        json={"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens},
        timeout=TIMEOUT_S,
    )
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _render(renderable: object) -> str:
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


# ---------------------------------------------------------------------------------------------- pure


def test_iter_sse_deltas():
    lines = [
        ": keep-alive comment",
        'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}',
        "",
        'data: {"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": null}]}',
        "event: ignored",
        'data:{"choices": [{"index": 0, "delta": {"content": "lo"}}]}\r\n',
        'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}',
        'data: {"choices": [], "usage": {"completion_tokens": 2}}',
        "data: [DONE]",
        'data: {"choices": [{"index": 0, "delta": {"content": "after done"}}]}',
    ]
    assert list(iter_sse_deltas(lines)) == ["Hel", "lo"]


def test_iter_sse_deltas_errors():
    with pytest.raises(LpipesError, match=r"ended before `data: \[DONE\]`"):
        list(iter_sse_deltas(['data: {"choices": [{"delta": {"content": "x"}}]}']))
    with pytest.raises(LpipesError, match="malformed stream chunk"):
        list(iter_sse_deltas(["data: {not json"]))
    with pytest.raises(LpipesError, match="mid-stream: out of KV blocks"):
        list(iter_sse_deltas(['data: {"error": {"message": "out of KV blocks", "type": "x"}}']))


def test_url_helpers():
    for url in ("http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/", "h:1", " h:1/v1 "):
        assert normalize_url(url) == "http://h:1"
    assert normalize_url("https://example.com/api/v1") == "https://example.com/api"
    with pytest.raises(LpipesError, match="http"):
        normalize_url("ftp://h:1")
    assert url_from_listen("127.0.0.1:8000") == "http://127.0.0.1:8000"
    assert url_from_listen("0.0.0.0:9000") == "http://127.0.0.1:9000"
    assert url_from_listen("[::]:9000") == "http://[::1]:9000"


def test_human_units_and_error_message():
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1.2 * 1024 * 1024) == "1.2 MiB"
    assert human_bytes(512 * 1024**2) == "512.0 MiB"
    assert human_bytes(3 * 1024**3) == "3.0 GiB"
    assert human_duration(12.5) == "12s"
    assert human_duration(185) == "3m 05s"
    assert human_duration(2 * 3600 + 3 * 60) == "2h 03m"
    assert human_duration(26 * 3600) == "1d 02h"
    body = json.dumps({"error": {"message": "bad key", "type": "authentication_error"}})
    assert error_message(body.encode(), "x") == "bad key"
    assert error_message(b"Not Found", "x") == "Not Found"
    assert error_message(b"", "Bad Gateway") == "Bad Gateway"


def test_status_table_renders_span_and_kv():
    text = _render(status_table(SAMPLE_STATUS, url="http://127.0.0.1:8000"))
    assert "solo" in text and "0.1.0" in text and "1h 02m" in text and "http://127.0.0.1:8000" in text
    assert "tiny-qwen3" in text and "/models/tiny-qwen3" in text
    assert "[0, 6) of 6" in text
    assert "native" in text and "float16" in text and "256" in text and "yes" in text
    assert "300 / 1200" in text and "25.0%" in text
    assert "1.2 MiB / 4.7 MiB" in text  # 300 and 1200 blocks of 4 KiB
    assert "16 tokens" in text
    assert "1 active, 3 queued, 10 served" in text


def test_status_table_two_stages_and_optional_keys():
    data = {
        "node_id": "n2",
        "model": {"name": "m", "num_layers": 8},
        "stages": [
            {"layers": [0, 2], "kv_blocks_used": 0, "kv_blocks_total": 0},
            {"layers": [5, 8], "kv_blocks_used": 1, "kv_blocks_total": 4, "kv_block_bytes": 1024},
        ],
        "requests": {"active": 0, "queued": 0, "served": 0},
    }
    text = _render(status_table(data))
    assert "[0, 2), [5, 8) of 8" in text
    assert "1 / 4" in text and "25.0%" in text and "1.0 KiB / 4.0 KiB" in text


def test_validate_status_names_missing_keys():
    bad = json.loads(json.dumps(SAMPLE_STATUS))
    del bad["model"]["name"]
    del bad["stages"][0]["kv_blocks_total"]
    del bad["requests"]
    with pytest.raises(LpipesError) as err:
        validate_status(bad)
    msg = str(err.value)
    assert "model.name" in msg and "stages[0].kv_blocks_total" in msg and "requests" in msg
    with pytest.raises(LpipesError, match="not a JSON object"):
        validate_status([1, 2])
    bad = json.loads(json.dumps(SAMPLE_STATUS))
    bad["stages"][0]["layers"] = "0-6"
    with pytest.raises(LpipesError, match=r"stages\[0\].layers as \[start, end\)"):
        validate_status(bad)


def test_status_404_says_not_an_lpipes_node():
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer sekrit"
        return httpx.Response(404, text="Not Found")

    with ApiClient("http://node:1/v1", api_key="sekrit") as client:
        client.http.close()
        client.http = httpx.Client(
            base_url=client.base, headers=client.http.headers, transport=httpx.MockTransport(handler)
        )
        with pytest.raises(LpipesError, match="does not report status; is it an lpipes node"):
            client.status()


def test_status_config_of_a_node_that_is_not_running(tmp_path, free_port):
    # A layer peer (no [api]) is asked over the peer network; nothing answers there.
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'node_id = "a"\n[network]\nlisten = "127.0.0.1:{free_port()}"\n[[models]]\npath = "m"\n')
    res = _cli("status", "--config", str(cfg))
    assert res.returncode == 2
    assert "no node answers on 127.0.0.1:" in res.stderr and res.stdout == ""


# ------------------------------------------------------------------------------------- chat (server)


def test_chat_one_shot_matches_non_streaming(server):
    expected = _complete(server.base, server.model, [{"role": "user", "content": "Hello"}])
    res = _cli("chat", "-m", "Hello", "--url", server.base, "--temperature", "0", "--max-tokens", "8")
    assert res.returncode == 0, res.stderr
    assert res.stdout == expected + "\n"


def test_chat_stdin_one_shot_with_v1_url_and_system(server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    expected = _complete(server.base, server.model, messages)
    res = _cli(
        "chat",
        "--url",
        server.base + "/v1/",
        "--model",
        server.model,
        "--system",
        "Be brief.",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "--seed",
        "1",
        input="Hello there\n",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == expected + "\n"


def test_chat_empty_stdin_is_an_error(server):
    res = _cli("chat", "--url", server.base, input="  \n")
    assert res.returncode == 2
    assert "no message" in res.stderr and res.stdout == ""


def test_chat_unknown_model_reports_server_error(server):
    res = _cli("chat", "-m", "Hello", "--url", server.base, "--model", "nope")
    assert res.returncode == 2
    assert res.stdout == ""
    assert "lpipes: error: model 'nope' does not exist" in res.stderr
    assert "(HTTP 404)" in res.stderr


def test_chat_nothing_listening():
    url = _dead_url()
    res = _cli("chat", "-m", "Hello", "--url", url)
    assert res.returncode == 2
    assert res.stdout == ""
    assert f"cannot connect to {url}" in res.stderr and "lpipes serve" in res.stderr


# ------------------------------------------------------------------------ interactive loop (in-process)


def _reader(lines: list[str]) -> Callable[[], str]:
    it: Iterator[str] = iter(lines)

    def read() -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read


def test_chat_loop_history_and_reset(server):
    hello = [{"role": "user", "content": "Hello"}]
    first = _complete(server.base, server.model, hello)
    out: list[str] = []
    notes: list[str] = []
    with ApiClient(server.base) as client:
        session = ChatSession(client, client.first_model(), temperature=0, max_tokens=8)
        assert session.model == server.model
        rc = chat_loop(session, _reader(["Hello", "", "again"]), out.append, notes.append)
        assert rc == 0  # EOF (Ctrl-D) at the prompt
        assert session.messages[0] == {"role": "user", "content": "Hello"}
        assert session.messages[1] == {"role": "assistant", "content": first}
        assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
        second = _complete(server.base, server.model, [*session.messages[:3]])
        assert session.messages[3]["content"] == second
        assert "".join(out) == first + "\n" + second + "\n" + "\n"

        out.clear()
        rc = chat_loop(session, _reader(["/reset", "Hello", "/quit", "never sent"]), out.append, notes.append)
        assert rc == 0
        assert "(conversation reset)" in notes
        assert session.messages == [*hello, {"role": "assistant", "content": first}]
        assert "".join(out) == first + "\n"


def test_chat_loop_system_kept_on_reset_and_errors_keep_looping(server):
    notes: list[str] = []
    with ApiClient(server.base) as client:
        session = ChatSession(client, "nope", system="Be brief.", temperature=0, max_tokens=4)
        rc = chat_loop(session, _reader(["Hello", "/bogus", "/exit"]), lambda s: None, notes.append)
        assert rc == 0
        assert any("model 'nope' does not exist" in n and "(HTTP 404)" in n for n in notes), notes
        assert any("unknown command /bogus" in n for n in notes)
        assert session.messages == [{"role": "system", "content": "Be brief."}]  # failed turn not kept

        session.model = server.model
        chat_loop(session, _reader(["Hi", "/reset"]), lambda s: None, notes.append)
        assert session.messages == [{"role": "system", "content": "Be brief."}]


def test_chat_loop_ctrl_c_cancels_reply_then_continues(server):
    expected = _complete(server.base, server.model, [{"role": "user", "content": "Hello"}])
    assert expected, "the test needs a non-empty reply to interrupt"
    out: list[str] = []
    notes: list[str] = []
    state = {"interrupted": False}

    def write(text: str) -> None:
        if text.strip() and not state["interrupted"]:
            state["interrupted"] = True
            raise KeyboardInterrupt  # Ctrl-C while the first reply streams
        out.append(text)

    with ApiClient(server.base) as client:
        session = ChatSession(client, server.model, temperature=0, max_tokens=8)
        rc = chat_loop(session, _reader(["Hello", "Hello"]), write, notes.append)
        assert rc == 0
        assert "(reply cancelled)" in notes
        assert session.messages == [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": expected},
        ]
        assert expected in "".join(out)


def test_chat_loop_ctrl_c_at_prompt_exits():
    def read() -> str:
        raise KeyboardInterrupt

    with ApiClient(_dead_url()) as client:
        session = ChatSession(client, "m")
        assert chat_loop(session, read, lambda s: None, lambda s: None) == 0


def test_server_error_str():
    assert str(ServerError("bad key", 401)) == "bad key (HTTP 401)"


# ----------------------------------------------------------------------------------- status (server)
# Needs the server's GET /lpipes/status.


def test_status_against_server(server):
    res = _cli("status", "--url", server.base, "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    validate_status(data)
    assert data["node_id"] == "solo"
    assert data["model"]["num_layers"] == 6
    assert [st["layers"] for st in data["stages"]] == [[0, 6]]

    res = _cli("status", "--config", str(server.config))
    assert res.returncode == 0, res.stderr
    assert "solo" in res.stdout and "[0, 6) of 6" in res.stdout and server.base in res.stdout
    total = data["stages"][0]["kv_blocks_total"]
    assert f"/ {total}" in res.stdout
