"""The rest of the OpenAI surface against real `lpipes serve` processes: async and concurrent clients,
stop strings, seeds, logprobs, n, content parts and tools, API keys, capacity (503), cancel, metrics,
and a config written by `lpipes init`."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch
import transformers

TIMEOUT_S = 60


def _client(base: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=TIMEOUT_S)


def _metrics(base: str) -> dict[str, float]:
    """Sum of every sample of each metric name (over labels)."""
    out: dict[str, float] = {}
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            name = name_labels.split("{", 1)[0]
            out[name] = out.get(name, 0.0) + float(value)
    return out


@pytest.fixture(scope="module")
def hf(server):
    tok = transformers.AutoTokenizer.from_pretrained(server.path)
    full = transformers.AutoModelForCausalLM.from_pretrained(server.path, dtype=torch.float32).eval()
    full.generation_config.eos_token_id = None
    full.generation_config.pad_token_id = None
    return tok, full


def _greedy(hf, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    tok, full = hf
    out = full.generate(
        torch.tensor([ids]),
        max_new_tokens=n,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, len(ids) :].tolist()
    logprobs = torch.log_softmax(torch.stack(out.logits)[:, 0].float(), dim=-1)
    return tokens, logprobs


def test_async_concurrent_requests_equal_sequential_greedy(server, hf):
    tok, _ = hf
    prompts = ["One fish", "Two fish, red fish", "Blue fish and a much longer prompt than the others"]
    expected = []
    for p in prompts:
        tokens, _ = _greedy(hf, tok(p)["input_ids"], 10)
        expected.append(tok.decode(tokens, skip_special_tokens=True))

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(
            base_url=server.base + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT_S
        )
        async with client:

            async def one(p: str, stream: bool) -> str:
                kw = dict(
                    model=server.model,
                    prompt=p,
                    temperature=0,
                    max_tokens=10,
                    extra_body={"ignore_eos": True},
                )
                if not stream:
                    return (await client.completions.create(**kw)).choices[0].text
                parts = []
                async for chunk in await client.completions.create(stream=True, **kw):
                    parts.append(chunk.choices[0].text)
                return "".join(parts)

            return await asyncio.gather(*(one(p, i % 2 == 1) for i, p in enumerate(prompts)))

    assert asyncio.run(run()) == expected


def test_stop_string_is_cut_and_not_emitted(server):
    client = _client(server.base)
    kw = dict(model=server.model, prompt="Once upon a time", temperature=0, max_tokens=24)
    full = client.completions.create(extra_body={"ignore_eos": True}, **kw).choices[0].text
    assert len(full) > 8
    stop = full[5:8]
    cut = full[: full.index(stop)]
    for stream in (False, True):
        if stream:
            chunks = list(client.completions.create(stream=True, stop=[stop, "\x00never"], **kw))
            text = "".join(c.choices[0].text for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            reply = client.completions.create(stop=stop, **kw)
            text, finish = reply.choices[0].text, reply.choices[0].finish_reason
        assert text == cut and stop not in text
        assert finish == "stop"


def test_seed_makes_sampling_reproducible_and_n_gives_independent_choices(server):
    client = _client(server.base)
    kw = dict(model=server.model, prompt="Random words:", temperature=1.0, max_tokens=16)
    kw["extra_body"] = {"ignore_eos": True}
    a = client.completions.create(seed=1234, **kw).choices[0].text
    b = client.completions.create(seed=1234, **kw).choices[0].text
    assert a == b
    many = client.completions.create(seed=1234, n=3, **kw)
    texts = [c.text for c in sorted(many.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(many.choices, key=lambda c: c.index)] == [0, 1, 2]
    assert texts[0] == a  # choice i uses seed + i
    assert len(set(texts)) > 1
    assert many.usage.completion_tokens == 48
    stream = list(client.completions.create(seed=1234, n=3, stream=True, **kw))
    joined = [
        "".join(c.choices[0].text for c in stream if c.choices and c.choices[0].index == i) for i in range(3)
    ]
    assert joined == texts


def test_chat_logprobs_match_transformers(server, hf):
    tok, _ = hf
    messages = [{"role": "user", "content": "Count with me"}]
    reply = _client(server.base).chat.completions.create(
        model=server.model,
        messages=messages,
        temperature=0,
        max_tokens=6,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    tokens, ref = _greedy(hf, ids, 6)
    content = reply.choices[0].logprobs.content
    assert len(content) == 6
    for step, (entry, token) in enumerate(zip(content, tokens)):
        assert entry.token == tok.decode([token])
        assert abs(entry.logprob - ref[step, token].item()) < 1e-4
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        top_ref = torch.topk(ref[step], 3).values.tolist()
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top_ref, abs=1e-4)


def test_completion_logprobs_shape(server):
    reply = _client(server.base).completions.create(
        model=server.model,
        prompt="abc",
        temperature=0.5,
        seed=3,
        max_tokens=5,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_content_parts_and_tool_messages(server):
    client = _client(server.base)
    plain = client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "Hi there"}], temperature=0, max_tokens=4
    )
    parts = client.chat.completions.create(
        model=server.model,
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}
        ],
        temperature=0,
        max_tokens=4,
    )
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError, match="text only"):
        client.chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        )
    tools = client.chat.completions.create(
        model=server.model,
        messages=[
            {"role": "user", "content": "What is the weather?"},
            {"role": "assistant", "content": "Let me check."},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
        ],
        tools=[{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
        max_tokens=3,
    )
    assert tools.usage.completion_tokens >= 1


@pytest.mark.parametrize(
    ("body", "status", "match"),
    [
        ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ({"prompt": "x", "n": 0}, 400, "n"),
        ({"prompt": "x", "temperature": 7e9}, 400, "temperature"),
        ({"prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"prompt": "x", "logprobs": 50}, 400, "logprobs"),
        ({"prompt": "x", "echo": True}, 400, "echo"),
        ({"prompt": [], "max_tokens": 2}, 400, "empty"),
        ({"prompt": [10**9], "max_tokens": 2}, 400, "token ids"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
        ({"prompt": "x" * 2000}, 400, "context length"),
        ({"model": "gpt-nope", "prompt": "x"}, 404, "does not exist"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, match):
    r = httpx.post(server.base + "/v1/completions", json={"model": server.model, **body}, timeout=TIMEOUT_S)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert match in err["message"]


def test_bad_chat_requests_and_oversized_body(server):
    chat = server.base + "/v1/chat/completions"
    r = httpx.post(chat, json={"model": server.model, "messages": []}, timeout=TIMEOUT_S)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(chat, json={"model": server.model, "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400
    r = httpx.post(
        chat,
        json={"model": server.model, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
    )
    assert r.status_code == 400 and "logprobs" in r.json()["error"]["message"]
    r = httpx.post(chat, content=b"[1, 2]", timeout=TIMEOUT_S)
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = httpx.post(chat, content=b"{" + b" " * (17 << 20) + b"}", timeout=TIMEOUT_S)
    assert r.status_code == 413
    assert httpx.get(server.base + "/health").status_code == 200


def test_api_keys(start_server):
    served = start_server(api_extra='api_keys = ["sekret-1", "sekret-2"]\n')
    with pytest.raises(openai.AuthenticationError, match="API key"):
        _client(served.base, "wrong").models.list()
    r = httpx.get(served.base + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert [m.id for m in _client(served.base, "sekret-2").models.list().data] == [served.model]
    reply = _client(served.base, "sekret-1").completions.create(model=served.model, prompt="x", max_tokens=2)
    assert reply.usage.completion_tokens >= 1
    assert httpx.get(served.base + "/health").status_code == 200  # open: load balancers probe it
    assert httpx.get(served.base + "/metrics").status_code == 200
    assert httpx.get(served.base + "/lpipes/status").status_code == 401


def test_capacity_503_then_cancel_frees_kv_blocks(start_server):
    served = start_server(api_extra="max_batch_size = 1\nmax_queued_requests = 0\n")
    base = served.base
    assert _metrics(base)["lpipes_kv_blocks_total"] > 0
    body = {
        "model": served.model,
        "prompt": "keep going",
        "max_tokens": 200,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.Client(timeout=TIMEOUT_S) as http:
        with http.stream("POST", base + "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got: list[str] = []
            for line in lines:
                if line.startswith("data: "):
                    got.append(line)
                    if len(got) == 3:
                        break
            m = _metrics(base)
            assert m["lpipes_kv_blocks_used"] > 0 and m["lpipes_active_sessions"] == 1
            busy = http.post(
                base + "/v1/completions", json={"model": served.model, "prompt": "x", "max_tokens": 2}
            )
            assert busy.status_code == 503
            assert int(busy.headers["retry-after"]) >= 1
            assert busy.json()["error"]["code"] == "server_busy"
        # The stream is closed mid-generation: the request is cancelled and its blocks come back.
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        m = _metrics(base)
        if m["lpipes_kv_blocks_used"] == 0 and m["lpipes_active_sessions"] == 0:
            break
        assert time.monotonic() < deadline, f"KV blocks not freed: {m['lpipes_kv_blocks_used']}"
        time.sleep(0.1)
    assert m["lpipes_generation_tokens_total"] < 200
    ok = _client(base).completions.create(model=served.model, prompt="x", max_tokens=2)
    assert ok.usage.completion_tokens >= 1


def test_metrics_and_status(server):
    client = _client(server.base)
    client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "m"}],
        max_tokens=3,
        extra_body={"ignore_eos": True},
    )
    m = _metrics(server.base)
    for name in (
        "lpipes_requests_total",
        "lpipes_prompt_tokens_total",
        "lpipes_generation_tokens_total",
        "lpipes_time_to_first_token_seconds_count",
        "lpipes_inter_token_latency_seconds_count",
        "lpipes_active_sessions",
        "lpipes_kv_blocks_used",
        "lpipes_kv_blocks_total",
        "lpipes_failovers_total",
    ):
        assert name in m, name
    assert m["lpipes_generation_tokens_total"] >= 3
    assert m["lpipes_engine_steps_total"] >= 3 and m["lpipes_engine_step_sequences_total"] >= 3
    assert m["lpipes_time_to_first_token_seconds_count"] >= 1
    assert m["lpipes_inter_token_latency_seconds_count"] >= 2
    st = httpx.get(server.base + "/lpipes/status").json()
    assert st["node_id"] == "solo" and st["model"]["name"] == server.model
    assert st["stages"][0]["layers"] == [0, st["model"]["num_layers"]]
    assert st["stages"][0]["kv_blocks_total"] > 0 and st["requests"]["served"] >= 1
    assert st["engine"]["steps"] >= 3 and st["engine"]["max_batch_seen"] >= 1
    assert st["engine"]["failovers"] == 0 and st["engine"]["max_batch_tokens"] >= 1


def test_config_written_by_init_is_served(start_server, tiny_checkpoint, tmp_path, free_port):
    path = tiny_checkpoint("qwen3")
    port = free_port()
    cfg = tmp_path / "node.toml"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lpipes.cli.main",
            "init",
            "-y",
            "--model",
            str(path),
            "--node-id",
            "from-init",
            "--api-listen",
            f"127.0.0.1:{port}",
            "--listen",  # init writes a [network] table: the node listens for peers too
            f"127.0.0.1:{free_port()}",
            "--dtype",
            "float32",
            "-o",
            str(cfg),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    served = start_server.serve_config(cfg, f"http://127.0.0.1:{port}", path)
    assert httpx.get(served.base + "/lpipes/status").json()["node_id"] == "from-init"
    reply = _client(served.base).completions.create(model=served.model, prompt="hello", max_tokens=2)
    assert reply.usage.completion_tokens >= 1


def test_serve_refuses_layers_over_the_memory_budget(tiny_checkpoint, tmp_path, free_port):
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f'node_id = "small"\n[api]\nlisten = "127.0.0.1:{free_port()}"\n'
        f'[[models]]\npath = "{tiny_checkpoint("qwen3")}"\nend_model = true\nmax_memory_gb = 0.00001\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "lpipes.cli.main", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "over max_memory_gb = 1e-05" in out.stderr and "GiB of weights" in out.stderr


def test_openai_nulls_extensions_and_refusals(server, hf):
    url = server.base + "/v1/completions"
    base = {"model": server.model, "prompt": "abc", "max_tokens": 4}
    nulls = {"temperature": None, "top_p": None, "n": None, "seed": None, "stream": None, "logprobs": None}
    r = httpx.post(url, json={**base, **nulls}, timeout=TIMEOUT_S)
    assert r.status_code == 200, r.text
    # stop_token_ids (vLLM extension): stop at the greedy run's third token.
    tokens, _ = _greedy(hf, hf[0]("abc")["input_ids"], 6)
    third = tokens[2]
    r = httpx.post(url, json={**base, "temperature": 0, "max_tokens": 6, "stop_token_ids": [third]}).json()
    assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] <= 3
    for extra, param in [
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"seed": 2**64}, "seed"),
        ({"n": 16, "prompt": ["a", "b", "c", "d", "e"]}, "prompt"),
    ]:
        r = httpx.post(url, json={**base, **extra}, timeout=TIMEOUT_S)
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["param"] == param
    r = httpx.post(
        server.base + "/v1/chat/completions",
        json={
            "model": server.model,
            "messages": [{"role": "user", "content": "x"}],
            "tool_choice": "required",
        },
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"


def test_logprob_bytes_rebuild_the_text(server):
    reply = _client(server.base).chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "héllo ✓ 日本"}],
        temperature=1.0,
        seed=5,
        max_tokens=24,
        logprobs=True,
        extra_body={"ignore_eos": True},
    )
    raw = b"".join(bytes(e.bytes) for e in reply.choices[0].logprobs.content)
    assert raw.decode("utf-8", errors="replace") == reply.choices[0].message.content


def test_non_streaming_disconnect_cancels_and_gauges_settle(start_server):
    served = start_server(api_extra="max_batch_size = 1\n")
    base = served.base
    # 16 choices of 240 tokens, one at a time (max_batch_size = 1): seconds of work on any machine.
    body = {"model": served.model, "prompt": "long", "max_tokens": 240, "n": 16, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + "/v1/completions", json=body, timeout=1.0)  # gives up while it runs
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        m = _metrics(base)
        if (
            m["lpipes_kv_blocks_used"] == 0
            and m["lpipes_active_sessions"] == 0
            and m["lpipes_queued_requests"] == 0
        ):
            break
        assert time.monotonic() < deadline, "the abandoned request kept its KV blocks"
        time.sleep(0.1)
    assert m["lpipes_generation_tokens_total"] < 16 * 240
    _client(base).completions.create(model=served.model, prompt="x", max_tokens=2)
    m = _metrics(base)
    assert m["lpipes_active_sessions"] == 0 and m["lpipes_queued_requests"] == 0
