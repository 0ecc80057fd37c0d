"""Start and stop real `qwen-serve serve` stacks on free loopback ports.

Shared by the test suite (tests/conftest.py) and the benchmark scripts, which
need whole stacks with different settings (replicas, routing policy, cache).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from serving.ports import reserved_port

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "deploy" / "configs" / "local-cpu.yaml"


@dataclass
class Stack:
    base_url: str
    model: str
    api_key: str | None
    proc: subprocess.Popen | None
    log_path: Path | None

    def log_tail(self, lines: int = 60) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def wait_ready(base_url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Wait until every replica of the stack at ``base_url`` is ready."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"qwen-serve exited with code {proc.returncode} before it was ready")
        try:
            resp = httpx.get(f"{base_url}/ready", timeout=15)
            # Every replica, not only enough of them to serve (min_ready_replicas).
            if resp.status_code == 200 and resp.json()["status"] == "ready":
                return
            last = resp.text
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(1)
    raise TimeoutError(f"stack not ready after {timeout_s:.0f}s: {last}")


def start_stack(log_dir: Path, *extra: str, name: str = "stack", timeout_s: float = 600,
                config: Path = DEFAULT_CONFIG, env: dict[str, str] | None = None) -> Stack:
    """Start `qwen-serve serve` with ``--set`` overrides in ``extra``; wait until /ready is 200."""
    return _start(["serve"], log_dir, extra, name, timeout_s, config, env)


def start_ingress(log_dir: Path, engines: list[str], *extra: str, name: str = "ingress",
                  timeout_s: float = 120, config: Path = DEFAULT_CONFIG,
                  env: dict[str, str] | None = None) -> Stack:
    """Start `qwen-serve ingress` in front of ``engines`` (their URLs; guarded engines take
    their key in ``env``), with ``--set`` overrides in ``extra``; wait until /ready is 200."""
    return _start(["ingress", *(f"--engine={url}" for url in engines)], log_dir, extra, name,
                  timeout_s, config, env)


def _start(command: list[str], log_dir: Path, extra, name: str, timeout_s: float, config: Path,
           env: dict[str, str] | None) -> Stack:
    log_path = Path(log_dir) / f"{name}.log"
    log = log_path.open("wb")
    with reserved_port() as port:  # held until the stack listens on it
        proc = subprocess.Popen(
            [sys.executable, "-m", "serving", *command, "--config", str(config),
             "--host", "127.0.0.1", "--port", str(port), *extra],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
            env={**os.environ, **env} if env else None,
        )
        stack = Stack(f"http://127.0.0.1:{port}", "smollm2-135m-instruct", None, proc, log_path)
        try:
            wait_ready(stack.base_url, timeout_s, proc)
        except BaseException:
            stop_stack(stack)
            raise RuntimeError(
                "stack failed to start (on a shared dev machine, reuse a running stack with "
                f"QWEN_SERVE_TEST_URL=http://127.0.0.1:PORT); log tail:\n{stack.log_tail()}") from None
    return stack


def stop_stack(stack: Stack, timeout_s: float = 90) -> int | None:
    proc = stack.proc
    if proc is None or proc.poll() is not None:
        return proc.returncode if proc else None
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def stack_processes(stack: Stack) -> list:
    """Every process the stack started (Ray, its workers, supervisors, engines)."""
    import psutil

    return psutil.Process(stack.proc.pid).children(recursive=True)


def stop_leaves_nothing(stack: Stack, send, bound_s: float) -> tuple[list[str], float]:
    """Signal the stack with ``send(pid)``; the processes it had that still run ``bound_s``
    after the signal, and the seconds until none was left (or the bound)."""
    family = stack_processes(stack)
    signalled = time.monotonic()
    send(stack.proc.pid)
    left = leftovers(family, bound_s)
    took = time.monotonic() - signalled
    with contextlib.suppress(subprocess.TimeoutExpired):
        stack.proc.wait(5)
    return left, took


def leftovers(procs: list, timeout_s: float) -> list[str]:
    """The command lines of ``procs`` still running after ``timeout_s`` (zombies count as gone)."""
    import psutil

    def running(p) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + timeout_s
    alive = [p for p in procs if running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = [p for p in alive if running(p)]
    out = []
    for p in alive:
        try:
            out.append(f"{p.pid}: " + " ".join(p.cmdline())[:150])
        except psutil.Error:
            pass
    return out


def serve_pid(stack: Stack) -> int:
    """The `qwen-serve serve` process of a stack (found by its port when not started here)."""
    import psutil

    if stack.proc is not None:
        return stack.proc.pid
    port = int(stack.base_url.rsplit(":", 1)[1])
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return conn.pid
    raise RuntimeError(f"nothing listens on {port}")


def engine_pids(stack: Stack) -> dict[int, int]:
    """{engine port: vLLM server PID} of this stack's replicas (the registry's ``pid``)."""
    import psutil

    out = {}
    for proc in psutil.Process(serve_pid(stack)).children(recursive=True):
        try:
            cmd = proc.cmdline()
        except psutil.Error:
            continue
        if "vllm.entrypoints.openai.api_server" in cmd and "serving.engine.supervise" not in cmd:
            out[int(cmd[cmd.index("--port") + 1])] = proc.pid
    return out


def engine_urls(stack: Stack) -> list[str]:
    """The loopback URLs of a stack's engines (for a second ingress in front of them)."""
    return [f"http://127.0.0.1:{port}" for port in engine_pids(stack)]
