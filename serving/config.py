"""Typed deployment configuration, loaded from one YAML file.

One file describes a whole deployment (model, engine, topology, router, server).
pydantic does the validation: ``extra="forbid"`` turns an unknown key into an error
and ``strict=True`` stops YAML's ``"8000"`` from silently becoming ``8000``. Every
error is re-raised as :class:`ConfigError`, naming the file and the dotted key path,
so the CLI can print one line and exit 2 instead of a traceback.

Overrides of single fields come from environment variables
(``QWEN_SERVE__SERVER__PORT=8001``) and from the CLI (``--set server.port=8001``);
their values are parsed as YAML scalars so ``8001`` is an int and ``true`` a bool.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .embedded_model import EMBEDDED_SOURCE
from .quantization import METHODS, check_name

ENV_PREFIX = "QWEN_SERVE__"
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

Device = Literal["auto", "cuda", "cpu"]
RoutingPolicy = Literal["round_robin", "power_of_two", "prefix_affinity"]


class ConfigError(Exception):
    """A configuration problem a user can fix; the message says where and what."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class AdapterConfig(_Section):
    """A LoRA adapter served next to the base model, under its own model name."""

    # A local folder (adapter_config.json + weights), a hub id, or
    # "embedded:smollm2-demo-note" (the demo adapter `qwen-serve model prepare` trains).
    source: str
    # If set, the adapter must say it was trained on this base revision
    # (adapter_config.json "revision"): an adapter on the wrong base still loads, and
    # answers badly.
    base_revision: str | None = None


class YarnConfig(_Section):
    """YaRN rope scaling: context = factor × original_max_position_embeddings."""

    factor: float = Field(gt=1.0)
    original_max_position_embeddings: int = Field(gt=0)


class ModelConfig(_Section):
    # A hub id, a local folder, or the embedded SmolLM2 default.
    source: str = EMBEDDED_SOURCE
    served_name: str | None = None
    revision: str | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # A method the installed vLLM runs and the planner can size (serving/quantization.py).
    # The chart's schema lists the names; load time checks them against the installed vLLM.
    quantization: str = Field(default="none", json_schema_extra={"enum": ["none", *sorted(METHODS)]})
    # fp8 applies to the weights, the KV cache, or both (Ada/Hopper only).
    fp8_weights: bool = True
    max_model_len: int | None = Field(default=None, gt=0)
    yarn: YarnConfig | None = None
    # Qwen documents YaRN only for 7B+; a profile that enables it anyway must
    # say it knows (the launcher still prints the warning).
    yarn_acknowledge_unsupported: bool = False
    # LoRA adapters: request model name → adapter (serving/lora.py).
    adapters: dict[str, AdapterConfig] = Field(default_factory=dict)

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, value: dict[str, AdapterConfig]) -> dict[str, AdapterConfig]:
        for name in value:
            if not _MODEL_NAME.fullmatch(name):
                raise ValueError(f"adapter name {name!r}: use letters, digits, '.', '_' or '-'")
        return value

    @field_validator("quantization")
    @classmethod
    def _runnable_quantization(cls, value: str) -> str:
        return check_name(value)


class EngineConfig(_Section):
    device: Device = "auto"
    block_size: int | None = Field(default=None, gt=0)
    gpu_memory_utilization: float = Field(default=0.90, gt=0.0, le=1.0)
    # CPU engines have no "utilization": the KV cache size is set in bytes.
    cpu_kv_cache_bytes: int = Field(default=1 << 30, gt=0)
    max_num_seqs: int | None = Field(default=None, gt=0)
    max_num_batched_tokens: int | None = Field(default=None, gt=0)
    # vLLM's own bound on in-flight requests per engine (503 beyond it).
    max_num_queued_reqs: int | None = Field(default=None, gt=0)
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = "auto"
    # guidance gave strictly valid JSON where xgrammar did not on the CPU build.
    structured_outputs_backend: Literal["auto", "guidance", "xgrammar", "outlines"] = "guidance"
    # vLLM's --enforce-eager: no torch.compile / CUDA graphs. Starts much sooner and
    # decodes slower one stream at a time (measured on CPU: docs/performance-cpu.md).
    enforce_eager: bool = False
    # LoRA (used when model.adapters is not empty): adapters active in one batch, the
    # largest rank a slot holds (vLLM's allowed sizes), adapters kept in host memory.
    max_loras: int = Field(default=1, ge=1)
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = 16
    max_cpu_loras: int | None = Field(default=None, ge=1)
    # LoRA on even with no model.adapters, and adapters loaded and unloaded while
    # serving through the ingress's admin route (server.admin_keys_file).
    runtime_lora: bool = False
    # vLLM's --stream-interval: tokens per streamed event (the first token always goes
    # alone). Fewer events for the ingress to relay; a reader sees tokens in groups.
    stream_interval: int = Field(default=1, ge=1)
    # Any other vLLM flag, passed through untouched (the launcher stays thin).
    extra_args: list[str] = Field(default_factory=list)


class TopologyConfig(_Section):
    replicas: int = Field(default=1, ge=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    gpus_per_node: int = Field(default=0, ge=0)
    # For the planner: memory of one GPU and its architecture (fp8 needs ada/hopper).
    gpu_memory_gib: float | None = Field(default=None, gt=0)
    gpu_arch: Literal["ampere", "ada", "hopper", "blackwell", "other"] | None = None
    # Logical CPUs Ray reserves per replica (the engine itself uses what it needs).
    cpus_per_replica: float = Field(default=1.0, gt=0)


class AutoscalingConfig(_Section):
    min_replicas: int = Field(ge=0)
    max_replicas: int = Field(ge=1)
    target_ongoing_requests: float = Field(default=16.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class ResponseCacheConfig(_Section):
    """Exact-match cache for deterministic requests (temperature 0 or a fixed seed)."""

    enabled: bool = True
    backend: Literal["memory", "redis"] = "memory"
    max_bytes: int = Field(default=256 << 20, gt=0)
    ttl_s: float = Field(default=600.0, gt=0)
    redis_url: str | None = None
    max_entry_bytes: int = Field(default=1 << 20, gt=0)
    # `x-cache: hit` on an answer from the cache. per_key: only when API keys are on (each
    # key has its own cache); with keys off every client shares one, and the header would
    # tell anyone that someone else asked the same. always: a single-tenant deployment.
    hit_header: Literal["per_key", "always", "never"] = "per_key"

    @model_validator(mode="after")
    def _redis_needs_url(self) -> "ResponseCacheConfig":
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("backend 'redis' needs redis_url")
        return self


class RouterConfig(_Section):
    policy: RoutingPolicy = "power_of_two"
    # A LoRA adapter's requests prefer replicas that hold it (ingress/adapter_routing.py).
    adapter_affinity: bool = True
    autoscaling: AutoscalingConfig | None = None
    response_cache: ResponseCacheConfig = Field(default_factory=ResponseCacheConfig)


class LimitsConfig(_Section):
    """What the ingress refuses before any engine work (see ingress/admission.py)."""

    max_body_bytes: int = Field(default=4 << 20, gt=0)
    # Requests in flight across all replicas / per replica; beyond → 429 + Retry-After.
    max_in_flight: int | None = Field(default=None, gt=0)
    max_in_flight_per_replica: int | None = Field(default=None, gt=0)
    max_n: int = Field(default=8, ge=1)  # also bounds best_of
    # Shape bounds (ingress/shape.py): each refusal is a 400 naming the field.
    max_json_depth: int = Field(default=64, ge=2)
    max_prompts: int = Field(default=1024, ge=1)     # a /v1/completions batch (vLLM's own cap)
    max_sequences: int = Field(default=1024, ge=1)   # prompts × max(n, best_of)
    max_messages: int = Field(default=1024, ge=1)
    max_stop: int = Field(default=16, ge=1)
    max_tools: int = Field(default=128, ge=1)        # OpenAI's cap
    max_logit_bias: int = Field(default=300, ge=1)   # OpenAI's cap
    # Per API key (or per client address when keys are off).
    requests_per_minute: int | None = Field(default=None, gt=0)
    tokens_per_minute: int | None = Field(default=None, gt=0)
    # Where those limits are kept. Unset: in the ingress (one bucket per key across its
    # workers). A Redis URL: in Redis, one bucket per key across every ingress instance.
    redis_url: str | None = None


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_keys_file: str | None = None
    # Keys for /admin/* (runtime LoRA adapters), same format, never the user keys;
    # unset: the admin routes answer 404.
    admin_keys_file: str | None = None
    # Where the deployment keeps state across restarts (the runtime adapter set);
    # unset: "state" under the model cache (QWEN_SERVE_CACHE, ~/.cache/qwen-serve).
    state_dir: str | None = None
    # Address the engine replicas bind to; loopback unless replicas span nodes.
    replica_host: str = "127.0.0.1"
    request_timeout_s: float = Field(default=600.0, gt=0)
    # Slow clients: a request's headers must be complete this long after its first
    # byte (else 408 and close), its body this long after its headers (else 408).
    header_timeout_s: float = Field(default=15.0, gt=0)
    body_timeout_s: float = Field(default=60.0, gt=0)
    ready_timeout_s: float = Field(default=10.0, gt=0)
    # /ready is 200 while at least this many replicas answer (the rest reported degraded):
    # one slow or dead engine must not take the only ingress out of its Service.
    min_ready_replicas: int = Field(default=1, ge=1)
    startup_timeout_s: float = Field(default=900.0, gt=0)
    drain_timeout_s: float = Field(default=30.0, ge=0)
    web_ui: bool = True
    # Ingress processes serving the one port (ingress/worker.py). Unset: what `plan`
    # advises from the expected peak below (1 without one).
    workers: int | None = Field(default=None, ge=1, le=64)
    # The deployment's expected peak output tokens/s over all replicas (from a benchmark
    # of its engines, or a published figure): `plan` sizes the ingress's relay with it.
    expected_peak_output_tokens_per_s: int | None = Field(default=None, gt=0)
    # Whether /metrics needs an API key (probes /health and /ready never do). Unset: it
    # does whenever API keys are on, since the engines' series tell load and model to
    # anyone; false opens it, for a scraper that cannot send a key.
    metrics_require_key: bool | None = None
    limits: LimitsConfig = Field(default_factory=LimitsConfig)

    @property
    def metrics_need_key(self) -> bool:
        if self.metrics_require_key is None:
            return self.api_keys_file is not None
        return self.metrics_require_key


class DeploymentConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    topology: TopologyConfig = Field(default_factory=TopologyConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)

    @model_validator(mode="after")
    def _adapters_fit(self) -> "DeploymentConfig":
        if self.served_model_name in self.model.adapters:
            raise ValueError(f"adapter name {self.served_model_name!r} is the base model's name")
        eng = self.engine
        if eng.max_cpu_loras is not None and eng.max_cpu_loras < eng.max_loras:
            raise ValueError(f"engine.max_cpu_loras ({eng.max_cpu_loras}) must be at least "
                             f"engine.max_loras ({eng.max_loras})")
        return self

    @property
    def model_revision(self) -> str:
        """What identifies the weights being served (part of every response-cache key)."""
        served = f"{self.model.source}@{self.model.revision or 'default'}"
        # An adapter name pointing at other weights must not answer from the cache.
        adapters = ",".join(f"{n}={a.source}" for n, a in sorted(self.model.adapters.items()))
        return f"{served};{adapters}" if adapters else served

    @property
    def served_model_name(self) -> str:
        if self.model.served_name:
            return self.model.served_name
        if self.model.source == EMBEDDED_SOURCE:
            return "smollm2-135m-instruct"
        return Path(self.model.source.rstrip("/")).name.lower()


def load_config(
    path: str | os.PathLike[str] | None,
    overrides: list[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> DeploymentConfig:
    """Read, merge overrides into, and validate a deployment config.

    Order of precedence (last wins): the file, ``QWEN_SERVE__A__B`` environment
    variables, then ``--set a.b=value`` CLI overrides.
    """
    where = str(path) if path else "<defaults>"
    raw: dict[str, Any] = {}
    if path:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read config: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{where}: the top level must be a mapping of sections")
        raw = loaded

    env = os.environ if environ is None else environ
    for name, value in sorted(env.items()):
        if name.startswith(ENV_PREFIX):
            dotted = name[len(ENV_PREFIX):].lower().replace("__", ".")
            _set_path(raw, dotted, _parse_scalar(value), f"environment variable {name}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. server.port=8001")
        _set_path(raw, key.strip(), _parse_scalar(value), f"override {item!r}")

    try:
        return DeploymentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(where, exc)) from None


def _parse_scalar(value: str) -> Any:
    try:
        return yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        return value


def _set_path(raw: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    parts = [p for p in dotted.split(".") if p]
    if not parts:
        raise ConfigError(f"{origin}: empty key")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _describe(where: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<top level>"
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        else:
            msg = err["msg"]
            if "input" in err and not isinstance(err["input"], (dict, list)):
                msg += f" (got {err['input']!r})"
        lines.append(f"{where}: {key}: {msg}")
    return "\n".join(lines)
