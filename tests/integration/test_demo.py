"""`lpipes demo` (the README's main command) serves the split demo model over the OpenAI API."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import openai
import torch
import transformers


def test_demo_serves_the_split_model(tmp_path, wait_healthy, free_port):
    port = free_port()
    env = {**os.environ, "LPIPES_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "LPIPES_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lpipes.cli.main", "demo", "--listen", f"127.0.0.1:{port}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(proc, base)
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
        [model] = client.models.list().data
        messages = [{"role": "user", "content": "Hello"}]
        reply = client.chat.completions.create(
            model=model.id, messages=messages, temperature=0, max_tokens=8, extra_body={"ignore_eos": True}
        )
        # The demo runs float16 native spans: compare with transformers' fp32 greedy tokens.
        path = tmp_path / model.id
        tok = transformers.AutoTokenizer.from_pretrained(path)
        full = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        full.generation_config.eos_token_id = None
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        out = full.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :]
        assert reply.choices[0].message.content == tok.decode(out, skip_special_tokens=True)
    finally:
        proc.kill()  # by PID, always
        proc.wait(timeout=30)
        proc.stderr.close()


def test_demo_refuses_a_busy_port(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "lpipes.cli.main", "demo", "--listen", f"127.0.0.1:{port}"],
            env={**os.environ, "LPIPES_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr
