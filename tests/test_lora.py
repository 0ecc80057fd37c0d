"""LoRA adapters before anything starts: config, vLLM flags, the planner's checks and sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.config import ConfigError, load_config
from serving.engine_args import build_engine_launch
from serving.modelinfo import KNOWN_MODELS
from serving.plan import PlanError, make_plan

CONFIGS = Path(__file__).resolve().parent.parent / "deploy" / "configs"
QWEN05 = KNOWN_MODELS["Qwen/Qwen2.5-0.5B-Instruct"]


def adapter(tmp_path: Path, name: str, rank: int, revision: str | None = None) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    meta = {"r": rank, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA",
            "base_model_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct"}
    if revision:
        meta["revision"] = revision
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    return folder


def gpu_config(*sets: str):
    return load_config(CONFIGS / "qwen2.5-0.5b-4x4090d.yaml", list(sets), environ={})


def test_adapters_become_vllm_lora_modules_parented_to_the_base(tmp_path):
    a, b = adapter(tmp_path, "a", 8), adapter(tmp_path, "b", 16)
    cfg = gpu_config(f"model.adapters={{tone: {{source: {a}}}, json-mode: {{source: {b}}}}}",
                     "engine.max_loras=2")
    argv = build_engine_launch(cfg, QWEN05, "cuda").argv
    assert "--enable-lora" in argv
    assert argv[argv.index("--max-loras") + 1] == "2"
    assert argv[argv.index("--max-lora-rank") + 1] == "16"
    modules = [json.loads(m) for m in argv[argv.index("--lora-modules") + 1:][:2]]
    assert modules == [
        {"name": "json-mode", "path": str(b), "base_model_name": cfg.served_model_name},
        {"name": "tone", "path": str(a), "base_model_name": cfg.served_model_name}]


def test_no_adapters_no_lora_flags():
    argv = build_engine_launch(gpu_config(), QWEN05, "cuda").argv
    assert not any("lora" in flag for flag in argv)


def test_plan_sizes_the_lora_slots_from_the_model_shapes(tmp_path):
    cfg = gpu_config(f"model.adapters={{tone: {{source: {adapter(tmp_path, 'a', 8)}}}}}")
    plan = make_plan(cfg, QWEN05)
    # Qwen2.5-0.5B per rank per layer: qkv 3×896 + (14+2×2)×64, o 896+896,
    # gate_up 2×896 + 2×4864, down 4864+896 = 22,912; × 24 layers × rank 16 × 2 B (bf16).
    assert plan.lora_bytes_per_replica == 22_912 * 24 * 16 * 2
    assert any("LoRA slots" in line and f"{22_912 * 24 * 16 * 2:,}" in line for line in plan.arithmetic)
    without = make_plan(gpu_config(), QWEN05)
    assert plan.kv_tokens_per_replica < without.kv_tokens_per_replica  # the slots come out of KV


def test_plan_refuses_an_adapter_above_the_slot_rank_and_names_the_fix(tmp_path):
    cfg = gpu_config(f"model.adapters={{big: {{source: {adapter(tmp_path, 'a', 32)}}}}}")
    with pytest.raises(PlanError, match=r"rank 32, above engine.max_lora_rank=16; set engine.max_lora_rank=32"):
        make_plan(cfg, QWEN05)


def test_plan_refuses_a_missing_adapter_folder_and_a_wrong_base_revision(tmp_path):
    with pytest.raises(PlanError, match="no adapter_config.json"):
        make_plan(gpu_config(f"model.adapters={{x: {{source: {tmp_path / 'absent'}}}}}"), QWEN05)
    folder = adapter(tmp_path, "a", 8, revision="abc123")
    with pytest.raises(PlanError, match="trained on base revision 'abc123', not 'def456'"):
        make_plan(gpu_config(f"model.adapters={{x: {{source: {folder}, base_revision: def456}}}}"), QWEN05)
    make_plan(gpu_config(f"model.adapters={{x: {{source: {folder}, base_revision: abc123}}}}"), QWEN05)


@pytest.mark.parametrize("override, message", [
    ("model.adapters={qwen2.5-0.5b-instruct: {source: /x}}", "base model's name"),
    ("model.adapters={'bad name': {source: /x}}", "use letters, digits"),
    ("engine.max_lora_rank=12", "Input should be 1, 8, 16"),
    ("engine.max_cpu_loras=1", "must be at least engine.max_loras"),
])
def test_config_refuses_adapter_settings_vllm_would_refuse_later(override, message):
    sets = [override] + (["engine.max_loras=2"] if "cpu_loras" in override else [])
    with pytest.raises(ConfigError, match=message):
        gpu_config(*sets)


def test_an_adapter_changes_the_response_cache_revision(tmp_path):
    base = gpu_config().model_revision
    with_adapter = gpu_config(f"model.adapters={{x: {{source: {adapter(tmp_path, 'a', 8)}}}}}").model_revision
    assert base != with_adapter
