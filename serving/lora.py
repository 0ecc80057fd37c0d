"""LoRA adapters: where they are, what they are, and what they cost an engine.

vLLM serves adapters itself (``--enable-lora``, ``--lora-modules``, one batch mixing
adapters); this module does what has to happen before anything starts: find each
adapter's folder, read its rank, refuse one the engine's slots cannot hold, and size
the memory vLLM sets aside for them, so ``qwen-serve plan`` can show the arithmetic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import AdapterConfig, DeploymentConfig
from .modelinfo import ModelFacts

EMBEDDED_PREFIX = "embedded:"
# vLLM's allowed slot ranks (vllm/config/lora.py MaxLoRARanks).
SLOT_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class AdapterError(Exception):
    """An adapter cannot be served as configured; the message says why."""


@dataclass(frozen=True)
class AdapterFacts:
    name: str
    path: str  # what vLLM loads: a local folder, or a hub id
    rank: int | None  # None: a hub id whose config was not read
    target_modules: tuple[str, ...]
    base_model: str | None
    base_revision: str | None


def resolve_source(source: str) -> str:
    """The folder (or hub id) vLLM loads for an adapter's ``source``."""
    if source.startswith(EMBEDDED_PREFIX):
        from . import demo_adapter

        name = source[len(EMBEDDED_PREFIX):]
        if name != demo_adapter.DEMO_ADAPTER:
            raise AdapterError(f"no embedded adapter {name!r}; there is "
                               f"{EMBEDDED_PREFIX}{demo_adapter.DEMO_ADAPTER}")
        if not demo_adapter.is_prepared():
            raise AdapterError("the demo adapter is not trained yet: run `qwen-serve model prepare`")
        return str(demo_adapter.adapter_dir())
    return source


def read_adapter(name: str, cfg: AdapterConfig) -> AdapterFacts:
    path = resolve_source(cfg.source)
    folder = Path(path).expanduser()
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        if folder.exists() or path.startswith(("/", ".", "~")):
            raise AdapterError(f"adapter {name!r}: no adapter_config.json in {path}")
        return AdapterFacts(name, path, None, (), None, None)  # a hub id: vLLM fetches it
    try:
        meta = json.loads(config_file.read_text())
        rank = int(meta["r"])
    except (ValueError, KeyError, TypeError) as exc:
        raise AdapterError(f"adapter {name!r}: {config_file} has no valid rank 'r' ({exc})") from None
    targets = meta.get("target_modules") or ()
    if isinstance(targets, str):
        targets = (targets,)
    facts = AdapterFacts(name, str(folder), rank, tuple(sorted(targets)),
                         meta.get("base_model_name_or_path"), meta.get("revision"))
    if cfg.base_revision is not None and facts.base_revision != cfg.base_revision:
        raise AdapterError(f"adapter {name!r} was trained on base revision "
                           f"{facts.base_revision!r}, not {cfg.base_revision!r}")
    return facts


def params_per_rank_per_layer(facts: ModelFacts) -> int:
    """LoRA parameters one rank of one slot takes in one layer, as vLLM lays them out.

    vLLM reserves every slot for all of a layer's projections, whatever an adapter
    targets: A (rank × in) and B (out × rank) for the q, k, v slices of qkv_proj,
    o_proj, the gate and up slices of gate_up_proj, and down_proj.
    """
    h, i = facts.hidden_size, facts.intermediate_size
    q = facts.num_attention_heads * facts.head_dim
    kv = facts.num_kv_heads * facts.head_dim
    qkv = 3 * h + (q + 2 * kv)
    o = q + h
    gate_up = 2 * h + 2 * i
    down = i + h
    return qkv + o + gate_up + down


def check_adapters(cfg: DeploymentConfig, facts: ModelFacts, dtype_bytes: int,
                   lines: list[str], warnings: list[str]) -> int:
    """Refuse adapters the slots cannot hold; the bytes vLLM reserves per replica."""
    adapters = cfg.model.adapters
    eng = cfg.engine
    if not adapters and not eng.runtime_lora:
        return 0
    for name, adapter_cfg in sorted(adapters.items()):
        found = read_adapter(name, adapter_cfg)
        if found.rank is None:
            warnings.append(f"adapter {name!r} ({found.path}): rank unknown until vLLM loads it")
            continue
        if found.rank > eng.max_lora_rank:
            fits = next((r for r in SLOT_RANKS if r >= found.rank), None)
            raise AdapterError(f"adapter {name!r} has rank {found.rank}, above "
                               f"engine.max_lora_rank={eng.max_lora_rank}"
                               + (f"; set engine.max_lora_rank={fits}" if fits else ""))
        lines.append(f"adapter {name}: rank {found.rank}, targets {', '.join(found.target_modules) or '?'}")
    per_layer = params_per_rank_per_layer(facts)
    slot_bytes = per_layer * facts.num_layers * eng.max_lora_rank * dtype_bytes
    total = slot_bytes * eng.max_loras
    lines.append(
        f"LoRA slots = {eng.max_loras} (engine.max_loras) × rank {eng.max_lora_rank} × "
        f"{per_layer:,} params/rank/layer (qkv {3 * facts.hidden_size:,}+"
        f"{(facts.num_attention_heads + 2 * facts.num_kv_heads) * facts.head_dim:,}, o, gate_up, down) "
        f"× {facts.num_layers} layers × {dtype_bytes} B = {total:,} B per replica "
        "(derived from the model's shapes)")
    cpu_loras = eng.max_cpu_loras or eng.max_loras
    if len(adapters) > cpu_loras:
        warnings.append(f"{len(adapters)} adapters but engine.max_cpu_loras={cpu_loras}: "
                        "vLLM reloads adapters from disk as they are evicted")
    return total
