"""Node configuration: every documented key parses; bad keys and values name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from lpipes.config import ConfigError, load_config

FULL = """
node_id = "node-1"

[network]
listen = "127.0.0.1:5000"
bootstrap = ["127.0.0.1:5001"]
key_file = "network.key"

[api]
listen = "127.0.0.1:8000"
api_keys = ["sk-test"]
max_batch_size = 8
max_queued_requests = 32
max_batch_tokens = 1024
prefill_chunk_tokens = 256
pipeline_depth = 3

[[models]]
id = "Qwen/Qwen3-1.7B"
path = "models/qwen3"
end_model = true
layers = "auto"
device = "cpu"
dtype = "float16"
executor = "auto"
max_memory_gb = 2.0
kv_cache_gb = 0.5
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.toml"
    p.write_text(text)
    return p


def test_every_key(tmp_path):
    cfg = load_config(_write(tmp_path, FULL))
    assert cfg.node_id == "node-1"
    assert cfg.network.bootstrap == ["127.0.0.1:5001"]
    assert cfg.network.key_file == tmp_path / "network.key"  # relative to the file's folder
    assert cfg.api is not None and cfg.api.api_keys == ["sk-test"]
    assert cfg.api.engine_options() == {
        "max_batch_size": 8,
        "max_queued": 32,
        "max_batch_tokens": 1024,
        "prefill_chunk_tokens": 256,
        "pipeline_depth": 3,
    }
    (m,) = cfg.models
    assert m.path == tmp_path / "models/qwen3" and m.source == str(tmp_path / "models/qwen3")
    assert m.end_model and m.span is None and m.kv_cache_gb == 0.5


def test_minimal_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, 'node_id = "a"\n[[models]]\nid = "org/model"\nlayers = [0, 4]\n'))
    assert cfg.api is None and cfg.network.bootstrap == [] and cfg.network.key_file is None
    assert cfg.models[0].span == (0, 4) and cfg.models[0].source == "org/model"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (FULL.replace("kv_cache_gb", "kv_cache_gbb"), "unknown key `models[0].kv_cache_gbb`"),
        (FULL.replace("[api]", "[apii]"), "unknown key `apii`"),
        (
            FULL.replace('dtype = "float16"', 'dtype = "fp8"'),
            "`models[0].dtype`: Input should be 'auto', 'float16'",
        ),
        (FULL.replace('layers = "auto"', "layers = [4, 2]"), "0 <= start < end"),
        (
            FULL.replace('listen = "127.0.0.1:8000"', 'listen = "localhost"'),
            "`api.listen`: listen must be HOST:PORT",
        ),
        (
            FULL.replace("kv_cache_gb = 0.5", "kv_cache_gb = -1"),
            "`models[0].kv_cache_gb`: Input should be greater than 0",
        ),
        (FULL.replace('node_id = "node-1"', ""), "missing required key `node_id`"),
        (FULL.replace("max_batch_tokens = 1024", "max_batch_tokens = 4"), "must be at least max_batch_size"),
        (FULL.replace("prefill_chunk_tokens = 256", "prefill_chunk_tokens = 0"), "prefill_chunk_tokens"),
        (FULL.replace('id = "Qwen/Qwen3-1.7B"\npath = "models/qwen3"', ""), "needs `path`"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_not_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "node_id = \n"))
    with pytest.raises(ConfigError, match="cannot read the configuration file"):
        load_config(tmp_path / "absent.toml")
