"""Config loading: typed, strict, overridable; errors name the file and the key."""

from pathlib import Path

import pytest

from serving.config import ConfigError, ServerConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
PROFILES = sorted((ROOT / "deploy" / "configs").glob("*.yaml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_shipped_profiles_load(profile):
    cfg = load_config(profile, environ={})
    assert cfg.engine.enable_prefix_caching  # on by default and in every profile


def test_unknown_key_is_named_with_file(tmp_path):
    path = write(tmp_path, "server:\n  prot: 8000\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert str(path) in str(err.value) and "server.prot: unknown key" in str(err.value)


def test_wrong_type_is_rejected_not_coerced(tmp_path):
    path = write(tmp_path, "engine:\n  max_num_seqs: '8'\n")
    with pytest.raises(ConfigError, match=r"engine\.max_num_seqs"):
        load_config(path, environ={})


def test_bad_enum_value(tmp_path):
    path = write(tmp_path, "model:\n  quantization: int3\n")
    with pytest.raises(ConfigError, match=r"model\.quantization"):
        load_config(path, environ={})


def test_env_then_cli_overrides(tmp_path):
    path = write(tmp_path, "server:\n  port: 8000\n")
    cfg = load_config(path, environ={"QWEN_SERVE__SERVER__PORT": "8001",
                                     "QWEN_SERVE__ROUTER__POLICY": "round_robin"})
    assert cfg.server.port == 8001 and cfg.router.policy == "round_robin"
    cfg = load_config(path, ["server.port=8002"], environ={"QWEN_SERVE__SERVER__PORT": "8001"})
    assert cfg.server.port == 8002


def test_override_with_unknown_key_fails(tmp_path):
    with pytest.raises(ConfigError, match=r"server\.bogus: unknown key"):
        load_config(write(tmp_path, ""), ["server.bogus=1"], environ={})


def test_autoscaling_bounds_checked(tmp_path):
    path = write(tmp_path, "router:\n  autoscaling: {min_replicas: 3, max_replicas: 2}\n")
    with pytest.raises(ConfigError, match="min_replicas"):
        load_config(path, environ={})


def test_not_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "server: [1,\n"), environ={})


@pytest.mark.parametrize("keys, setting, needed", [
    (None, None, False), ("/run/secrets/api_keys", None, True),
    ("/run/secrets/api_keys", False, False), (None, True, True)])
def test_metrics_need_a_key_whenever_api_keys_are_on_unless_opened(keys, setting, needed):
    server = ServerConfig(api_keys_file=keys, metrics_require_key=setting)
    assert server.metrics_need_key is needed
