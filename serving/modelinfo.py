"""Architecture facts the planner needs, read from a model's config.json.

A local folder is read directly (parameter count from the safetensors headers, so it
is exact). For hub ids used by the shipped profiles we carry the published facts,
because the hub is often unreachable where plans are made (CI, air-gapped boxes).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from .embedded_model import EMBEDDED_SOURCE, embedded_model_dir
from .int8_checkpoint import INT8_SOURCE, int8_dir


@dataclass(frozen=True)
class ModelFacts:
    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    num_params: int
    rope_theta: float
    # The MLP's inner width (LoRA's per-rank size depends on it).
    intermediate_size: int
    # Where the facts came from: "config.json" of a folder, or "built-in facts".
    origin: str
    # config.json's quantization_config.quant_method: the checkpoint is already
    # quantized that way (e.g. "compressed-tensors"); None for plain weights or unknown.
    quant_method: str | None = None


# Published configs (config.json on the hub) for the profiles' models.
KNOWN_MODELS: dict[str, ModelFacts] = {
    "Qwen/Qwen2.5-0.5B-Instruct": ModelFacts(
        name="Qwen/Qwen2.5-0.5B-Instruct", num_layers=24, hidden_size=896,
        num_attention_heads=14, num_kv_heads=2, head_dim=64, vocab_size=151936,
        max_position_embeddings=32768, tie_word_embeddings=True,
        num_params=494_032_768, rope_theta=1_000_000.0, intermediate_size=4864,
        origin="built-in facts",
    ),
    "Qwen/Qwen2.5-7B-Instruct": ModelFacts(
        name="Qwen/Qwen2.5-7B-Instruct", num_layers=28, hidden_size=3584,
        num_attention_heads=28, num_kv_heads=4, head_dim=128, vocab_size=152064,
        max_position_embeddings=32768, tie_word_embeddings=False,
        num_params=7_615_616_512, rope_theta=1_000_000.0, intermediate_size=18944,
        origin="built-in facts",
    ),
}


class ModelInfoError(Exception):
    pass


def resolve_source(source: str) -> str:
    """The path or hub id vLLM should load for a config's ``model.source``."""
    if source == EMBEDDED_SOURCE:
        return str(embedded_model_dir())
    if source == INT8_SOURCE:
        return str(int8_dir())
    return source


def model_facts(source: str) -> ModelFacts:
    path = Path(resolve_source(source)).expanduser()
    if (path / "config.json").is_file():
        return _from_folder(path)
    if source in KNOWN_MODELS:
        return KNOWN_MODELS[source]
    if source == EMBEDDED_SOURCE:
        raise ModelInfoError(
            "the embedded model is not prepared yet: run `qwen-serve model prepare`"
        )
    if source == INT8_SOURCE:
        raise ModelInfoError(
            "the embedded INT8 checkpoint is not prepared yet: run `qwen-serve model prepare --int8`"
        )
    raise ModelInfoError(
        f"no config.json for {source!r}: give a local model folder, or one of "
        f"{', '.join(sorted(KNOWN_MODELS))}"
    )


def _from_folder(path: Path) -> ModelFacts:
    cfg = json.loads((path / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    return ModelFacts(
        name=str(path),
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        vocab_size=int(cfg["vocab_size"]),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 0)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        num_params=_count_params(path),
        rope_theta=float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0),
        intermediate_size=int(cfg.get("intermediate_size") or 4 * hidden),
        origin=f"{path / 'config.json'}",
        quant_method=(cfg.get("quantization_config") or {}).get("quant_method"),
    )


def _count_params(path: Path) -> int:
    """Sum tensor sizes from safetensors headers (8-byte length + JSON), no torch."""
    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with file.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            count = 1
            for dim in meta["shape"]:
                count *= dim
            total += count
    return total
