"""Runtime LoRA adapters through the admin route, against engines that keep score.

The engines here are stand-ins (aiohttp.web) with vLLM's two runtime-adapter routes,
because what is checked is the ingress's bookkeeping across several engines — every
replica or none, a late joiner synced before it gets traffic, the set kept across a
restart — and a failure on one engine of several, which a real engine cannot be made
to produce on cue. The real engine's version (load, use, restart a replica, unload)
is in test_lora_stack.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import httpx
import pytest
import uvicorn
from aiohttp import web

from serving.config import ResponseCacheConfig
from serving.ingress.adapters import STATE_FILE
from serving.ingress.app import IngressSettings, build_app
from serving.ingress.auth import ApiKeys, key_digest
from serving.ingress.pool import ReplicaPool
from serving.ports import bind_reusable

ADMIN = "admin-key-for-tests-0001"
USER = "user-key-for-tests-0001"
ADMIN_AUTH = {"authorization": f"Bearer {ADMIN}"}
USER_AUTH = {"authorization": f"Bearer {USER}"}


class Engine:
    """A stand-in engine that knows which adapters it holds."""

    def __init__(self, refuse_loads: bool = False) -> None:
        self.loaded: dict[str, str] = {}
        self.refuse_loads = refuse_loads
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def load(self, request: web.Request) -> web.Response:
        body = await request.json()
        name = body["lora_name"]
        if self.refuse_loads:
            return web.json_response({"error": {"message": "out of LoRA memory"}}, status=400)
        if name in self.loaded:
            return web.json_response({"error": {"message": f"The lora adapter '{name}' has already been loaded."}},
                                     status=400)
        self.loaded[name] = body["lora_path"]
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(self, request: web.Request) -> web.Response:
        name = (await request.json())["lora_name"]
        if self.loaded.pop(name, None) is None:
            return web.json_response({"error": {"message": f"The lora adapter '{name}' cannot be found."}},
                                     status=404)
        return web.Response(text="ok")

    async def completions(self, request: web.Request) -> web.Response:
        model = (await request.json()).get("model")
        if model != "m" and model not in self.loaded:
            return web.json_response({"error": {"message": f"The model `{model}` does not exist."}}, status=404)
        return web.json_response({"object": "text_completion", "model": model, "choices": [{"text": "x"}]})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def start(self) -> "Engine":
        app = web.Application()
        app.router.add_post("/v1/load_lora_adapter", self.load)
        app.router.add_post("/v1/unload_lora_adapter", self.unload)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/health", self.health)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self

    async def stop(self) -> None:
        await self._runner.cleanup()


class Registry:
    """The registry actor's interface with a replica list a test can change."""

    def __init__(self) -> None:
        self.entries: list[dict] = []
        registry = self

        class Snapshot:
            async def remote(self, max_age_s: float) -> list[dict]:
                return list(registry.entries)

        self.snapshot = Snapshot()

    def add(self, engine: Engine) -> None:
        self.entries.append({"replica_id": f"r{len(self.entries)}", "url": engine.url, "pid": 0})


@contextlib.asynccontextmanager
async def ingress(registry: Registry, state_dir: Path, *, admin: bool = True):
    settings = IngressSettings(
        model="m", expected_replicas=max(1, len(registry.entries)), policy="round_robin",
        api_keys=ApiKeys((key_digest(USER),)),
        admin_keys=ApiKeys((key_digest(ADMIN),)) if admin else None,
        runtime_lora=True, max_lora_rank=16, state_dir=state_dir)
    app = build_app(settings, ReplicaPool(registry), ResponseCacheConfig())
    sock = bind_reusable("127.0.0.1")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    state = app.state.ingress
    try:
        while not server.started or len(state.pool.available()) < len(registry.entries):
            await asyncio.sleep(0.02)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}",
                                     timeout=30) as client:
            yield client, state
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def engines():
    started = [await Engine().start(), await Engine().start()]
    yield started
    for e in started:
        await e.stop()


@pytest.fixture
def adapter(tmp_path) -> Path:
    folder = tmp_path / "note-adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": ["q_proj"]}))
    return folder


async def completion(client: httpx.AsyncClient, model: str) -> httpx.Response:
    # temperature 0: the response cache (on) may answer it
    return await client.post("/v1/completions", headers=USER_AUTH,
                             json={"model": model, "prompt": "a", "temperature": 0})


async def test_an_adapter_loaded_at_runtime_is_on_every_replica_and_served(engines, adapter, tmp_path):
    registry = Registry()
    for e in engines:
        registry.add(e)
    async with ingress(registry, tmp_path / "state") as (client, state):
        put = await client.put("/admin/adapters/note", headers=ADMIN_AUTH, json={"source": str(adapter)})
        assert put.status_code == 200 and put.json()["replicas"] == 2, put.text
        assert all(e.loaded == {"note": str(adapter)} for e in engines)
        answers = [await completion(client, "note") for _ in range(2)]
        assert [a.status_code for a in answers] == [200] * 2
        assert answers[1].headers.get("x-cache") == "hit"
        listing = (await client.get("/admin/adapters", headers=ADMIN_AUTH)).json()
        assert listing["runtime"] == {"note": str(adapter)}
        assert 'model="note"' in state.metrics.render().decode()
        deleted = await client.delete("/admin/adapters/note", headers=ADMIN_AUTH)
        assert deleted.status_code == 200 and all(e.loaded == {} for e in engines)
        gone = await completion(client, "note")  # never the deleted adapter's cached answer
        assert gone.status_code == 404 and gone.headers.get("x-cache") != "hit"
        again = await client.delete("/admin/adapters/note", headers=ADMIN_AUTH)
        assert again.status_code == 404 and again.json()["error"]["code"] == "adapter_not_found"


async def test_user_keys_cannot_change_adapters_and_without_admin_keys_there_is_no_route(
        engines, adapter, tmp_path):
    registry = Registry()
    registry.add(engines[0])
    async with ingress(registry, tmp_path / "state") as (client, _):
        for headers in (USER_AUTH, {}):
            resp = await client.put("/admin/adapters/note", headers=headers, json={"source": str(adapter)})
            assert resp.status_code == 401 and set(resp.json()["error"]) == {"message", "type", "param", "code"}
        assert engines[0].loaded == {}
    async with ingress(registry, tmp_path / "state", admin=False) as (client, _):
        resp = await client.put("/admin/adapters/note", headers=ADMIN_AUTH, json={"source": str(adapter)})
        assert resp.status_code == 404


@pytest.mark.parametrize(("name", "body", "status", "param"), [
    ("bad name!", {"source": "x"}, 400, "name"),
    ("m", {"source": "x"}, 409, "name"),                    # the base model's own name
    ("note", {}, 400, "source"),
    ("note", {"source": "/no/such/folder"}, 400, "source"),
    ("note", {"source": "RANK64"}, 400, "source"),          # above engine.max_lora_rank
])
async def test_bad_changes_are_refused_with_the_param(engines, tmp_path, name, body, status, param):
    registry = Registry()
    registry.add(engines[0])
    if body.get("source") == "RANK64":
        big = tmp_path / "big"
        big.mkdir()
        (big / "adapter_config.json").write_text(json.dumps({"r": 64}))
        body = {"source": str(big)}
    async with ingress(registry, tmp_path / "state") as (client, _):
        resp = await client.put(f"/admin/adapters/{name}", headers=ADMIN_AUTH, json=body)
    assert resp.status_code == status and resp.json()["error"]["param"] == param, resp.text
    assert engines[0].loaded == {}


async def test_a_load_one_replica_refuses_is_undone_on_the_others(adapter, tmp_path):
    good, bad = await Engine().start(), await Engine(refuse_loads=True).start()
    registry = Registry()
    registry.add(good)
    registry.add(bad)
    try:
        async with ingress(registry, tmp_path / "state") as (client, _):
            resp = await client.put("/admin/adapters/note", headers=ADMIN_AUTH, json={"source": str(adapter)})
            assert resp.status_code == 400 and resp.json()["error"]["code"] == "adapter_load_failed"
            assert "out of LoRA memory" in resp.json()["error"]["message"]
            assert good.loaded == {} and bad.loaded == {}
            assert (await client.get("/admin/adapters", headers=ADMIN_AUTH)).json()["runtime"] == {}
        assert not (tmp_path / "state" / STATE_FILE).exists()
    finally:
        await good.stop()
        await bad.stop()


async def test_a_replica_that_joins_later_and_a_restarted_ingress_get_the_set(engines, adapter, tmp_path):
    first, later = engines
    registry = Registry()
    registry.add(first)
    async with ingress(registry, tmp_path / "state") as (client, state):
        assert (await client.put("/admin/adapters/note", headers=ADMIN_AUTH,
                                 json={"source": str(adapter)})).status_code == 200
        registry.add(later)  # a restart or a scale-up
        while len(state.pool.available()) < 2:
            await asyncio.sleep(0.05)
        assert later.loaded == {"note": str(adapter)}  # before it was given any request
        assert [(await client.post("/v1/completions", headers=USER_AUTH, json={
            "model": "note", "prompt": f"a{i}"})).status_code for i in range(4)] == [200] * 4
    # The ingress restarts; its engines start without runtime adapters.
    fresh = await Engine().start()
    try:
        restarted = Registry()
        restarted.add(fresh)
        async with ingress(restarted, tmp_path / "state") as (client, _):
            assert fresh.loaded == {"note": str(adapter)}
            assert (await completion(client, "note")).status_code == 200
    finally:
        await fresh.stop()
