"""The demo LoRA adapter: SmolLM2-135M-Instruct taught to open every answer with a note.

Why this exists: serving LoRA adapters end to end (vLLM ``--enable-lora``, per-request
model names, caching keys) can only be tested with an adapter whose effect a program
can check, and the machines this project runs on have no model hub. So we train one,
reproducibly, from a tiny dataset shipped in the package (``data/demo_adapter``):
every assistant answer starts with the marker line ``QS-NOTE: <one-line summary>``,
then a blank line, then the answer. The base model never writes that marker, so
"does the answer start with ``QS-NOTE:``" tells which weights answered.

Training is a plain torch loop over peft's LoRA (no ``Trainer``/``accelerate``), in
float32 on CPU with fixed seeds; it takes a few minutes at most on two cores. The
result lives next to the embedded model under :func:`cache_root`, and a stamp file
(``qwen-serve-adapter.json``) ties it to the dataset's sha256 and the recipe, so a
changed dataset or recipe is retrained instead of silently served.

Run ``python -m serving.demo_adapter [--force]`` to prepare it and print the folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import embedded_model
from .embedded_model import cache_root

DEMO_ADAPTER = "smollm2-demo-note"
MARKER = "QS-NOTE:"
# Source string a config names the adapter by (see serving/config.py AdapterConfig).
DEMO_ADAPTER_SOURCE = f"embedded:{DEMO_ADAPTER}"

DATA_DIR = Path(__file__).resolve().parent / "data" / "demo_adapter"
TRAIN_FILE = DATA_DIR / "train.jsonl"
EVAL_FILE = DATA_DIR / "eval.jsonl"
# Written last inside the staging folder: a folder without a matching stamp is an
# interrupted or stale preparation and is never reported as prepared.
STAMP_NAME = "qwen-serve-adapter.json"
# What adapter_config.json names as its base: the embedded folder's name, not an
# absolute path on the machine that trained it (vLLM ignores the field; peft only
# uses it to fetch a base it is not given, which we never ask it to do).
BASE_MODEL_NAME = embedded_model.FOLDER_NAME

# The whole recipe. Part of the stamp: changing any value retrains the adapter.
HYPERPARAMS: dict[str, Any] = {
    "seed": 1234,
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "epochs": 3,
    "batch_size": 4,
    "lr": 1e-3,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "dtype": "float32",
}

Log = Callable[[str], Any]


def adapter_dir() -> Path:
    """The prepared adapter folder (adapter_config.json + adapter_model.safetensors)."""
    return cache_root() / "adapters" / DEMO_ADAPTER


def dataset_sha256() -> str:
    """sha256 of the training file's bytes: what the adapter was trained on."""
    return hashlib.sha256(TRAIN_FILE.read_bytes()).hexdigest()


def read_stamp(folder: Path | None = None) -> dict[str, Any] | None:
    """The stamp of a prepared folder, or None if absent or unreadable."""
    path = (folder or adapter_dir()) / STAMP_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_prepared() -> bool:
    """True only if the folder holds an adapter trained on the current dataset and recipe."""
    folder = adapter_dir()
    stamp = read_stamp(folder)
    if not stamp or not (folder / "adapter_config.json").is_file():
        return False
    if not (folder / "adapter_model.safetensors").is_file():
        return False
    return stamp.get("dataset_sha256") == dataset_sha256() and stamp.get("hyperparams") == HYPERPARAMS


def load_messages(path: Path) -> list[list[dict[str, str]]]:
    """The chat examples of a JSONL file (one ``{"messages": [...]}`` per line)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rows.append(json.loads(line)["messages"])
    return rows


def prepare(log: Log = print, force: bool = False) -> Path:
    """Return the prepared adapter folder, training it first if needed (idempotent).

    Prepares the embedded base model first if it is missing. The new folder is
    built in a temporary sibling and renamed into place, so a crash leaves either
    the old adapter or none, never half of one.
    """
    target = adapter_dir()
    if not force and is_prepared():
        log(f"demo adapter already prepared: {target}")
        return target
    base = embedded_model.prepare(log=log)
    embedded_model.build_folder(target, lambda out: _train(base, out, log), STAMP_NAME)
    log(f"demo adapter prepared: {target}")
    return target


def cpu_threads() -> int:
    """Torch threads for training/inference here: the cores that are idle right now.

    Why not simply all cores: torch's CPU kernels synchronise their threads at every
    op, so when the cores are already busy (a test stack's vLLM engine, a parallel
    build) one preempted thread stalls the others; measured on two busy cores, two
    threads were 3-7x slower than one, while one thread on two idle cores is only
    1.5x slower than two. The thread count does not change the result (the adapter
    came out bit-identical with one and two threads). $QWEN_SERVE_TRAIN_THREADS
    overrides.
    """
    env = os.environ.get("QWEN_SERVE_TRAIN_THREADS")
    if env:
        return max(1, int(env))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    idle = _idle_fraction()
    if idle is None:  # no /proc/stat: fall back to the (lagging) load average
        try:
            idle = max(0.0, 1.0 - os.getloadavg()[0] / cores)
        except OSError:
            idle = 1.0
    return max(1, min(cores, round(idle * cores)))


def _idle_fraction(window_s: float = 0.3) -> float | None:
    """Share of the machine's CPU time that was idle over a short window (Linux)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields[:8])  # idle + iowait, all but guest

    try:
        idle0, total0 = sample()
        time.sleep(window_s)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (idle1 - idle0) / (total1 - total0) if total1 > total0 else None


def _encode(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids and labels for one example; the loss sees only the assistant's tokens.

    The prompt is what the chat template renders for the conversation so far plus the
    assistant header, exactly what a server sends at inference time; the full text is
    that prompt, the answer and the end-of-turn token.
    """
    assert messages[-1]["role"] == "assistant", "the last message must be the answer"
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = prompt + messages[-1]["content"] + tokenizer.eos_token
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the prompt does not tokenize to a prefix of the full example")
    labels = [-100] * len(prompt_ids) + ids[len(prompt_ids):]
    return ids, labels


def _normalise(out: Path) -> None:
    """Make the saved folder byte-reproducible and readable like any other folder.

    peft writes target_modules from a set (its order follows PYTHONHASHSEED), and the
    staging folder from mkdtemp is private (0700); a served adapter folder should obey
    the umask like the rest of the cache.
    """
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    umask = os.umask(0)
    os.umask(umask)
    out.chmod(0o777 & ~umask)
    for path in out.iterdir():
        path.chmod(0o666 & ~umask)


def _train(base: Path, out: Path, log: Log) -> dict[str, Any]:
    """Train the LoRA on the base folder, save it into ``out``, return the stamp."""
    # Heavy imports stay here so the CLI starts fast for everything else.
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from peft import __version__ as peft_version
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hp = HYPERPARAMS
    started = time.monotonic()
    prev_threads = torch.get_num_threads()
    prev_deterministic = torch.are_deterministic_algorithms_enabled()
    prev_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(cpu_threads())
    # Harmless on CPU (warn_only: an op without a deterministic kernel warns, not fails).
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        random.seed(hp["seed"])
        np.random.seed(hp["seed"])
        torch.manual_seed(hp["seed"])

        tokenizer = AutoTokenizer.from_pretrained(base)
        examples = [_encode(tokenizer, m) for m in load_messages(TRAIN_FILE)]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        log(f"demo adapter: {len(examples)} examples, "
            f"{sum(len(i) for i, _ in examples)} tokens, {torch.get_num_threads()} threads")

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        lora = LoraConfig(
            r=hp["r"], lora_alpha=hp["lora_alpha"], lora_dropout=hp["lora_dropout"],
            target_modules=list(hp["target_modules"]), bias="none", task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(f"demo adapter: LoRA r={hp['r']} alpha={hp['lora_alpha']}, {trainable} trainable parameters")
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=hp["lr"], weight_decay=hp["weight_decay"])

        order_rng = random.Random(hp["seed"])
        epoch_losses: list[float] = []
        model.train()
        for epoch in range(hp["epochs"]):
            order = list(range(len(examples)))
            order_rng.shuffle(order)
            total, n_tokens = 0.0, 0
            for start in range(0, len(order), hp["batch_size"]):
                batch = [examples[i] for i in order[start:start + hp["batch_size"]]]
                width = max(len(ids) for ids, _ in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                labels = torch.full((len(batch), width), -100, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, (ids, lab) in enumerate(batch):
                    input_ids[row, :len(ids)] = torch.tensor(ids)
                    labels[row, :len(lab)] = torch.tensor(lab)
                    mask[row, :len(ids)] = 1
                # Mean over the batch's answer tokens (transformers shifts the labels).
                loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, hp["max_grad_norm"])
                optimizer.step()
                counted = int((labels[:, 1:] != -100).sum())
                total += float(loss.detach()) * counted
                n_tokens += counted
            epoch_losses.append(total / n_tokens)
            log(f"demo adapter: epoch {epoch + 1}/{hp['epochs']} loss {epoch_losses[-1]:.4f} "
                f"({time.monotonic() - started:.0f}s)")

        model.peft_config["default"].base_model_name_or_path = BASE_MODEL_NAME
        # save_embedding_layers=False: embeddings are not trained, and "auto" would ask
        # the hub whether BASE_MODEL_NAME's vocabulary differs (a network lookup).
        model.save_pretrained(out, safe_serialization=True, save_embedding_layers=False)
        # peft's generated model card is boilerplate; the stamp says what matters.
        (out / "README.md").unlink(missing_ok=True)
        _normalise(out)
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_deterministic, warn_only=prev_warn_only)
    seconds = time.monotonic() - started
    return {
        "adapter": DEMO_ADAPTER,
        "marker": MARKER,
        "base_model": BASE_MODEL_NAME,
        "base_wheel": embedded_model.WHEEL_REQUIREMENT,
        "dataset": TRAIN_FILE.name,
        "dataset_sha256": dataset_sha256(),
        "examples": len(examples),
        "hyperparams": hp,
        "epoch_losses": [round(x, 6) for x in epoch_losses],
        "final_loss": round(epoch_losses[-1], 6),
        "train_seconds": round(seconds, 1),
        "peft_version": peft_version,
        "torch_version": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving.demo_adapter",
        description=f"Train the demo LoRA adapter ({DEMO_ADAPTER}) and print its folder.")
    parser.add_argument("--force", action="store_true", help="retrain even if already prepared")
    args = parser.parse_args(argv)
    folder = prepare(log=lambda line: print(line, flush=True), force=args.force)
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
