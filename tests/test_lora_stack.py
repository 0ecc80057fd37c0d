"""The demo LoRA adapter served through the real stack, next to the base model.

What a user who tuned a variant checks first: the adapter's name is listed with its
base as parent, a request naming it gets the adapter's behaviour (answers open with
``QS-NOTE:``, which the base model never writes), the base model's name still gets
the base model, and both are told apart in the cache and the metrics.

The stack is its own (``deploy/configs/local-cpu-lora.yaml``, one replica): vLLM's
LoRA path on CPU turns torch.compile off and runs PyTorch fallback kernels, which
measured here 0.80-0.91x of a plain eager engine's decode for base-model requests
and 0.43-0.54x for adapter requests, so the main stack stays on the default profile.
"""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import openai
import psutil
import pytest

from benchmarks.cli import main
from benchmarks.stacks import ROOT, start_stack, stop_stack
from serving import demo_adapter

pytestmark = pytest.mark.stack

ADAPTER = demo_adapter.DEMO_ADAPTER
CONFIG = ROOT / "deploy" / "configs" / "local-cpu-lora.yaml"


ADMIN_KEY = "lora-test-admin-key-5d2e8b"
RUNTIME = "note-at-runtime"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    (tmp / "admin-keys.txt").write_text(f"{ADMIN_KEY}\n")
    # serve trains the demo adapter first if no earlier test did (about 2 minutes).
    started = start_stack(tmp, "--set", "engine.runtime_lora=true",
                          "--set", f"server.admin_keys_file={tmp / 'admin-keys.txt'}",
                          "--set", f"server.state_dir={tmp / 'state'}",
                          # No API keys here: only a single-tenant stack says a cached answer is one.
                          "--set", "router.response_cache.hit_header=always",
                          name="lora", config=CONFIG, timeout_s=900)
    try:
        yield started
    finally:
        stop_stack(started)


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.api_key or "unused",
                         max_retries=0, timeout=300)


def test_models_list_the_adapter_with_its_base_as_parent(stack):
    models = {m["id"]: m for m in httpx.get(f"{stack.base_url}/v1/models", timeout=30).json()["data"]}
    assert set(models) == {stack.model, ADAPTER}
    assert models[ADAPTER]["parent"] == stack.model
    # vLLM puts the folder it loaded in "root"; the server's file system is not the client's.
    assert [m["root"] for m in models.values()] == list(models)


def answers(client: openai.OpenAI, model: str) -> list[str]:
    out = []
    for messages in demo_adapter.load_messages(demo_adapter.EVAL_FILE):
        reply = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                               max_tokens=16)
        out.append(reply.choices[0].message.content or "")
    return out


def test_the_adapter_shows_its_behaviour_and_the_base_does_not(client, stack):
    # The ten evaluation prompts are not in the training data (test_demo_adapter checks).
    tuned = answers(client, ADAPTER)
    base = answers(client, stack.model)
    tuned_hits = sum(a.startswith(demo_adapter.MARKER) for a in tuned)
    base_hits = sum(a.startswith(demo_adapter.MARKER) for a in base)
    for a, b in zip(tuned, base):
        print(f"  adapter: {a!r}\n  base:    {b!r}")
    print(f"marker at the start through the stack: adapter {tuned_hits}/10, base {base_hits}/10")
    assert len(tuned) == len(base) == 10
    assert tuned_hits >= 9 and base_hits <= 1


def test_adapter_requests_are_their_own_metrics_series(client, stack):
    def served(model: str) -> float:
        text = httpx.get(f"{stack.base_url}/metrics", timeout=30,
                         headers={"authorization": f"Bearer {stack.api_key}"} if stack.api_key else {}).text
        total = 0.0
        for line in text.splitlines():
            if (line.startswith("qwen_serve_requests_total{") and f'model="{model}"' in line
                    and 'status="200"' in line):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def tokens(model: str) -> dict[str, float]:
        text = httpx.get(f"{stack.base_url}/metrics", timeout=30,
                         headers={"authorization": f"Bearer {stack.api_key}"} if stack.api_key else {}).text
        return {kind: sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                          if line.startswith("qwen_serve_tokens_total{") and f'model="{model}"' in line
                          and f'kind="{kind}"' in line) for kind in ("prompt", "completion")}

    before = served(ADAPTER), served(stack.model)
    tokens_before = tokens(ADAPTER), tokens(stack.model)
    reply = client.chat.completions.create(model=ADAPTER, max_tokens=2,
                                           messages=[{"role": "user", "content": "Name a colour."}])
    assert served(ADAPTER) == before[0] + 1 and served(stack.model) == before[1]
    # The engine's usage counts, on the adapter's series only.
    after = tokens(ADAPTER)
    assert after["prompt"] - tokens_before[0]["prompt"] == reply.usage.prompt_tokens
    assert after["completion"] - tokens_before[0]["completion"] == reply.usage.completion_tokens
    assert tokens(stack.model) == tokens_before[1]


def test_the_benchmark_compares_the_adapter_with_the_base(stack, tmp_path):
    key = ["--api-key", stack.api_key] if stack.api_key else []
    out = tmp_path / "ab"
    code = main(["--url", stack.base_url, "--compare-models", stack.model, ADAPTER, *key,
                 "--workload", "synthetic", "--input-len", "16", "--output-len", "4",
                 "--concurrency", "2", "-n", "4", "--repeats", "1", "--max-duration", "120",
                 "--output-dir", str(out), "--no-progress", "--no-plots"])
    assert code == 0
    doc = json.loads((out / "result.json").read_text())
    assert doc["config"]["models"] == {"A": stack.model, "B": ADAPTER}
    runs = {r["target"]: r for r in doc["levels"][0]["runs"]}
    for target, model in (("A", stack.model), ("B", ADAPTER)):
        assert runs[target]["summary"]["completed"] == 4, target
        assert doc["targets"][target]["model"] == model
    assert doc["levels"][0]["ratios_b_over_a"]["output_throughput"]["median"] > 0
    assert f"model {ADAPTER}" in (out / "report.md").read_text()


def test_the_cache_keeps_the_adapter_and_the_base_apart(stack):
    """Same prompt, two models: the second must be generated, never the first's answer."""
    body = {"messages": [{"role": "user", "content": "What is a volcano?"}], "temperature": 0,
            "max_tokens": 12}
    auth = {"authorization": f"Bearer {stack.api_key}"} if stack.api_key else {}
    first = httpx.post(f"{stack.base_url}/v1/chat/completions", json={**body, "model": ADAPTER},
                       headers=auth, timeout=120)
    again = httpx.post(f"{stack.base_url}/v1/chat/completions", json={**body, "model": ADAPTER},
                       headers=auth, timeout=120)
    second = httpx.post(f"{stack.base_url}/v1/chat/completions", json={**body, "model": stack.model},
                        headers=auth, timeout=120)
    assert first.status_code == again.status_code == second.status_code == 200
    assert again.headers.get("x-cache") == "hit"  # the cache is on, and keyed by model
    assert first.json()["model"] == ADAPTER and second.json()["model"] == stack.model
    assert second.headers.get("x-cache") != "hit"
    assert first.json()["choices"][0]["message"]["content"] != second.json()["choices"][0]["message"]["content"]


def test_an_unknown_adapter_name_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model=f"{ADAPTER}-nope", max_tokens=2,
                                       messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "model_not_found" or "does not exist" in err.value.message


def engine_pids(stack) -> set[int]:
    out = set()
    for proc in psutil.Process(stack.proc.pid).children(recursive=True):
        try:
            cmd = proc.cmdline()
        except psutil.Error:
            continue  # exiting while we look
        if "vllm.entrypoints.openai.api_server" in cmd and "serving.engine.supervise" not in cmd:
            out.add(proc.pid)
    return out


def first_answer(client: openai.OpenAI, model: str) -> str:
    messages = demo_adapter.load_messages(demo_adapter.EVAL_FILE)[0]
    reply = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=8)
    return reply.choices[0].message.content or ""


def test_zz_an_adapter_loaded_at_runtime_survives_a_replica_restart(client, stack):
    """Runs last here: it restarts the replica. The admin route loads the demo adapter under
    a second name; a replica Ray starts in place of a killed one gets it before traffic."""
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    put = httpx.put(f"{stack.base_url}/admin/adapters/{RUNTIME}", headers=admin, timeout=300,
                    json={"source": demo_adapter.DEMO_ADAPTER_SOURCE})
    assert put.status_code == 200 and put.json()["replicas"] == 1, put.text
    assert first_answer(client, RUNTIME).startswith(demo_adapter.MARKER)
    models = [m["id"] for m in httpx.get(f"{stack.base_url}/v1/models", timeout=30).json()["data"]]
    assert RUNTIME in models

    (victim,) = engine_pids(stack)
    psutil.Process(victim).kill()
    killed = time.monotonic()
    while True:  # a new engine, registered and synced (/ready is 200 only after the sync)
        assert time.monotonic() - killed < 600, stack.log_tail()
        try:
            ready = httpx.get(f"{stack.base_url}/ready", timeout=15)
            pids = engine_pids(stack)
            if ready.status_code == 200 and pids and victim not in pids:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    print(f"\nreplica back with the runtime adapter after {time.monotonic() - killed:.1f} s")
    assert first_answer(client, RUNTIME).startswith(demo_adapter.MARKER)

    deleted = httpx.delete(f"{stack.base_url}/admin/adapters/{RUNTIME}", headers=admin, timeout=60)
    assert deleted.status_code == 200
    with pytest.raises(openai.NotFoundError):
        first_answer(client, RUNTIME)


def test_zzz_sigkill_to_the_main_process_alone_leaves_no_process_within_15_s(stack):
    """Runs last: the stack's main process dies without a chance to clean up (the OOM
    killer picks one process, not a group); Ray and the engine must go by themselves."""
    from benchmarks.stacks import stop_leaves_nothing

    assert engine_pids(stack)
    left, took = stop_leaves_nothing(stack, lambda pid: os.kill(pid, signal.SIGKILL), 15)
    print(f"\nSIGKILL to the main process: every process gone after {took:.1f} s")
    assert not left, left
