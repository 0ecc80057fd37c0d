"""The launcher's side of ``server.workers`` > 1: start, watch and stop the ingress workers.

Each worker is ``python -m serving.ingress.worker`` (ingress/worker.py) with the
listening socket inherited and its orders on stdin. A worker that dies while the
stack is serving is replaced (its row of the in-flight table cleared first: its
requests died with it); one that keeps dying right after its start stops the stack
instead of looping. Everything a worker leaves is in one run folder (control
socket, in-flight table, metrics files), removed when the stack stops.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead

from .config import DeploymentConfig
from .ingress.board import InFlightBoard
from .ingress.metrics import MULTIPROCESS_ENV
from .ingress.worker import order
from .stopping import terminate_then_kill

# A worker that dies within this long of its start counts as failing to start;
# this many of those in a row stop the stack.
EARLY_DEATH_S = 10.0
MAX_EARLY_DEATHS = 3


class WorkerError(Exception):
    """The ingress workers cannot run; the message says why."""


class IngressWorkers:
    def __init__(self, cfg: DeploymentConfig, count: int, sock: socket.socket, *,
                 expected_replicas: int, engine_key: str | None) -> None:
        self.cfg, self.count, self.sock = cfg, count, sock
        self.expected_replicas, self.engine_key = expected_replicas, engine_key
        self.run_dir = Path(tempfile.mkdtemp(prefix="qwen-serve-ingress-"))
        self.control_path = self.run_dir / "control.sock"
        self.metrics_dir = self.run_dir / "metrics"
        self.metrics_dir.mkdir()
        self.board_path = InFlightBoard.create(self.run_dir / "in-flight", count)
        self._board = InFlightBoard(self.board_path, count, 0)  # to clear dead workers' rows
        self._procs: dict[int, subprocess.Popen] = {}
        self._started: dict[int, float] = {}
        self._early_deaths = 0
        self._buried: set[int] = set()  # exited workers already accounted for
        self.stopping = False

    def start(self) -> None:
        for worker in range(self.count):
            self._spawn(worker)

    def _spawn(self, worker: int) -> None:
        self._board.clear_row(worker)
        env = {**os.environ, MULTIPROCESS_ENV: str(self.metrics_dir)}
        proc = subprocess.Popen([sys.executable, "-m", "serving.ingress.worker"], stdin=subprocess.PIPE,
                                pass_fds=[self.sock.fileno()], env=env)
        assert proc.stdin is not None
        proc.stdin.write(order(self.cfg, worker=worker, workers=self.count, fd=self.sock.fileno(),
                               control=self.control_path, board=self.board_path,
                               expected_replicas=self.expected_replicas, engine_key=self.engine_key))
        proc.stdin.close()
        self._procs[worker] = proc
        self._started[worker] = time.monotonic()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs.values() if p.poll() is None]

    def running(self) -> int:
        return len(self.pids)

    def replace_dead(self) -> None:
        """Start a new worker for each one that exited while serving."""
        for worker, proc in list(self._procs.items()):
            if proc.poll() is None or proc.pid in self._buried:
                continue
            self._buried.add(proc.pid)
            mark_process_dead(proc.pid, str(self.metrics_dir))  # its in-flight gauge is 0 now
            if self.stopping:
                continue
            lived = time.monotonic() - self._started[worker]
            self._early_deaths = self._early_deaths + 1 if lived < EARLY_DEATH_S else 0
            if self._early_deaths >= MAX_EARLY_DEATHS:
                raise WorkerError(f"ingress worker {worker} exited {MAX_EARLY_DEATHS} times right "
                                  f"after starting (last exit code {proc.returncode})")
            print(f"qwen-serve: ingress worker {worker} exited ({proc.returncode}); restarting it",
                  file=sys.stderr, flush=True)
            self._spawn(worker)

    def signal(self, sig: int) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    def stop(self, grace_s: float) -> None:
        """Stop every worker still running (SIGTERM, then SIGKILL after ``grace_s``)."""
        self.stopping = True
        import psutil

        alive = []
        for proc in self._procs.values():
            if proc.poll() is None:
                try:
                    alive.append(psutil.Process(proc.pid))
                except psutil.NoSuchProcess:
                    pass
        terminate_then_kill(alive, grace_s)
        for proc in self._procs.values():
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass

    def close(self) -> None:
        self._board.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)


