"""Config → the vLLM OpenAI server's own command line.

The launcher is deliberately thin: every engine option is a vLLM flag, spelled as
vLLM spells it, and anything the schema does not name goes through
``engine.extra_args`` untouched. Nothing here re-implements engine behaviour.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

from .config import DeploymentConfig
from .hardware import engine_dtype
from .lora import resolve_source as resolve_adapter
from .modelinfo import ModelFacts, resolve_source
from .plan import max_model_len
from .quantization import METHODS

VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


@dataclass(frozen=True)
class EngineLaunch:
    """Everything a replica needs to start one engine process (picklable for Ray)."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    served_model_name: str = ""
    device: str = "cpu"

    def cpus_for_replica(self, rank: int, world_size: int) -> set[int] | None:
        """The cores one of several CPU replicas on a machine keeps to, or None.

        vLLM's automatic OpenMP binding pins every engine to the same cores, so each
        replica gets its own. The whole engine (HTTP server, engine core, worker) is
        kept there, not only its OpenMP threads: its engine core spins on
        sched_yield while the worker computes, and engine cores spinning on both
        cores kept the ingress waiting for a CPU (4.4 s in 17 s of overload).
        Measured with two replicas on two cores at 10x overload: 429 p99 62-138 ms
        -> 3.5-6.3 ms, capacity 8.5 -> 9.6 req/s.
        """
        if self.device != "cpu" or world_size <= 1 or "VLLM_CPU_OMP_THREADS_BIND" in self.env:
            return None
        cores = sorted(os.sched_getaffinity(0))
        return {cores[rank % len(cores)]}

    def env_for_replica(self, rank: int, world_size: int) -> dict[str, str]:
        """Per-replica environment: the OpenMP binding to the replica's cores."""
        env = dict(self.env)
        if (cpus := self.cpus_for_replica(rank, world_size)) is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, sorted(cpus)))
        return env

    def command(self, host: str, port: int) -> list[str]:
        # `python -m` rather than the `vllm` console script: vllm-cpu's script fails
        # looking up its own package name.
        return [sys.executable, "-m", VLLM_SERVER_MODULE, *self.argv,
                "--host", host, "--port", str(port)]


def build_engine_launch(cfg: DeploymentConfig, facts: ModelFacts, device: str) -> EngineLaunch:
    mdl, eng, topo = cfg.model, cfg.engine, cfg.topology
    argv = ["--model", resolve_source(mdl.source),
            "--served-model-name", cfg.served_model_name,
            "--dtype", engine_dtype(mdl.dtype, device),
            "--tensor-parallel-size", str(topo.tensor_parallel_size),
            "--disable-uvicorn-access-log",
            "--enable-prefix-caching" if eng.enable_prefix_caching else "--no-enable-prefix-caching"]
    batched = eng.max_num_batched_tokens
    if device == "cpu":
        # vllm-cpu 0.32 crashes its engine core on a seeded request whose prompt is
        # prefilled in chunks ("CPU Generator does not use offset"): one request
        # with `seed` and a long prompt took the replica down. Whole-prompt prefill
        # avoids that path; the batch budget must then hold the longest prompt.
        argv.append("--no-enable-chunked-prefill")
        batched = max(batched or 0, max_model_len(cfg, facts))
    else:
        argv.append("--enable-chunked-prefill" if eng.enable_chunked_prefill
                    else "--no-enable-chunked-prefill")
    if mdl.revision:
        argv += ["--revision", mdl.revision]
    if mdl.max_model_len:
        argv += ["--max-model-len", str(mdl.max_model_len)]
    hf_overrides: dict = {}
    if mdl.yarn is not None:
        hf_overrides["rope_parameters"] = {
            "rope_type": "yarn", "factor": mdl.yarn.factor,
            "original_max_position_embeddings": mdl.yarn.original_max_position_embeddings,
            # Overriding rope_parameters replaces the dict, so keep the model's theta.
            "rope_theta": facts.rope_theta}
    if mdl.quantization != "none":
        quant_argv, quant_overrides = METHODS[mdl.quantization].engine_args(mdl.fp8_weights)
        argv += quant_argv
        hf_overrides.update(quant_overrides)
    if hf_overrides:
        argv += ["--hf-overrides", json.dumps(hf_overrides)]
    if eng.kv_cache_dtype != "auto":
        argv += ["--kv-cache-dtype", eng.kv_cache_dtype]
    if eng.block_size:
        argv += ["--block-size", str(eng.block_size)]
    if eng.max_num_seqs:
        argv += ["--max-num-seqs", str(eng.max_num_seqs)]
    if batched:
        argv += ["--max-num-batched-tokens", str(batched)]
    if eng.enforce_eager:
        argv += ["--enforce-eager"]
    if eng.stream_interval > 1:
        argv += ["--stream-interval", str(eng.stream_interval)]
    argv += lora_argv(cfg)
    if eng.max_num_queued_reqs:
        argv += ["--max-num-queued-reqs", str(eng.max_num_queued_reqs)]
    if eng.structured_outputs_backend != "auto":
        argv += ["--structured-outputs-config",
                 json.dumps({"backend": eng.structured_outputs_backend})]
    if device == "cpu":
        argv += ["--kv-cache-memory-bytes", str(eng.cpu_kv_cache_bytes)]
    else:
        argv += ["--gpu-memory-utilization", str(eng.gpu_memory_utilization)]
    argv += list(eng.extra_args)

    env = {}
    if device == "cpu":
        # The legacy variable would override the flag above with a whole-GiB figure.
        env["VLLM_CPU_KVCACHE_SPACE"] = ""
        # vllm-cpu 0.32 cannot load its own AOT compile cache ('finalize_loading'),
        # so every start recompiled (~90 s); the regular inductor cache does work.
        env["VLLM_USE_AOT_COMPILE"] = "0"
    if cfg.engine.runtime_lora:
        # vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter; only the ingress
        # calls them (its admin route), for every replica.
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    return EngineLaunch(argv=argv, env=env, served_model_name=cfg.served_model_name, device=device)


def lora_argv(cfg: DeploymentConfig) -> list[str]:
    """vLLM's LoRA flags: each adapter under its own name, parented to the base model
    (so vLLM's /v1/models lists it with ``parent``)."""
    adapters = cfg.model.adapters
    eng = cfg.engine
    if not adapters and not eng.runtime_lora:
        return []
    argv = ["--enable-lora", "--max-loras", str(eng.max_loras),
            "--max-lora-rank", str(eng.max_lora_rank)]
    if eng.max_cpu_loras is not None:
        argv += ["--max-cpu-loras", str(eng.max_cpu_loras)]
    if adapters:
        argv.append("--lora-modules")
    for name, adapter in sorted(adapters.items()):
        argv.append(json.dumps({"name": name, "path": resolve_adapter(adapter.source),
                                "base_model_name": cfg.served_model_name}))
    return argv
