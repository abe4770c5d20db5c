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
session_timeout_s = 120.0
max_sessions = 64
max_frame_mb = 128
busy_poll_us = 2000

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
    assert cfg.network.session_timeout_s == 120.0
    assert (cfg.network.max_sessions, cfg.network.max_frame_mb) == (64, 128)
    assert cfg.network.max_frame_bytes == 128 << 20
    assert cfg.network.busy_poll_us == 2000
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
    # The network limits' defaults: room for several origins, frames of a 2048-token fp32 prefill
    # of hidden size 16384 (128 MiB) twice over, well below the wire format's 1 GiB.
    assert cfg.network.max_sessions == 128 and cfg.network.max_frame_bytes == 256 << 20
    assert cfg.network.session_timeout_s == 600.0
    assert cfg.network.busy_poll_us == 0  # off: polling spends a core
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
        (
            FULL.replace("max_sessions = 64", "max_sessions = 0"),
            "`network.max_sessions`: Input should be greater than or equal to 1",
        ),
        (
            FULL.replace("max_frame_mb = 128", "max_frame_mb = 2048"),
            "`network.max_frame_mb`: Input should be less than or equal to 1024",
        ),
        (
            FULL.replace("busy_poll_us = 2000", "busy_poll_us = -1"),
            "`network.busy_poll_us`: Input should be greater than or equal to 0",
        ),
        (
            FULL.replace("session_timeout_s = 120.0", "session_timeout_s = 0.5"),
            "`network.session_timeout_s`: Input should be greater than or equal to 1",
        ),
        (FULL.replace("max_batch_tokens = 1024", "max_batch_tokens = 4"), "must be at least max_batch_size"),
        (FULL.replace("prefill_chunk_tokens = 256", "prefill_chunk_tokens = 0"), "prefill_chunk_tokens"),
        (FULL.replace('id = "Qwen/Qwen3-1.7B"\npath = "models/qwen3"', ""), "needs `path`"),
        (
            FULL.replace('listen = "127.0.0.1:5000"', 'listen = "0.0.0.0:5000"'),
            'set [network] advertise = "HOST:5000"',
        ),
        (
            FULL.replace('listen = "127.0.0.1:5000"', 'listen = "[::]:5000"\nadvertise = "0.0.0.0:5000"'),
            "`network.advertise`: advertise '0.0.0.0:5000' is not an address a node can be reached at",
        ),
        (FULL.replace('["127.0.0.1:5001"]', '["0.0.0.0:5001"]'), "`network.bootstrap`: bootstrap entry"),
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


def test_listening_on_every_interface_needs_the_advertised_address(tmp_path, tiny_checkpoint):
    from lpipes.cli.serve import node_settings
    from lpipes.models.checkpoint import open_checkpoint

    path = tiny_checkpoint("qwen3")
    cfg = load_config(
        _write(
            tmp_path,
            'node_id = "p"\n[network]\nlisten = "0.0.0.0:5000"\nadvertise = "192.168.1.20:5000"\n'
            f'[[models]]\npath = "{path}"\n',
        )
    )
    assert cfg.network.address == "192.168.1.20:5000"
    settings = node_settings(cfg, open_checkpoint(path), "float32", None)
    assert (settings.listen, settings.advertise) == ("0.0.0.0:5000", "192.168.1.20:5000")


def test_network_limits_reach_the_node(tmp_path, tiny_checkpoint):
    """`lpipes serve` builds its node's settings from [network]: limits included."""
    from lpipes.cli.serve import node_settings
    from lpipes.models.checkpoint import open_checkpoint

    path = tiny_checkpoint("qwen3")
    cfg = load_config(
        _write(
            tmp_path,
            'node_id = "p"\n[network]\nmax_sessions = 3\nmax_frame_mb = 2\nsession_timeout_s = 30\n'
            "busy_poll_us = 1500\n"
            f'[[models]]\npath = "{path}"\n',
        )
    )
    settings = node_settings(cfg, open_checkpoint(path), "float32", b"k" * 16)
    assert settings.listen == "127.0.0.1:5000" and settings.advertise is None
    assert settings.max_sessions == 3 and settings.session_timeout_s == 30.0
    assert settings.limits.max_frame_bytes == 2 << 20 and settings.key == b"k" * 16
    assert settings.busy_poll_s == 0.0015


API_LIMITS = """
node_id = "origin"

[api]
max_prompt_tokens = 1000
max_new_tokens = 256
max_body_bytes = 65536
max_connections = 32
header_timeout_s = 5
body_timeout_s = 12.5
send_timeout_s = 7

[[models]]
id = "org/model"
end_model = true
"""


def test_api_limits(tmp_path):
    from lpipes.api.limits import HttpLimits, RequestLimits

    api = load_config(_write(tmp_path, API_LIMITS)).api
    assert api is not None
    assert api.request_limits() == RequestLimits(
        max_prompt_tokens=1000, max_new_tokens=256, max_body_bytes=65536, body_timeout_s=12.5
    )
    assert api.http_limits() == HttpLimits(max_connections=32, header_timeout_s=5.0, send_timeout_s=7.0)


def test_api_limit_defaults_keep_a_small_machine_alive(tmp_path):
    """Without the keys: prompts up to the context length, at most 4096 new tokens, 2 MiB bodies, 128
    connections; and the defaults of a server built without a file (lpipes demo) are the same."""
    from lpipes.api.limits import HttpLimits, RequestLimits

    api = load_config(
        _write(tmp_path, 'node_id = "o"\n[api]\n[[models]]\nid = "org/m"\nend_model = true\n')
    ).api
    assert api is not None
    assert api.request_limits() == RequestLimits() == RequestLimits(0, 4096, 2 << 20, 30.0)
    assert api.http_limits() == HttpLimits() == HttpLimits(128, 10.0, 30.0)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("max_prompt_tokens = -1", "`api.max_prompt_tokens`: Input should be greater than or equal to 0"),
        ("max_new_tokens = 1.5", "`api.max_new_tokens`: Input should be a valid integer"),
        ("max_body_bytes = 100", "`api.max_body_bytes`: Input should be greater than or equal to 1024"),
        ("max_connections = 0", "`api.max_connections`: Input should be greater than or equal to 1"),
        ("header_timeout_s = 0", "`api.header_timeout_s`: Input should be greater than 0"),
        ("body_timeout_s = 7200", "`api.body_timeout_s`: Input should be less than or equal to 3600"),
        ("send_timeout_s = -1", "`api.send_timeout_s`: Input should be greater than 0"),
        ("max_body_mb = 2", "unknown key `api.max_body_mb`"),
    ],
)
def test_bad_api_limits(tmp_path, line, message):
    path = _write(tmp_path, f'node_id = "o"\n[api]\n{line}\n[[models]]\nid = "org/m"\nend_model = true\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)
