"""What the ingress knows while it runs: its settings and the parts built from them.

Built once by ``app.build_app``; the request pipeline (pipeline.py) and the
operations routes (app.py) read it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from ..config import LimitsConfig
from .adapter_routing import AdapterPlacement
from .adapters import RuntimeAdapters
from .admission import Admission
from .auth import ApiKeys, KeysFile
from .cache import RedisResponseCache, ResponseCache
from .metrics import RouterMetrics
from .pool import ReplicaPool
from .routing import RoutingPolicy
from .upstream import Upstream


@dataclass
class IngressSettings:
    model: str
    expected_replicas: int
    policy: str = "power_of_two"
    request_timeout_s: float = 600.0
    body_timeout_s: float = 60.0
    ready_timeout_s: float = 10.0
    min_ready_replicas: int = 1
    web_ui: bool = True
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    api_keys: ApiKeys | KeysFile | None = None
    metrics_require_key: bool = False
    model_revision: str = ""
    # The engine's stream interval: the most tokens one streamed event carries.
    tokens_per_event: int = 1
    # LoRA adapters the engines serve next to the base model (model names).
    adapters: tuple[str, ...] = ()
    # Runtime adapters (admin.py): the admin keys, whether engines allow it, their
    # slot size, and where the set is kept (None: not kept across restarts).
    admin_keys: ApiKeys | KeysFile | None = None
    runtime_lora: bool = False
    max_lora_rank: int = 16
    state_dir: Path | None = None
    # Adapter requests prefer replicas holding the adapter; engine.max_loras slots each.
    adapter_affinity: bool = True
    lora_slots: int = 1
    # The engines' credential (serving/engine/guard.py); None: engines run unguarded.
    engine_key: str | None = None

    @cached_property
    def served_models(self) -> frozenset[str]:
        """Model names with their own metrics series (anything else is "other")."""
        return frozenset((self.model, *self.adapters))


@dataclass
class IngressState:
    settings: IngressSettings
    pool: ReplicaPool
    policy: RoutingPolicy
    metrics: RouterMetrics
    admission: Admission
    cache: ResponseCache | RedisResponseCache | None = None
    upstream: Upstream = field(default_factory=Upstream)
    draining: bool = False
    ready_cache: tuple[float, int, dict] | None = None
    ready_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    runtime_adapters: RuntimeAdapters = field(default_factory=lambda: RuntimeAdapters(None))
    placement: AdapterPlacement | None = None

    def answer_revision(self, model: object) -> str:
        """What the cache keys answers by: the deployment's weights, and for a runtime
        adapter its source, so an adapter deleted or replaced never answers from the cache."""
        source = self.runtime_adapters.adapters.get(model) if isinstance(model, str) else None
        revision = self.settings.model_revision
        return f"{revision};runtime:{model}={source}" if source is not None else revision

    def adapter_of(self, model: object) -> str | None:
        """``model`` if it names a LoRA adapter (static or runtime), else None."""
        if model in self.settings.adapters or model in self.runtime_adapters.adapters:
            return model  # type: ignore[return-value]
        return None

    def model_label(self, model: object) -> str:
        """The metrics label for a request's model: served names as they are, else "other"."""
        if model in self.settings.served_models or model in self.runtime_adapters.adapters:
            return model  # type: ignore[return-value]
        return "other"

    @property
    def in_flight(self) -> int:
        """Requests in flight on every replica, from every ingress worker."""
        return sum(r.in_flight for r in self.pool.replicas)

    @property
    def own_in_flight(self) -> int:
        """Requests this process is relaying (what its drain waits for)."""
        return sum(r.own_in_flight for r in self.pool.replicas)
