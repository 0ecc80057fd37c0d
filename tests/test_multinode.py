"""Two nodes for real: a Ray head in one network namespace, a worker node in another.

The head node (namespace A) has no CPUs for tasks, so the engine replica can only
land on the worker node (namespace B); the stack's ingress runs in A, joins the
cluster with ``qwen-serve serve --address`` and reaches the engine across the veth
pair. The cluster asks for Ray's token (``RAY_AUTH_MODE=token``): the nodes and the
ingress have it, a client without it is refused. Traffic goes only to loopback and
to the pair's addresses inside the two namespaces this module creates; both are
deleted afterwards with everything that ran in them (tests/netns.py).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
import yaml

from benchmarks.stacks import DEFAULT_CONFIG, ROOT
from netns import Namespace, available, veth_pair
from serving.engine import guard

pytestmark = [pytest.mark.stack,
              pytest.mark.skipif(available() is not None, reason=f"network namespaces: {available()}")]

RAY_PORT = 6379
INGRESS_PORT = 8000  # inside namespace A: nothing else listens there
ENGINE_KEY = "multinode-test-engine-key-5d1c"
RAY = str(Path(sys.executable).with_name("ray"))


@dataclass
class Cluster:
    head: Namespace
    worker: Namespace
    env: dict[str, str]  # what a member of the cluster runs with (the token)
    base_url: str  # the ingress, reachable from inside the head namespace
    proc: subprocess.Popen
    log: Path

    def get(self, path: str, **kw) -> httpx.Response:
        return self.head.run(lambda: httpx.get(f"{self.base_url}{path}", timeout=30, **kw))


def _ray_start(ns: Namespace, env: dict[str, str], tmp: Path, *args: str) -> None:
    result = subprocess.run(ns.command(RAY, "start", f"--node-ip-address={ns.address}",
                                       f"--temp-dir={tmp / ns.name[-1]}", "--disable-usage-stats", *args),
                            env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def _wait_ready(cluster: Cluster, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cluster.proc.poll() is not None:
            raise RuntimeError(f"qwen-serve exited ({cluster.proc.returncode}):\n"
                               f"{cluster.log.read_text()[-3000:]}")
        try:
            if cluster.get("/ready").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"not ready after {timeout_s:.0f} s:\n{cluster.log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("multinode")
    # Ray's sockets live under its temp dir, and a socket path has at most 107 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="qs-ray-"))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        # Leaving the block stops whatever still runs in the namespaces (the Ray nodes).
        with veth_pair() as (head, worker):
            # No CPUs on the head for tasks: the engine replica must go to the worker node.
            _ray_start(head, env, ray_tmp, "--head", f"--port={RAY_PORT}", "--num-cpus=0",
                       "--include-dashboard=false")
            _ray_start(worker, env, ray_tmp, f"--address={head.address}:{RAY_PORT}", "--num-cpus=2")
            with _stack(head, worker, env, tmp / "stack.log") as cluster:
                yield cluster
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _start_ingress(head: Namespace, env: dict[str, str], log: Path,
                   port: int = INGRESS_PORT) -> subprocess.Popen:
    """`qwen-serve serve` in the head's namespace, joined to the cluster."""
    with log.open("wb") as out:
        return subprocess.Popen(
            head.command(sys.executable, "-m", "serving", "serve", "--config", str(DEFAULT_CONFIG),
                         "--address", f"{head.address}:{RAY_PORT}",
                         "--host", "127.0.0.1", "--port", str(port),
                         # Engines listen on their node's address, for the ingress on the other.
                         "--set", "server.replica_host=0.0.0.0",
                         "--set", "engine.enforce_eager=true",
                         "--set", "engine.cpu_kv_cache_bytes=536870912"),
            env={**env, guard.ENV: ENGINE_KEY}, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


@contextmanager
def _stack(head: Namespace, worker: Namespace, env: dict[str, str], log: Path) -> Iterator[Cluster]:
    """The ingress, joined to the cluster, with its engine ready; stopped on exit."""
    cluster = Cluster(head, worker, env, f"http://127.0.0.1:{INGRESS_PORT}", _start_ingress(head, env, log), log)
    try:
        _wait_ready(cluster, 600)
        yield cluster
    finally:
        proc = cluster.proc  # a test may have replaced it
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _replica(cluster: Cluster) -> dict:
    replicas = cluster.get("/ready").json()["replicas"]
    assert len(replicas) == 1, replicas
    return replicas[0]


def ask_registry(cluster: Cluster, call: str):
    """``call`` on the registry actor (e.g. ``snapshot.remote(60.0)``), from a driver in the
    head's namespace that has the cluster's token; its result, through JSON."""
    code = ("import json, ray; from serving.engine.registry import get_registry;"
            f"ray.init(address='{cluster.head.address}:{RAY_PORT}', log_to_driver=False,"
            " logging_level='error');"
            f"print(json.dumps(ray.get(get_registry().{call})))")
    out = subprocess.run(cluster.head.command(sys.executable, "-c", code), env=cluster.env,
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def engine_url(cluster: Cluster) -> str:
    """The engine's URL as the ingress uses it (the registry's entry)."""
    entries = ask_registry(cluster, "snapshot.remote(3600.0)")
    assert len(entries) == 1, entries
    return entries[0]["url"]


def test_chat_is_served_through_the_ingress_by_an_engine_on_the_other_node(cluster):
    url = engine_url(cluster)
    assert httpx.URL(url).host == cluster.worker.address  # the worker node's side of the pair
    replica = _replica(cluster)
    assert replica["ready"] is True, replica

    def chat() -> tuple[str, str]:
        client = openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        messages = [{"role": "user", "content": "Say hello in one word."}]
        plain = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
        streamed = "".join(chunk.choices[0].delta.content or ""
                           for chunk in client.chat.completions.create(
                               model=model, messages=messages, max_tokens=8, temperature=0, stream=True)
                           if chunk.choices)
        return plain.choices[0].message.content, streamed

    plain, streamed = cluster.head.run(chat)
    assert plain and plain == streamed  # temperature 0: the same answer either way


def test_the_registry_lives_on_the_head_node(cluster):
    """Not on a worker node the autoscaler may remove: it holds the engines' key."""
    pid = ask_registry(cluster, "pid.remote()")
    assert cluster.head.holds(pid) and not cluster.worker.holds(pid)


def test_an_entry_not_signed_with_the_engine_key_is_never_routed_to(cluster):
    """Any holder of the cluster's token can write to the registry. The engine key (here
    provided by the deployment, so never stored on the cluster) signs the replicas'
    entries; the ingress ignores the rest."""
    decoy = f"http://{cluster.head.address}:9"  # inside our own namespace; nothing listens
    ask_registry(cluster, f"register.remote('decoy', '{decoy}', 1, 'not-a-proof')")
    assert "decoy" in {e["replica_id"] for e in ask_registry(cluster, "snapshot.remote(3600.0)")}
    time.sleep(1.5)  # past the pool's refresh and the cached /ready answer
    ready = cluster.get("/ready").json()
    assert [r["replica"] for r in ready["replicas"]] != [] and all(
        r["replica"] != "decoy" for r in ready["replicas"]), ready
    served = cluster.head.run(lambda: [httpx.post(f"{cluster.base_url}/v1/completions", timeout=60,
                                                  json={"prompt": "Hi", "max_tokens": 2}).status_code
                                       for _ in range(4)])
    assert served == [200] * 4


def test_the_engine_process_runs_in_the_worker_namespace(cluster):
    port = httpx.URL(engine_url(cluster)).port
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, timeout=30)
    # The port is not listening here (the host namespace)...
    assert str(port) not in out.stdout
    pids = [pid for pid in cluster.worker.pids()
            if "vllm.entrypoints.openai.api_server" in Path(f"/proc/{pid}/cmdline").read_bytes().decode()
            .replace("\0", " ")]
    # ...but a vLLM server does, inside the worker's namespace, and none in the head's.
    assert pids and all(cluster.worker.holds(pid) for pid in pids)
    assert not [pid for pid in cluster.head.pids()
                if b"vllm.entrypoints" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def chart_worker_probe() -> list[str]:
    """The readiness probe the Helm chart gives KubeRay's worker pods."""
    rendered = subprocess.run(["bash", str(ROOT / "deploy/check.sh"), "render",
                               str(ROOT / "helm/qwen-serve/values-7b-tp4-kuberay.yaml")],
                              capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    (service,) = [d for d in yaml.safe_load_all(rendered.stdout) if d and d["kind"] == "RayService"]
    (worker,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return worker["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["command"]


def test_the_charts_worker_probe_passes_on_a_real_worker_node(cluster):
    """The chart sets its own worker probe (KubeRay's default asks for a Serve proxy this
    stack never runs): it must pass on a live, token-authenticated worker node."""
    ok = subprocess.run(cluster.worker.command(*chart_worker_probe()), env=cluster.env,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr[-2000:]


ENGINE_ROUTES = [("POST", "/v1/chat/completions",
                  {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
                 ("POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 2}),
                 ("POST", "/tokenize", {"prompt": "Hello world"}), ("GET", "/metrics", None),
                 ("GET", "/v1/models", None), ("GET", "/health", None), ("GET", "/load", None)]


def test_the_engine_refuses_callers_from_the_other_node_without_the_credential(cluster):
    url = engine_url(cluster)

    def call_all() -> dict[str, int]:
        return {path: httpx.request(method, url + path, json=body, timeout=30).status_code
                for method, path, body in ENGINE_ROUTES}

    refused = cluster.head.run(call_all)
    assert all(code in (401, 403) for code in refused.values()), refused
    with_key = cluster.head.run(lambda: httpx.get(f"{url}/health", headers=guard.headers(ENGINE_KEY),
                                                  timeout=30).status_code)
    assert with_key == 200  # the same route, with the deployment's credential


def test_a_ray_client_without_the_token_cannot_join(cluster):
    """A wrong token and none at all; both tries at once (each retries for about 20 s)."""
    code = ("import ray\n"
            f"ray.init(address='{cluster.head.address}:{RAY_PORT}', log_to_driver=False)\n"
            "print('JOINED', ray.get(ray.remote(lambda: 'ran on the cluster').remote()))\n")
    base = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    tries = {"wrong-token": {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"},
             "no-token": {**base, "RAY_AUTH_MODE": "disabled"}}
    procs = {name: subprocess.Popen(cluster.head.command(sys.executable, "-c", code), env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, env in tries.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode != 0 and "JOINED" not in out, name
        assert "Authentication token is missing or incorrect" in err, (name, err[-2000:])


def engine_processes(ns: Namespace) -> set[int]:
    """PIDs of vLLM's servers running in ``ns``."""
    out = set()
    for pid in ns.pids():
        try:
            if b"vllm.entrypoints.openai.api_server" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.add(pid)
        except OSError:
            continue
    return out


def test_zz_a_restarted_ingress_attaches_to_the_engines_it_left_running(cluster, tmp_path):
    """A liveness kill, an OOM or an upgrade of the ingress must not restart the engines
    (minutes for a 7B model): they keep running, and the next ingress attaches to them."""
    engines = engine_processes(cluster.worker)
    assert engines
    stop, outcomes = threading.Event(), []

    def load() -> None:  # short completions, one after another, as long as the test runs
        with httpx.Client(base_url=cluster.base_url, timeout=30) as client:
            while not stop.is_set():
                try:
                    status = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4}).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                outcomes.append((time.monotonic(), status))
                time.sleep(0.05)

    loader = cluster.head.start(load)
    time.sleep(3)
    cluster.proc.kill()  # SIGKILL: no drain, no cleanup
    cluster.proc.wait(30)
    killed = time.monotonic()
    time.sleep(3)
    assert engine_processes(cluster.worker) == engines  # nothing followed the ingress down
    cluster.proc = _start_ingress(cluster.head, cluster.env, tmp_path / "restarted.log")
    started = time.monotonic()
    while not any(t > started and status == 200 for t, status in outcomes):
        assert cluster.proc.poll() is None, (tmp_path / "restarted.log").read_text()[-3000:]
        assert time.monotonic() - started < 120, (tmp_path / "restarted.log").read_text()[-3000:]
        time.sleep(0.1)
    serving_after = min(t for t, status in outcomes if t > started and status == 200) - started
    time.sleep(2)
    stop.set()
    loader.join(60)
    before = [s for t, s in outcomes if t < killed - 0.5]
    after = [s for t, s in outcomes if t > started + serving_after]
    print(f"\nrestarted ingress served after {serving_after:.1f} s from its start; "
          f"{len(before)} requests before the kill, {len(after)} after the restart")
    assert before and all(s == 200 for s in before)
    assert after and all(s == 200 for s in after)
    assert engine_processes(cluster.worker) == engines  # the same engine processes
    assert "attaching to the engines already running" in (tmp_path / "restarted.log").read_text()
    # Generous (the acceptance figure is 5 s, measured above): a redeploy would take a minute.
    assert serving_after < 30


def test_zz_b_a_second_ingress_serves_the_same_engines_beside_the_first(cluster, tmp_path):
    """Two ingress instances (HA): the second attaches to the running engines, both serve,
    and stopping one leaves the engines to the other. Each instance keeps its own limits
    and in-flight counts (README: several ingress instances)."""
    engines = engine_processes(cluster.worker)
    log = tmp_path / "second.log"
    second = _start_ingress(cluster.head, cluster.env, log, port=INGRESS_PORT + 1)
    try:
        base = f"http://127.0.0.1:{INGRESS_PORT + 1}"
        deadline = time.monotonic() + 120
        while True:
            assert second.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if cluster.head.run(lambda: httpx.get(f"{base}/ready", timeout=10).status_code) == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        body = {"prompt": "Hi", "max_tokens": 2}
        both = cluster.head.run(lambda: [httpx.post(f"{b}/v1/completions", json=body, timeout=60).status_code
                                         for b in (cluster.base_url, base)])
        assert both == [200, 200]
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(90)
    assert second.returncode == 0 and "attaching to the engines already running" in log.read_text()
    assert engine_processes(cluster.worker) == engines
    assert cluster.get("/ready").status_code == 200  # the first one still serves


def test_zzz_down_stops_the_engines(cluster):
    result = subprocess.run(cluster.head.command(sys.executable, "-m", "serving", "down", "--address",
                                                 f"{cluster.head.address}:{RAY_PORT}"),
                            env=cluster.env, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert result.returncode == 0 and "engines stopped" in result.stdout, result.stderr[-2000:]
    deadline = time.monotonic() + 30
    while engine_processes(cluster.worker):
        assert time.monotonic() < deadline, "an engine outlived `qwen-serve down` by 30 s"
        time.sleep(0.5)
    assert cluster.get("/ready").status_code == 503
