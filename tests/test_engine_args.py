"""Config → vLLM flags: thin, and safe on CPU."""

from pathlib import Path

from serving.config import load_config
from serving.engine_args import build_engine_launch
from serving.modelinfo import KNOWN_MODELS

CONFIGS = Path(__file__).resolve().parent.parent / "deploy" / "configs"
QWEN05 = KNOWN_MODELS["Qwen/Qwen2.5-0.5B-Instruct"]


def flags(argv, name):
    return argv[argv.index(name) + 1]


def test_cpu_never_prefills_in_chunks():
    cfg = load_config(CONFIGS / "local-cpu.yaml", ["engine.enable_chunked_prefill=true",
                                                   "engine.max_num_batched_tokens=512"], environ={})
    argv = build_engine_launch(cfg, QWEN05, "cpu").argv
    assert "--no-enable-chunked-prefill" in argv and "--enable-chunked-prefill" not in argv
    assert int(flags(argv, "--max-num-batched-tokens")) >= 8192  # the longest prompt fits one step
    assert flags(argv, "--kv-cache-memory-bytes") == str(cfg.engine.cpu_kv_cache_bytes)


def test_gpu_profile_flags():
    cfg = load_config(CONFIGS / "qwen2.5-0.5b-4x4090d.yaml", environ={})
    launch = build_engine_launch(cfg, QWEN05, "cuda")
    argv = launch.argv
    assert flags(argv, "--model") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert flags(argv, "--tensor-parallel-size") == "1"
    assert flags(argv, "--gpu-memory-utilization") == "0.9"
    assert "--enable-prefix-caching" in argv and "--enable-chunked-prefill" in argv
    assert launch.env == {}


def test_yarn_override_keeps_rope_theta():
    cfg = load_config(CONFIGS / "qwen2.5-0.5b-4x4090d-128k.yaml", environ={})
    argv = build_engine_launch(cfg, QWEN05, "cuda").argv
    assert '"rope_type": "yarn"' in flags(argv, "--hf-overrides")
    assert '"rope_theta": 1000000.0' in flags(argv, "--hf-overrides")
    assert flags(argv, "--max-model-len") == "131072"


def test_extra_args_pass_through_untouched():
    cfg = load_config(CONFIGS / "local-cpu.yaml", ["engine.extra_args=[--seed, '3']"], environ={})
    assert build_engine_launch(cfg, QWEN05, "cpu").argv[-2:] == ["--seed", "3"]
