"""``/admin/adapters``: list, load and unload LoRA adapters while serving.

Guarded by the admin keys (``server.admin_keys_file``), never by the user keys: a
user key that could load an adapter could make every tenant's requests for that name
run weights of its choosing. Without admin keys the routes do not exist (404).

- ``GET /admin/adapters``: the static adapters (config) and the runtime ones.
- ``PUT /admin/adapters/{name}`` ``{"source": folder | hub id | "embedded:…"}``: load
  it on every replica (or on none), persist it.
- ``DELETE /admin/adapters/{name}``: unload it everywhere, forget it.
"""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..config import AdapterConfig
from ..lora import AdapterError, read_adapter
from .adapters import NAME, AdapterChangeError, add, remove
from .auth import bearer_token
from .errors import error_response
from .state import IngressState


def admin_routes(state: IngressState) -> list[Route]:
    settings = state.settings
    if settings.admin_keys is None:
        return []

    def denied(request: Request) -> Response | None:
        if settings.admin_keys.check(bearer_token(request.headers.get("authorization"))) is None:
            return error_response(401, "This route needs an admin key.", code="invalid_api_key",
                                  headers={"WWW-Authenticate": "Bearer"})
        if not settings.runtime_lora:
            return error_response(409, "Runtime adapters are off: set engine.runtime_lora: true.",
                                  code="runtime_lora_disabled")
        return None

    async def listing(request: Request) -> Response:
        if (refused := denied(request)) is not None:
            return refused
        return JSONResponse({"base": settings.model, "static": sorted(settings.adapters),
                             "runtime": dict(sorted(state.runtime_adapters.adapters.items()))})

    async def put(request: Request) -> Response:
        if (refused := denied(request)) is not None:
            return refused
        name = request.path_params["name"]
        try:
            source = _source(name, await request.body(), settings)
            replicas = await add(state, name, source)
        except AdapterChangeError as exc:
            return error_response(exc.status, exc.message, code=exc.code, param=exc.param)
        return JSONResponse({"name": name, "source": source, "replicas": replicas})

    async def delete(request: Request) -> Response:
        if (refused := denied(request)) is not None:
            return refused
        try:
            await remove(state, request.path_params["name"])
        except AdapterChangeError as exc:
            return error_response(exc.status, exc.message, code=exc.code, param=exc.param)
        return JSONResponse({"name": request.path_params["name"], "deleted": True})

    return [Route("/admin/adapters", listing, methods=["GET"]),
            Route("/admin/adapters/{name}", put, methods=["PUT"]),
            Route("/admin/adapters/{name}", delete, methods=["DELETE"])]


def _source(name: str, raw: bytes, settings) -> str:
    """What vLLM loads for ``name``, checked as the planner checks static adapters."""
    if not NAME.match(name):
        raise AdapterChangeError(400, "An adapter name is 1-128 letters, digits, '.', '_' or '-'.",
                                 code="invalid_value", param="name")
    if name == settings.model or name in settings.adapters:
        raise AdapterChangeError(409, f"{name!r} is already served (the base model or a static adapter).",
                                 code="adapter_exists", param="name")
    try:
        body = json.loads(raw)
        source = body["source"]
        if not isinstance(source, str) or not source:
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise AdapterChangeError(400, 'The body must be {"source": "<folder, hub id or embedded:name>"}.',
                                 code="invalid_value", param="source") from None
    try:
        facts = read_adapter(name, AdapterConfig(source=source))
    except AdapterError as exc:
        raise AdapterChangeError(400, str(exc), code="invalid_value", param="source") from None
    if facts.rank is not None and facts.rank > settings.max_lora_rank:
        raise AdapterChangeError(400, f"The adapter's rank {facts.rank} is above engine.max_lora_rank="
                                      f"{settings.max_lora_rank}.", code="invalid_value", param="source")
    return facts.path
