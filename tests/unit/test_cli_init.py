"""`lpipes init`: the written node.toml is commented, loads with load_config and round-trips every answer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lpipes.cli import init
from lpipes.cli.main import main
from lpipes.config import load_config, tomllib


def _lpipes(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lpipes.cli.main", "init", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


def test_subprocess_hub_id_round_trips(tmp_path):
    out = _lpipes(
        "-y",
        "--model",
        "Qwen/Qwen3-1.7B",
        "--node-id",
        "gpu-1",
        "--layers",
        "2,6",
        "--dtype",
        "bfloat16",
        "--executor",
        "reference",
        "--max-memory-gb",
        "3.5",
        "--kv-cache-gb",
        "0.25",
        "--api-listen",
        "0.0.0.0:9000",
        "--api-key",
        'se"cr\\et',
        "--api-key",
        "two",
        "--listen",
        "10.0.0.1:5001",
        "--bootstrap",
        "10.0.0.2:5000,10.0.0.3:5000",
        "--bootstrap",
        "peer.example:5000",
        "--key-file",
        "network.key",
        "--no-end-model",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    path = tmp_path / "node.toml"
    assert "wrote node.toml" in out.stderr and "lpipes serve --config node.toml" in out.stderr
    text = path.read_text()
    assert text.startswith("#") and "lpipes serve --config node.toml" in text
    cfg = load_config(path)
    assert cfg.node_id == "gpu-1"
    m = cfg.models[0]
    assert m.id == "Qwen/Qwen3-1.7B" and m.path is None
    assert m.layers == [2, 6] and m.span == (2, 6)
    assert (m.dtype, m.executor, m.end_model) == ("bfloat16", "reference", False)
    assert (m.max_memory_gb, m.kv_cache_gb) == (3.5, 0.25)
    assert cfg.api is not None and cfg.api.listen == "0.0.0.0:9000"
    assert cfg.api.api_keys == ['se"cr\\et', "two"]
    assert cfg.network.listen == "10.0.0.1:5001"
    assert cfg.network.bootstrap == ["10.0.0.2:5000", "10.0.0.3:5000", "peer.example:5000"]
    assert cfg.network.key_file == tmp_path / "network.key"
    assert 'key_file = "network.key"' in text  # inside the config's folder: written relative
    assert path.stat().st_mode & 0o077 == 0  # holds API keys: private
    assert not [p for p in tmp_path.iterdir() if p.name != "node.toml"]  # no temp file left


def test_stdin_not_a_tty_never_prompts_and_uses_defaults(tmp_path):
    out = _lpipes("--model", "some-model", "-o", "conf/n1.toml", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cfg = load_config(tmp_path / "conf" / "n1.toml")
    m = cfg.models[0]
    assert m.id == "some-model" and m.end_model is True and m.layers == "auto"
    assert (m.dtype, m.executor, m.max_memory_gb, m.kv_cache_gb) == ("auto", "auto", 2.0, 0.5)
    assert cfg.api is not None and cfg.api.listen == "127.0.0.1:8000" and cfg.api.api_keys == []
    assert cfg.network.listen == "127.0.0.1:5000" and cfg.network.bootstrap == []
    assert cfg.network.key_file is None
    assert cfg.node_id == init.default_node_id()


@pytest.mark.parametrize(
    ("flags", "key"),
    [
        (["--layers", "5,2"], "layers"),
        (["--layers", "1,2,3"], "layers"),
        (["--api-listen", "nohost"], "api.listen"),
        (["--listen", "h:0"], "network.listen"),
        (["--listen", "0.0.0.0:5000"], "advertise"),  # every interface: which address do peers use?
        (["--listen", "0.0.0.0:5000", "--advertise", "[::]:5000"], "network.advertise"),
        (["--bootstrap", "0.0.0.0:5000"], "network.bootstrap"),
        (["--bootstrap", "a:1,bad"], "network.bootstrap"),
        (["--dtype", "int8"], "--dtype"),
        (["--executor", "fast"], "--executor"),
        (["--max-memory-gb", "-1"], "max_memory_gb"),
        (["--kv-cache-gb", "nan"], "kv_cache_gb"),
        (["--node-id", "bad id!"], "node_id"),
        (["--model", "./no/such/dir"], "--model"),
    ],
)
def test_bad_values_exit_2_and_write_nothing(tmp_path, flags, key):
    args = ["-y", *([] if "--model" in flags else ["--model", "org/m"]), *flags]
    out = _lpipes(*args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert key in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_in_process_local_path_and_no_api(tmp_path, capsys, monkeypatch):
    model_dir = tmp_path / "models" / "tiny"
    model_dir.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    rc = main(["init", "-y", "--model", "models/tiny", "--no-api", "--node-id", "n.2_x", "-o", "node.toml"])
    assert rc == 0
    text = (tmp_path / "node.toml").read_text()
    assert "\n[api]" not in text and "# [api]" in text  # left out, shown commented
    assert 'path = "models/tiny"' in text  # inside the config's folder: relative
    cfg = load_config(tmp_path / "node.toml")
    assert cfg.api is None and cfg.node_id == "n.2_x"
    assert cfg.models[0].path == model_dir.resolve() and cfg.models[0].id is None
    assert "next: lpipes serve --config node.toml" in capsys.readouterr().err


def test_refuses_to_overwrite_without_force(tmp_path, capsys):
    path = tmp_path / "node.toml"
    path.write_text("keep me\n")
    assert main(["init", "-y", "--model", "org/m", "-o", str(path)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err
    assert path.read_text() == "keep me\n"
    assert main(["init", "-y", "--model", "org/m", "-o", str(path), "--force"]) == 0
    assert load_config(path).models[0].id == "org/m"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.toml"]


def test_in_process_bad_values(tmp_path, capsys):
    path = tmp_path / "node.toml"
    assert main(["init", "-y", "--model", "org/m", "-o", str(path), "--layers", "5,2"]) == 2
    assert "models[0].layers" in capsys.readouterr().err
    assert main(["init", "-y", "--model", "org/m", "-o", str(path), "--api-listen", "nohost"]) == 2
    assert "api.listen" in capsys.readouterr().err
    assert main(["init", "-y", "--model", "org/m", "-o", str(path), "--no-api", "--api-key", "k"]) == 2
    assert "--api-key" in capsys.readouterr().err
    assert main(["init", "-y", "-o", str(path)]) == 2
    assert "--model is required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["init", "-y", "--model", "org/m", "-o", str(path), "--dtype", "int8"])
    assert exc.value.code == 2 and "--dtype" in capsys.readouterr().err
    assert not path.exists()


def test_stdout_output(capsys):
    assert main(["init", "-y", "--model", "org/m", "-o", "-", "--layers", "[0, 4]"]) == 0
    data = tomllib.loads(capsys.readouterr().out)
    assert data["models"][0]["layers"] == [0, 4] and data["models"][0]["id"] == "org/m"


def test_tiny_checkpoint_path_loads(tmp_path, tiny_checkpoint, capsys):
    ckpt = tiny_checkpoint("qwen3")
    path = tmp_path / "serve.toml"
    rc = main(["init", "-y", "--model", str(ckpt), "-o", str(path), "--dtype", "float32", "--layers", "auto"])
    assert rc == 0, capsys.readouterr().err
    cfg = load_config(path)
    m = cfg.models[0]
    assert m.path == Path(ckpt).resolve() and m.id is None and m.end_model
    assert m.source == str(Path(ckpt).resolve()) and m.dtype == "float32"
    assert cfg.api is not None


def test_toml_string_escapes_round_trip():
    for s in ["plain", 'q"uote', "back\\slash", "new\nline\ttab\r", "\x00\x1f\x7f", "ünï €😀"]:
        assert tomllib.loads(f"k = {init.toml_string(s)}")["k"] == s


def test_default_node_id_is_sanitised(monkeypatch):
    monkeypatch.setattr(init.socket, "gethostname", lambda: "my host (lab)!")
    assert init.default_node_id() == "my-host-lab"
    monkeypatch.setattr(init.socket, "gethostname", lambda: "???")
    assert init.default_node_id() == "node-1"


# --------------------------------------------------------------------------- the wizard


def _script(answers: list[Any], seen: list[tuple[str, str, dict[str, Any]]]):
    """An `_ask` that replays ``answers`` in order and records each question."""
    it = iter(answers)

    def ask(kind: str, message: str, **kwargs: Any) -> Any:
        seen.append((kind, message, kwargs))
        answer = next(it)
        validate = kwargs.get("validate")
        if validate is not None and answer is not None:
            assert validate(answer) is True, (message, answer, validate(answer))
        return answer

    return ask


def test_wizard_flow_writes_a_valid_file(tmp_path, monkeypatch, capsys):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    seen: list[tuple[str, str, dict[str, Any]]] = []
    answers = [
        "wiz-node",  # node id
        str(model_dir),  # model
        True,  # end model
        "0, 4",  # layers
        "float16",  # dtype
        "native",  # executor
        "1.5",  # max_memory_gb
        "0.75",  # kv_cache_gb
        True,  # serve the API
        "127.0.0.1:8080",  # api listen
        "k1, k2",  # api keys
        "0.0.0.0:5005",  # network listen: every interface, so ...
        "10.1.1.2:5005",  # ... the address peers reach this node at
        "10.1.1.1:5000",  # bootstrap
        "",  # key file
    ]
    monkeypatch.setattr(init, "_stdin_is_tty", lambda: True)
    monkeypatch.setattr(init, "_ask", _script(answers, seen))
    out = tmp_path / "wiz.toml"
    assert main(["init", "-o", str(out), "--dtype", "bfloat16", "--node-id", "from-flag"]) == 0
    assert len(seen) == len(answers)
    kinds = [k for k, _, _ in seen]
    assert (
        kinds
        == ["text", "path", "confirm", "text", "select", "select", "text", "text", "confirm"] + ["text"] * 6
    )
    # flags given become the defaults of their questions
    assert seen[0][2]["default"] == "from-flag"
    assert seen[4][2]["default"] == "bfloat16"
    # validators reject bad input as it is typed
    assert seen[0][2]["validate"]("bad id!") is not True
    assert seen[3][2]["validate"]("5,2") is not True
    assert seen[6][2]["validate"]("0") is not True
    assert seen[9][2]["validate"]("nohost") is not True
    assert seen[12][2]["validate"]("0.0.0.0:5005") is not True  # advertise: must be reachable
    assert seen[13][2]["validate"]("a:1,b") is not True
    cfg = load_config(out)
    assert cfg.node_id == "wiz-node"
    m = cfg.models[0]
    assert m.path == model_dir.resolve() and m.layers == [0, 4]
    assert (m.dtype, m.executor, m.max_memory_gb, m.kv_cache_gb) == ("float16", "native", 1.5, 0.75)
    assert cfg.api is not None and cfg.api.listen == "127.0.0.1:8080" and cfg.api.api_keys == ["k1", "k2"]
    assert cfg.network.listen == "0.0.0.0:5005" and cfg.network.bootstrap == ["10.1.1.1:5000"]
    assert cfg.network.advertise == "10.1.1.2:5005" and cfg.network.address == "10.1.1.2:5005"
    assert cfg.network.key_file is None


def test_wizard_without_api_skips_its_questions(tmp_path, monkeypatch):
    seen: list[tuple[str, str, dict[str, Any]]] = []
    answers = ["n", "org/model", False, "auto", "auto", "auto", "2", "0.5", False, "127.0.0.1:5000", "", "k"]
    monkeypatch.setattr(init, "_stdin_is_tty", lambda: True)
    monkeypatch.setattr(init, "_ask", _script(answers, seen))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "n.toml"
    assert main(["init", "-o", str(out), "--no-api"]) == 0
    assert seen[8][2]["default"] is False  # --no-api: the API question defaults to no
    cfg = load_config(out)
    assert cfg.api is None and cfg.models[0].id == "org/model" and not cfg.models[0].end_model
    assert cfg.network.key_file == tmp_path / "k"


class _FakeQuestion:
    def __init__(self, answer: Any):
        self.answer = answer

    def ask(self) -> Any:
        return self.answer


def test_wizard_through_questionary_functions(tmp_path, monkeypatch):
    """The real `_ask` glue: questionary.text/path/select/confirm are replaced, nothing needs a TTY."""
    import questionary

    by_kind = {
        "text": iter(["qnode", "auto", "2.0", "0.5", "127.0.0.1:8000", "", "127.0.0.1:5000", "", ""]),
        "path": iter(["org/from-questionary"]),
        "select": iter(["auto", "auto"]),
        "confirm": iter([True, True]),
    }
    calls: list[str] = []

    def fake(kind: str):
        def prompt(message: str, **kwargs: Any) -> _FakeQuestion:
            calls.append(kind)
            if kind == "select":
                values = [c.value for c in kwargs["choices"]]
                assert kwargs["default"] in values
            return _FakeQuestion(next(by_kind[kind]))

        return prompt

    for kind in by_kind:
        monkeypatch.setattr(questionary, kind, fake(kind))
    monkeypatch.setattr(init, "_stdin_is_tty", lambda: True)
    out = tmp_path / "q.toml"
    assert main(["init", "-o", str(out)]) == 0
    assert len(calls) == 14
    cfg = load_config(out)
    assert cfg.node_id == "qnode" and cfg.models[0].id == "org/from-questionary"


def test_wizard_cancelled_writes_nothing(tmp_path, monkeypatch, capsys):
    seen: list[tuple[str, str, dict[str, Any]]] = []
    monkeypatch.setattr(init, "_stdin_is_tty", lambda: True)
    monkeypatch.setattr(init, "_ask", _script(["n", "org/m", None], seen))
    out = tmp_path / "c.toml"
    assert main(["init", "-o", str(out)]) == 130
    assert len(seen) == 3
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert "nothing written" in capsys.readouterr().err


def test_wizard_asks_before_overwriting(tmp_path, monkeypatch, capsys):
    out = tmp_path / "node.toml"
    out.write_text("old\n")
    seen: list[tuple[str, str, dict[str, Any]]] = []
    monkeypatch.setattr(init, "_stdin_is_tty", lambda: True)
    monkeypatch.setattr(init, "_ask", _script([False], seen))
    assert main(["init", "-o", str(out)]) == 2
    assert seen[0][0] == "confirm" and "already exists" in seen[0][1]
    assert out.read_text() == "old\n"
    assert "not overwritten" in capsys.readouterr().err


def test_non_interactive_flag_wins_over_a_tty(tmp_path, monkeypatch):
    def no_questions(*a: Any, **k: Any) -> Any:
        raise AssertionError("prompted despite -y")

    monkeypatch.setattr(init, "_stdin_is_tty", lambda: True)
    monkeypatch.setattr(init, "_ask", no_questions)
    out = tmp_path / "y.toml"
    assert main(["init", "-y", "--model", "org/m", "-o", str(out)]) == 0
    assert load_config(out).models[0].id == "org/m"


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["init", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in [
        "--output",
        "--node-id",
        "--model",
        "--no-end-model",
        "--layers",
        "--dtype",
        "--executor",
        "--max-memory-gb",
        "--kv-cache-gb",
        "--api-listen",
        "--no-api",
        "--api-key",
        "--listen",
        "--advertise",
        "--bootstrap",
        "--key-file",
        "--force",
        "--non-interactive",
        "lpipes serve --config",
    ]:
        assert flag in text
