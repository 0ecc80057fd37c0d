"""Config → the ingress's settings, the same for a lone ingress and for each worker."""

from __future__ import annotations

from pathlib import Path

from ..config import DeploymentConfig, LimitsConfig
from ..embedded_model import cache_root
from .auth import KeysFile
from .limits import KeyLimiter, Limiter
from .state import IngressSettings


def load_keys(cfg: DeploymentConfig) -> tuple[KeysFile | None, KeysFile | None]:
    """The API keys and the admin keys; raises auth.ApiKeyError naming a bad file's line."""
    srv = cfg.server
    return (KeysFile(srv.api_keys_file) if srv.api_keys_file else None,
            KeysFile(srv.admin_keys_file) if srv.admin_keys_file else None)


def expected_replicas(cfg: DeploymentConfig, planned: int) -> int:
    """How many replicas make the deployment whole (/ready's "ready", the start banner)."""
    auto = cfg.router.autoscaling
    return max(1, auto.min_replicas) if auto else planned


def ingress_settings(cfg: DeploymentConfig, *, expected: int, engine_key: str | None,
                     api_keys: KeysFile | None, admin_keys: KeysFile | None) -> IngressSettings:
    srv = cfg.server
    return IngressSettings(
        model=cfg.served_model_name,
        expected_replicas=expected,
        policy=cfg.router.policy,
        request_timeout_s=srv.request_timeout_s,
        body_timeout_s=srv.body_timeout_s,
        ready_timeout_s=srv.ready_timeout_s,
        min_ready_replicas=srv.min_ready_replicas,
        web_ui=srv.web_ui,
        limits=srv.limits,
        api_keys=api_keys,
        metrics_require_key=srv.metrics_need_key,
        model_revision=cfg.model_revision,
        tokens_per_event=cfg.engine.stream_interval,
        adapters=tuple(sorted(cfg.model.adapters)),
        admin_keys=admin_keys,
        runtime_lora=cfg.engine.runtime_lora,
        max_lora_rank=cfg.engine.max_lora_rank,
        adapter_affinity=cfg.router.adapter_affinity,
        lora_slots=cfg.engine.max_loras,
        state_dir=Path(srv.state_dir) if srv.state_dir else cache_root() / "state",
        engine_key=engine_key,
    )


def make_limiter(limits: LimitsConfig, launcher=None) -> Limiter:
    """Where this process keeps per-key limits: Redis when configured (shared by every
    instance), else the launcher's buckets for an ingress worker (``launcher``: its
    control.ControlClient), else its own."""
    if limits.redis_url and (limits.requests_per_minute or limits.tokens_per_minute):
        from .redis_limits import RedisLimiter

        return RedisLimiter(limits.redis_url, limits.requests_per_minute, limits.tokens_per_minute)
    if launcher is not None:
        from .control import RemoteLimiter

        return RemoteLimiter(launcher, limits.requests_per_minute, limits.tokens_per_minute)
    return KeyLimiter(limits.requests_per_minute, limits.tokens_per_minute)
