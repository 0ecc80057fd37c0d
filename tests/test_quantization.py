"""Quantization methods: the accepted list is the installed vLLM's, and what cannot run is refused early."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from serving.config import ConfigError, load_config
from serving.engine_args import build_engine_launch
from serving.modelinfo import KNOWN_MODELS
from serving.plan import PlanError, make_plan
from serving.quantization import METHODS, TORCHAO_INT8_WEIGHT_ONLY, accepted, vllm_methods

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "deploy" / "configs"
QWEN05 = KNOWN_MODELS["Qwen/Qwen2.5-0.5B-Instruct"]


def test_source_read_list_is_vllms_own():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    assert vllm_methods() == frozenset(QUANTIZATION_METHODS)


def test_every_accepted_method_is_one_vllm_has():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    assert set(accepted()) - {"none"} <= set(QUANTIZATION_METHODS)
    assert set(accepted()) == {"none", *METHODS}
    # The seed's table names two that vLLM 0.32 no longer has.
    assert "gguf" not in QUANTIZATION_METHODS and "bitsandbytes" not in QUANTIZATION_METHODS


@pytest.mark.parametrize("name", ["gguf", "bitsandbytes", "int3", "int8_per_channel_weight_only"])
def test_method_that_cannot_run_is_refused_at_load(name, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  quantization: {name}\n")
    with pytest.raises(ConfigError, match=r"model\.quantization") as err:
        load_config(path, environ={})
    assert "Accepted: none, awq, fp8, gptq, torchao" in str(err.value)


def test_a_method_vllm_lacks_is_refused_even_if_we_knew_it(tmp_path):
    from serving.quantization import QuantizationError, check_name

    without_awq = vllm_methods() - {"awq"}
    with pytest.raises(QuantizationError, match="no such method"):
        check_name("awq", without_awq)


def test_cli_plan_exits_nonzero_naming_the_methods():
    out = subprocess.run([sys.executable, "-m", "serving", "plan", "--config",
                          str(CONFIGS / "local-cpu.yaml"), "--set", "model.quantization=gguf"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode != 0
    assert "llama.cpp" in out.stderr and "torchao" in out.stderr


def test_torchao_runs_on_cpu_and_sizes_int8_weights():
    cfg = load_config(CONFIGS / "local-cpu.yaml",
                      [f"model.source={QWEN05.name}", "model.dtype=float32", "model.quantization=torchao"],
                      environ={})
    plan = make_plan(cfg, QWEN05)
    embed = QWEN05.vocab_size * QWEN05.hidden_size  # tied: one matrix, kept in fp32
    assert plan.weight_bytes == embed * 4 + (QWEN05.num_params - embed) * 1
    argv = build_engine_launch(cfg, QWEN05, "cpu").argv
    assert argv[argv.index("--quantization") + 1] == "torchao"
    overrides = json.loads(argv[argv.index("--hf-overrides") + 1])
    assert json.loads(overrides["quantization_config_dict_json"]) == TORCHAO_INT8_WEIGHT_ONLY


def test_torchao_overrides_merge_with_yarn():
    cfg = load_config(CONFIGS / "qwen2.5-0.5b-4x4090d-128k.yaml", ["model.quantization=torchao"], environ={})
    argv = build_engine_launch(cfg, QWEN05, "cuda").argv
    assert argv.count("--hf-overrides") == 1
    overrides = json.loads(argv[argv.index("--hf-overrides") + 1])
    assert overrides["rope_parameters"]["rope_type"] == "yarn"
    assert "quantization_config_dict_json" in overrides


def test_embedded_int8_config_is_what_torchao_serializes():
    from torchao.core.config import config_to_dict
    from torchao.quantization import Int8WeightOnlyConfig

    assert json.loads(json.dumps(config_to_dict(Int8WeightOnlyConfig()))) == TORCHAO_INT8_WEIGHT_ONLY


def test_gpu_only_methods_are_refused_on_cpu():
    for name in ("fp8", "awq", "gptq"):
        cfg = load_config(CONFIGS / "local-cpu.yaml", [f"model.quantization={name}"], environ={})
        with pytest.raises(PlanError, match="does not run on CPU"):
            make_plan(cfg, QWEN05)


@pytest.mark.parametrize(("profile", "facts"), [
    ("local-cpu-int8.yaml", None), ("qwen2.5-0.5b-4x4090d-fp8.yaml", QWEN05)])
def test_quantized_profiles_plan(profile, facts):
    cfg = load_config(CONFIGS / profile, environ={})
    if facts is None:  # the embedded model: its facts come from the prepared folder
        from serving.modelinfo import model_facts

        facts = model_facts(cfg.model.source)
    plan = make_plan(cfg, facts)
    base = make_plan(load_config(CONFIGS / profile, ["model.quantization=none",
                                                     "engine.kv_cache_dtype=auto"], environ={}), facts)
    assert plan.weight_bytes < 0.7 * base.weight_bytes
    if profile.endswith("fp8.yaml"):
        assert plan.kv_bytes_per_token == 6_144 and plan.kv_tokens_per_replica > 2 * base.kv_tokens_per_replica
