"""The OpenAI-compatible API of `lpipes serve`, driven by the real `openai` client against a server."""

from __future__ import annotations

import urllib.request

import openai
import pytest
import torch
import transformers


def _client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)


def test_chat_greedy_matches_transformers(server):
    base, name, path = server.base, server.model, server.path
    messages = [{"role": "user", "content": "Hello there"}]
    reply = _client(base).chat.completions.create(
        model=name, messages=messages, temperature=0, max_tokens=12, extra_body={"ignore_eos": True}
    )
    tok = transformers.AutoTokenizer.from_pretrained(path)
    full = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    full.generation_config.eos_token_id = None
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    out = full.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :]
    assert reply.choices[0].message.content == tok.decode(out, skip_special_tokens=True)
    assert reply.usage.completion_tokens == 12 and reply.usage.prompt_tokens == len(ids)
    assert reply.choices[0].finish_reason == "length"


def test_streaming_completion_equals_non_streaming(server):
    base, name = server.base, server.model
    client = _client(base)
    kwargs = dict(
        model=name,
        prompt="The quick brown fox",
        temperature=0,
        max_tokens=10,
        extra_body={"ignore_eos": True},
    )
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens == 10


def test_models_and_errors(server):
    base, name = server.base, server.model
    client = _client(base)
    assert [m.id for m in client.models.list().data] == [name]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model=name, prompt=[5] * 300, max_tokens=10)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=name, prompt="x", temperature=-1)
    req = urllib.request.Request(base + "/v1/completions", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 400
    err.value.close()
    assert (
        client.completions.create(model=name, prompt="still serving", max_tokens=2).usage.completion_tokens
        >= 1
    )
