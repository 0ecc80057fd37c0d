"""Quantization methods: the accepted list is the installed vLLM's, and what cannot run is refused early."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from serving import embedded_model, int8_checkpoint
from serving.config import ConfigError, load_config
from serving.engine_args import build_engine_launch
from serving.int8_checkpoint import INT8_SOURCE
from serving.modelinfo import KNOWN_MODELS
from serving.plan import PlanError, make_plan
from serving.quantization import (
    METHODS,
    TORCHAO_INT8_WEIGHT_ONLY,
    accepted,
    vllm_methods,
)

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
    assert f"Accepted: {', '.join(accepted())}" in str(err.value)
    assert "compressed-tensors" in accepted()


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


def test_gpu_only_methods_are_refused_on_cpu_naming_what_runs_there():
    for name in ("fp8", "awq", "gptq"):
        cfg = load_config(CONFIGS / "local-cpu.yaml", [f"model.quantization={name}"], environ={})
        with pytest.raises(PlanError, match="does not run on CPU") as err:
            make_plan(cfg, QWEN05)
        assert "on CPU: none, compressed-tensors, fp8_per_channel, torchao" in str(err.value)


@pytest.mark.parametrize(("name", "points_to"), [
    ("fp8_per_tensor", "fp8_per_channel"), ("fp8_per_block", "AMX"), ("mxfp8", "fp8_per_channel"),
    ("mxfp4", "compressed-tensors"), ("nvfp4_per_token", "0 layers quantized"),
    ("experts_int8", "MoE layers only"), ("online", "fp8_per_channel")])
def test_online_shorthands_that_do_not_run_here_are_refused_with_what_does(name, points_to, tmp_path):
    assert name in vllm_methods()  # vLLM lists it: only this project refuses it
    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  quantization: {name}\n")
    with pytest.raises(ConfigError, match=points_to):
        load_config(path, environ={})


def test_fp8_per_channel_runs_on_cpu_in_bf16_only():
    from serving.modelinfo import model_facts

    cfg = load_config(CONFIGS / "local-cpu-fp8.yaml", environ={})
    facts = model_facts(cfg.model.source)
    plan = make_plan(cfg, facts)
    embed = facts.vocab_size * facts.hidden_size
    assert plan.weight_bytes == embed * 2 + (facts.num_params - embed) * 1  # bf16 embeddings
    argv = build_engine_launch(cfg, facts, "cpu").argv
    assert argv[argv.index("--quantization") + 1] == "fp8_per_channel"
    assert argv[argv.index("--dtype") + 1] == "bfloat16"
    # vLLM refuses online methods in float32 minutes into a start; the planner at once.
    fp32 = load_config(CONFIGS / "local-cpu-fp8.yaml", ["model.dtype=float32"], environ={})
    with pytest.raises(PlanError, match="model.dtype bfloat16 or float16 only"):
        make_plan(fp32, facts)


@pytest.mark.parametrize(("profile", "facts"), [
    ("local-cpu-int8.yaml", None), ("local-cpu-w8a8.yaml", None), ("local-cpu-fp8.yaml", None),
    ("qwen2.5-0.5b-4x4090d-fp8.yaml", QWEN05)])
def test_quantized_profiles_plan(profile, facts):
    cfg = load_config(CONFIGS / profile, environ={})
    if facts is None:  # the embedded model: its facts come from the prepared folder
        from serving.modelinfo import model_facts

        if cfg.model.source == INT8_SOURCE:
            int8_checkpoint.prepare(log=lambda _: None)
        facts = model_facts(cfg.model.source)
    plan = make_plan(cfg, facts)
    assert not plan.warnings
    base = make_plan(load_config(CONFIGS / profile, ["model.quantization=none",
                                                     "engine.kv_cache_dtype=auto"], environ={}), facts)
    assert plan.weight_bytes < 0.7 * base.weight_bytes
    if cfg.engine.kv_cache_dtype.startswith("fp8"):
        assert plan.kv_bytes_per_token == 6_144 and plan.kv_tokens_per_replica > 2 * base.kv_tokens_per_replica


@pytest.fixture(scope="module")
def w8a8_folder():
    """The embedded model's W8A8 checkpoint, written by serving.int8_checkpoint (cached)."""
    return int8_checkpoint.prepare(log=lambda _: None)


def test_w8a8_checkpoint_is_what_vllm_reads_as_int8_w8a8(w8a8_folder):
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import (
        CompressedTensorsW8A8Int8,
    )

    config = json.loads((w8a8_folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    vllm_config = CompressedTensorsConfig.from_config(config["quantization_config"])
    scheme = vllm_config.get_scheme(torch.nn.Linear(576, 1536), "model.layers.0.mlp.gate_proj")
    # int8 weights with one scale per output channel, int8 activations per token, dynamic
    assert isinstance(scheme, CompressedTensorsW8A8Int8)
    assert scheme.strategy == "channel" and not scheme.is_static_input_scheme and scheme.input_symmetric
    assert vllm_config.get_scheme(torch.nn.Linear(576, 49152), "lm_head") is None  # tied: stays


def test_w8a8_weights_are_int8_rows_that_dequantize_to_the_bf16_weights(w8a8_folder):
    from safetensors import safe_open

    name = "model.layers.3.self_attn.o_proj"
    with safe_open(w8a8_folder / "model.safetensors", "pt") as q, \
            safe_open(embedded_model.embedded_model_dir() / "model.safetensors", "pt") as ref:
        weight, scale = q.get_tensor(f"{name}.weight"), q.get_tensor(f"{name}.weight_scale")
        original = ref.get_tensor(f"{name}.weight").float()
        keys = set(q.keys())
    assert weight.dtype == torch.int8 and scale.shape == (weight.shape[0], 1)
    # symmetric, scale = row max / 127.5: each row's largest weight lands on ±127 or -128
    assert (weight.to(torch.int16).abs().amax(dim=1) >= 127).all()
    # within one step of the original (half a step of rounding, the compressor divides in bf16)
    assert ((weight.float() * scale.float() - original).abs() <= scale.float()).all()
    assert "model.embed_tokens.weight" in keys and not any(k.startswith("lm_head") for k in keys)


def test_w8a8_folder_is_stamped_and_rebuilt_when_the_recipe_changes(w8a8_folder, monkeypatch):
    assert int8_checkpoint.is_prepared()
    monkeypatch.setitem(int8_checkpoint.RECIPE, "ignore", ["lm_head", "model.layers.0.mlp.down_proj"])
    assert not int8_checkpoint.is_prepared()


def test_compressed_tensors_runs_on_cpu_with_the_checkpoint(w8a8_folder):
    cfg = load_config(CONFIGS / "local-cpu-w8a8.yaml", environ={})
    from serving.modelinfo import model_facts

    facts = model_facts(cfg.model.source)
    assert facts.quant_method == "compressed-tensors"
    plan = make_plan(cfg, facts)
    embed = facts.vocab_size * facts.hidden_size  # tied, kept in the engine dtype (fp32 here)
    assert plan.weight_bytes == embed * 4 + (facts.num_params - embed) * 1
    argv = build_engine_launch(cfg, facts, "cpu").argv
    assert argv[argv.index("--model") + 1] == str(w8a8_folder)
    assert argv[argv.index("--quantization") + 1] == "compressed-tensors"


def test_compressed_tensors_without_such_a_checkpoint_is_refused():
    from serving.modelinfo import model_facts

    cfg = load_config(CONFIGS / "local-cpu.yaml", ["model.quantization=compressed-tensors"], environ={})
    with pytest.raises(PlanError, match="needs a checkpoint quantized that way.*not quantized"):
        make_plan(cfg, model_facts(cfg.model.source))
    # A hub id whose config we cannot read: a warning, not a refusal.
    gpu = load_config(CONFIGS / "qwen2.5-0.5b-4x4090d.yaml", ["model.quantization=compressed-tensors"],
                      environ={})
    assert any("needs a checkpoint" in w for w in make_plan(gpu, QWEN05).warnings)


def test_w8a8_in_bf16_on_a_cpu_without_native_bf16_warns(w8a8_folder, monkeypatch):
    from serving import plan as plan_module
    from serving.modelinfo import model_facts

    cfg = load_config(CONFIGS / "local-cpu-w8a8.yaml", ["model.dtype=bfloat16"], environ={})
    facts = model_facts(cfg.model.source)
    monkeypatch.setattr(plan_module, "cpu_has_native_bf16", lambda: False)
    assert any("answered garbage" in w for w in make_plan(cfg, facts).warnings)
    monkeypatch.setattr(plan_module, "cpu_has_native_bf16", lambda: True)
    assert not make_plan(cfg, facts).warnings
