"""What the ingress knows while it runs: its settings and the parts built from them.

Built once by ``app.build_app``; the request pipeline (pipeline.py) and the
operations routes (app.py) read it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from functools import cached_property

from ..config import LimitsConfig
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
    web_ui: bool = True
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    api_keys: ApiKeys | KeysFile | None = None
    metrics_require_key: bool = False
    model_revision: str = ""
    # The engine's stream interval: the most tokens one streamed event carries.
    tokens_per_event: int = 1
    # LoRA adapters the engines serve next to the base model (model names).
    adapters: tuple[str, ...] = ()

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

    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self.pool.replicas)
