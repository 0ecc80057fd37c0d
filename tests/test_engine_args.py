"""Config → vLLM flags: thin, and safe on CPU."""

import dataclasses
import os
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


def test_enforce_eager_is_off_unless_asked():
    assert "--enforce-eager" not in build_engine_launch(
        load_config(CONFIGS / "local-cpu.yaml", environ={}), QWEN05, "cpu").argv
    cfg = load_config(CONFIGS / "local-cpu.yaml", ["engine.enforce_eager=true"], environ={})
    assert "--enforce-eager" in build_engine_launch(cfg, QWEN05, "cpu").argv


def test_stream_interval_is_passed_only_when_it_groups_tokens():
    plain = build_engine_launch(load_config(CONFIGS / "local-cpu.yaml", environ={}), QWEN05, "cpu")
    assert "--stream-interval" not in plain.argv
    cfg = load_config(CONFIGS / "local-cpu.yaml", ["engine.stream_interval=4"], environ={})
    assert flags(build_engine_launch(cfg, QWEN05, "cpu").argv, "--stream-interval") == "4"


def test_extra_args_pass_through_untouched():
    cfg = load_config(CONFIGS / "local-cpu.yaml", ["engine.extra_args=[--seed, '3']"], environ={})
    assert build_engine_launch(cfg, QWEN05, "cpu").argv[-2:] == ["--seed", "3"]


def test_cpu_replicas_each_keep_to_their_own_core():
    cfg = load_config(CONFIGS / "local-cpu.yaml", ["topology.replicas=2"], environ={})
    launch = build_engine_launch(cfg, QWEN05, "cpu")
    cores = sorted(os.sched_getaffinity(0))
    first, second = launch.cpus_for_replica(0, 2), launch.cpus_for_replica(1, 2)
    assert first == {cores[0]} and second == {cores[1 % len(cores)]}
    # vLLM's OpenMP threads are bound to the same core the whole engine keeps to.
    assert launch.env_for_replica(1, 2)["VLLM_CPU_OMP_THREADS_BIND"] == str(cores[1 % len(cores)])
    # One replica keeps vLLM's own binding; so do GPU engines and an explicit user binding.
    assert launch.cpus_for_replica(0, 1) is None
    assert "VLLM_CPU_OMP_THREADS_BIND" not in launch.env_for_replica(0, 1)
    gpu = build_engine_launch(load_config(CONFIGS / "qwen2.5-0.5b-4x4090d.yaml", environ={}), QWEN05, "cuda")
    assert gpu.cpus_for_replica(2, 4) is None
    pinned = dataclasses.replace(launch, env={**launch.env, "VLLM_CPU_OMP_THREADS_BIND": "0-1"})
    assert pinned.cpus_for_replica(1, 2) is None
    assert pinned.env_for_replica(1, 2)["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
