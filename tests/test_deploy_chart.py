"""What the Helm chart and the images actually run, checked on rendered output.

The chart embeds the serving config with the same schema as deploy/configs, so the
ConfigMap each profile renders must load with serving.config.load_config; GPU
requests must follow replicas x tensor_parallel_size; SIGKILL must never cut the
server's drain; values.schema.json must reject wrong types. Rendering runs with the
Helm 3 CLI (deploy/check.sh render) and, for lint and render, with Helm 4 through
helm-python-sdk, so both major versions users run accept the chart.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from serving.config import DeploymentConfig, load_config

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm/qwen-serve"
CHECK = REPO / "deploy/check.sh"
PROFILES = sorted(CHART.glob("values*.yaml")) + sorted((CHART / "ci").glob("*.yaml"))


def render(values: Path, *extra: str) -> list[dict[str, Any]]:
    result = subprocess.run(["bash", str(CHECK), "render", str(values), *extra],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def serving_config(docs, tmp_path: Path) -> DeploymentConfig:
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config"))
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    return load_config(path, environ={})


def serve_container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod_spec["containers"] if c["name"] == "qwen-serve")


def test_4x4090d_profile_requests_four_gpus_for_four_tp1_replicas(tmp_path):
    docs = render(CHART / "values-4x4090d.yaml")
    config = serving_config(docs, tmp_path)
    assert (config.topology.replicas, config.topology.tensor_parallel_size) == (4, 1)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    container = serve_container(pod)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 4
    assert container["command"] == ["qwen-serve", "serve", "--config", "/etc/qwen-serve/config.yaml"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert pod["automountServiceAccountToken"] is False  # nothing in it talks to the API server
    assert not [d for d in docs if d["kind"] == "RayService"]


def test_7b_tp4_kuberay_profile_renders_a_rayservice_with_tp4_workers(tmp_path):
    docs = render(CHART / "values-7b-tp4-kuberay.yaml")
    config = serving_config(docs, tmp_path)
    assert config.topology.tensor_parallel_size == 4
    ray = one(docs, "RayService")
    assert ray["apiVersion"] == "ray.io/v1"
    cluster = ray["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["name"] == "ray-head"
    assert serve_container(head)["command"][:2] == ["qwen-serve", "serve"]
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert (workers["minReplicas"], workers["maxReplicas"]) == (1, 3)
    assert cluster["enableInTreeAutoscaling"] is True
    assert not [d for d in docs if d["kind"] == "Deployment"]


def test_the_kuberay_cluster_asks_for_ray_token_and_the_ingress_has_it():
    """KubeRay gives its Ray containers the token; the ingress, a container of its own in
    the head pod, must be given it too or its ray.init is refused."""
    cluster = one(render(CHART / "values-7b-tp4-kuberay.yaml"), "RayService")["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "qwen-serve-ray-token"}
    env = {e["name"]: e for e in serve_container(cluster["headGroupSpec"]["template"]["spec"])["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "qwen-serve-ray-token", "key": "auth_token"}}
    # The engine key comes from the deployment, so the registry never keeps it.
    assert env["QWEN_SERVE_ENGINE_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "qwen-serve-engine-key", "key": "engine-key"}}


def test_kuberay_without_a_ray_token_secret_is_refused(tmp_path):
    extra = tmp_path / "no-token.yaml"
    extra.write_text('secrets: {rayToken: {existingSecret: ""}}\n')
    result = subprocess.run(["bash", str(CHECK), "render", str(CHART / "values-7b-tp4-kuberay.yaml"),
                             "-f", str(extra)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "secrets.rayToken.existingSecret" in result.stderr


def test_cpu_profile_requests_no_gpu_and_serves_the_embedded_model(tmp_path):
    docs = render(CHART / "values-cpu.yaml")
    config = serving_config(docs, tmp_path)
    assert config.engine.device == "cpu" and config.served_model_name == "smollm2-135m-instruct"
    container = serve_container(one(docs, "Deployment")["spec"]["template"]["spec"])
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])


ADAPTER_VALUES = """
adapters: {existingClaim: my-adapters}
serving:
  model:
    adapters:
      my-variant: {source: /var/lib/qwen-serve/adapters/my-variant}
"""


@pytest.mark.parametrize("values", ["values-cpu.yaml", "values-7b-tp4-kuberay.yaml"])
def test_adapters_claim_is_mounted_read_only_wherever_engines_run(values, tmp_path):
    extra = tmp_path / "adapters.yaml"
    extra.write_text(ADAPTER_VALUES)
    docs = render(CHART / values, "-f", str(extra))
    assert serving_config(docs, tmp_path).model.adapters["my-variant"].source.endswith("/my-variant")
    pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"]
    for ray in (d for d in docs if d["kind"] == "RayService"):
        cluster = ray["spec"]["rayClusterConfig"]
        pods += [cluster["headGroupSpec"]["template"]["spec"],
                 *(g["template"]["spec"] for g in cluster["workerGroupSpecs"])]
    assert pods
    for pod in pods:
        (volume,) = [v for v in pod["volumes"] if v["name"] == "adapters"]
        assert volume["persistentVolumeClaim"] == {"claimName": "my-adapters", "readOnly": True}
        mounts = [m for c in pod["containers"] for m in c.get("volumeMounts", []) if m["name"] == "adapters"]
        assert mounts and all(m == {"name": "adapters", "mountPath": "/var/lib/qwen-serve/adapters",
                                    "readOnly": True} for m in mounts), mounts


def test_an_adapter_under_the_mount_path_without_a_claim_is_refused(tmp_path):
    extra = tmp_path / "adapters.yaml"
    extra.write_text(ADAPTER_VALUES.replace("existingClaim: my-adapters", 'existingClaim: ""'))
    result = subprocess.run(["bash", str(CHECK), "render", str(CHART / "values-cpu.yaml"), "-f", str(extra)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0


@pytest.mark.parametrize("values", PROFILES, ids=lambda p: p.name)
def test_grace_period_outlasts_prestop_plus_drain(values, tmp_path):
    docs = render(values)
    config = serving_config(docs, tmp_path)
    pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"]
    pods += [d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
             for d in docs if d["kind"] == "RayService"]
    assert pods
    for pod in pods:
        sleep = int(serve_container(pod)["lifecycle"]["preStop"]["exec"]["command"][1])
        assert pod["terminationGracePeriodSeconds"] > math.ceil(config.server.drain_timeout_s) + sleep


@pytest.mark.parametrize("override", [
    "serving.topology.replicas=four",          # a string where the config wants an int
    "serving.server.port=99999",               # out of range
    "serving.router.policy=random",            # not one of the policies
    "serving.engine.no_such_flag=true",        # unknown key
    "mode=swarm",
])
def test_values_schema_rejects_wrong_values(override):
    result = subprocess.run(["bash", str(CHECK), "render", str(CHART / "values.yaml"), "--set", override],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0, f"--set {override} was accepted"


def test_values_schema_embeds_the_serving_config_schema_unchanged():
    """Drift guard: the chart's `serving` schema is serving/config.py's, not a copy that ages."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    expected = DeploymentConfig.model_json_schema()
    defs = expected.pop("$defs")
    assert schema["properties"]["serving"]["$ref"] == "#/$defs/DeploymentConfig"
    assert schema["$defs"]["DeploymentConfig"] == expected
    for name, sub in defs.items():
        assert schema["$defs"][name] == sub, name


@pytest.mark.parametrize(("values", "config", "sections"), [
    ("values-4x4090d.yaml", "qwen2.5-0.5b-4x4090d.yaml", ("model", "engine", "topology", "router", "server")),
    ("values-cpu.yaml", "local-cpu.yaml", ("model", "engine", "topology", "router", "server")),
    ("values-7b-tp4-kuberay.yaml", "qwen2.5-7b-4x4090d-tp4.yaml", ("model", "engine", "topology")),
])
def test_chart_profiles_serve_what_deploy_configs_say(values, config, sections, tmp_path):
    """Drift guard: a chart profile is its deploy/configs file (plus pod-only settings)."""
    rendered = serving_config(render(CHART / values), tmp_path).model_dump()
    expected = load_config(REPO / "deploy/configs" / config, environ={}).model_dump()
    expected["server"]["host"] = "0.0.0.0"  # in a pod the ingress listens beyond loopback
    for section in sections:
        assert rendered[section] == expected[section], section


def test_images_bake_in_existing_profiles():
    for dockerfile in (REPO / "deploy/docker/Dockerfile.gpu", REPO / "deploy/docker/Dockerfile.cpu"):
        text = dockerfile.read_text()
        (source,) = [line.split()[1] for line in text.splitlines()
                     if line.startswith("COPY ") and line.rstrip().endswith("/etc/qwen-serve/config.yaml")]
        load_config(REPO / source, environ={})
        assert 'ENTRYPOINT ["qwen-serve", "serve", "--config", "/etc/qwen-serve/config.yaml"]' in text
        assert "HEALTHCHECK" in text and "/ready" in text
        assert "\nUSER 10001" in text


@pytest.mark.parametrize("values", PROFILES, ids=lambda p: p.name)
def test_helm4_lints_strictly_and_renders(values):
    subprocess.run(["bash", str(CHECK), "tools"], check=True, timeout=600)  # installs helm-python-sdk
    import helm_python as helm
    from helm_python import chart as helm_chart

    user = yaml.safe_load(values.read_text())
    report = helm_chart.lint(str(CHART), user, strict=True, kube_version="v1.33.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems
    rendered = helm.Chart.load(str(CHART)).render(user, name="qwen", namespace="qwen")
    assert any("kind: ConfigMap" in text for text in rendered.values())


def _keyed_values(tmp_path: Path, text: str) -> Path:
    extra = tmp_path / "keys.yaml"
    extra.write_text("serviceMonitor: {enabled: true}\n" + text)
    return extra


def test_with_api_keys_the_service_monitor_sends_the_metrics_key(tmp_path):
    """Keys on means /metrics needs a key too (config.py): Prometheus must send one."""
    extra = _keyed_values(tmp_path, "secrets: {apiKeys: {existingSecret: keys},"
                                    " metricsKey: {existingSecret: scrape, key: token}}\n")
    docs = render(CHART / "values-cpu.yaml", "-f", str(extra))
    endpoint = one(docs, "ServiceMonitor")["spec"]["endpoints"][0]
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": {"name": "scrape", "key": "token"}}
    assert serving_config(docs, tmp_path).server.metrics_require_key is None  # derived from the keys


def test_with_api_keys_and_no_metrics_key_the_chart_refuses_to_render(tmp_path):
    extra = _keyed_values(tmp_path, "secrets: {apiKeys: {existingSecret: keys}}\n")
    result = subprocess.run(["bash", str(CHECK), "render", str(CHART / "values-cpu.yaml"), "-f", str(extra)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "secrets.metricsKey.existingSecret" in result.stderr


def test_an_open_metrics_route_needs_no_scrape_credential(tmp_path):
    extra = _keyed_values(tmp_path, "secrets: {apiKeys: {existingSecret: keys}}\n"
                                    "serving: {server: {metrics_require_key: false}}\n")
    endpoint = one(render(CHART / "values-cpu.yaml", "-f", str(extra)), "ServiceMonitor")["spec"]["endpoints"][0]
    assert "authorization" not in endpoint
    docs = render(CHART / "values-cpu.yaml")
    assert not [d for d in docs if d["kind"] == "ServiceMonitor"]


def _policies(docs) -> dict[str, dict]:
    return {d["metadata"]["name"].rsplit("-", 1)[1]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}


@pytest.mark.parametrize("values", ["values-4x4090d.yaml", "values-7b-tp4-kuberay.yaml"])
def test_network_policy_opens_only_the_api_port_to_clients(values):
    """Engines (and Ray's ports) answer this release's own pods only: reached directly they
    would skip keys, limits and bounds, and Ray's ports run code on the GPU nodes."""
    docs = render(CHART / values)
    policies = _policies(docs)
    release = {"app.kubernetes.io/name": "qwen-serve", "app.kubernetes.io/instance": "qwen"}
    server = policies.pop("server")
    assert server["podSelector"]["matchLabels"] == {**release, "app.kubernetes.io/component": "server"}
    open_rules = [rule for rule in server["ingress"] if "from" not in rule]
    assert open_rules == [{"ports": [{"port": "http", "protocol": "TCP"}]}]
    for rule in server["ingress"]:
        if "from" in rule and "ports" not in rule:  # any port: only from the release's pods
            assert rule["from"] == [{"podSelector": {"matchLabels": release}}]
    if "kuberay" in values:
        worker = policies.pop("worker")
        assert worker["ingress"] == [{"from": [{"podSelector": {"matchLabels": release}}]}]
    else:
        assert len(server["ingress"]) == 1  # standalone: engines on loopback, only the API
    assert not policies


def test_kuberay_pods_can_start_and_are_hardened(tmp_path):
    extra = tmp_path / "shared-cache.yaml"
    extra.write_text("kuberay: {worker: {modelCacheClaim: shared-weights}}\n")
    cluster = one(render(CHART / "values-7b-tp4-kuberay.yaml", "-f", str(extra)),
                  "RayService")["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]
    # The ingress reaches the head's raylet through the Unix sockets under /tmp/ray.
    for container in head["containers"]:
        assert {"name": "ray-tmp", "mountPath": "/tmp/ray"} in container["volumeMounts"], container["name"]
    assert {"name": "ray-tmp", "emptyDir": {}} in head["volumes"]
    # Probes of its own, so KubeRay adds none that wait for a Serve proxy.
    ray_worker = worker["containers"][0]
    for probe in ("readinessProbe", "livenessProbe"):
        assert "local_raylet_healthz" in " ".join(ray_worker[probe]["exec"]["command"])
    assert {"name": "hf-cache", "persistentVolumeClaim": {"claimName": "shared-weights"}} in worker["volumes"]
    # Autoscaling is on in this profile: only the head (KubeRay's autoscaler) gets an API token.
    assert head["automountServiceAccountToken"] is True and worker["automountServiceAccountToken"] is False
    for pod in (head, worker):
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["securityContext"]["runAsNonRoot"] is True
