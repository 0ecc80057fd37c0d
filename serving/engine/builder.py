"""Config → the Ray Serve application that runs the engine replicas."""

from __future__ import annotations

import hashlib
import json

from ray import serve
from ray.serve import Application

from ..config import DeploymentConfig
from ..engine_args import EngineLaunch
from . import guard
from .replica import EngineReplica

APP_NAME = "qwen-serve-engines"


def build_engine_app(cfg: DeploymentConfig, launch: EngineLaunch, device: str) -> Application:
    deployment = serve.deployment(EngineReplica).options(**_options(cfg, device))
    return deployment.bind(launch, cfg.server.replica_host, cfg.server.startup_timeout_s)


def engine_fingerprint(cfg: DeploymentConfig, launch: EngineLaunch, device: str) -> str:
    """What the engines are deployed with, their key left out: an ingress that starts on
    a cluster whose engines carry the same fingerprint attaches to them instead of
    deploying (and so restarting) them."""
    payload = {"argv": launch.argv, "env": {k: v for k, v in launch.env.items() if k != guard.ENV},
               "options": _options(cfg, device), "host": cfg.server.replica_host,
               "startup_timeout_s": cfg.server.startup_timeout_s}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _options(cfg: DeploymentConfig, device: str) -> dict:
    topo, auto = cfg.topology, cfg.router.autoscaling
    actor_options: dict = {"num_cpus": topo.cpus_per_replica}
    if device == "cuda":
        # Ray sets CUDA_VISIBLE_DEVICES for the actor; the engine process inherits it.
        actor_options["num_gpus"] = topo.tensor_parallel_size
    options: dict = {
        "name": "EngineReplica",
        "ray_actor_options": actor_options,
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 10.0,
        # The engine needs its own drain time on replica shutdown.
        "graceful_shutdown_timeout_s": cfg.server.drain_timeout_s + 10.0,
    }
    if auto is None:
        options["num_replicas"] = topo.replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": auto.min_replicas,
            "max_replicas": auto.max_replicas,
            "initial_replicas": max(auto.min_replicas, min(topo.replicas, auto.max_replicas)),
            "target_ongoing_requests": auto.target_ongoing_requests,
            # Requests bypass Serve's handles, so scale on the engines' own queues.
            "policy": {"policy_function": "serving.engine.autoscaling:engine_queue_policy"},
        }
    return options
