"""Linux network namespaces joined by a veth pair: two "machines" on one host.

Why: a multi-node Ray cluster is only really tested when its nodes talk over a
network, not over one loopback. As root, ``ip netns`` gives each node its own
interfaces; the pair's addresses exist only inside the namespaces this module
creates, so no traffic ever leaves them. Everything is torn down on exit, also
after a failure: every process still inside a namespace is stopped (SIGTERM, then
SIGKILL), then the namespaces (and with them the veth pair) are deleted.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")
_CLONE_NEWNET = 0x40000000
# A documentation-free private block, used only on the veth pair inside our namespaces.
SUBNET = "10.213.{n}.{host}"


def available() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass(frozen=True)
class Namespace:
    name: str
    address: str  # this side of the veth pair

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside this namespace (ip netns exec execs it: the pid is argv's)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True, timeout=30)
        return [int(p) for p in out.stdout.split()]

    def holds(self, pid: int) -> bool:
        out = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True, timeout=30)
        return self.name in out.stdout.split()

    def run(self, fn: Callable[[], T]) -> T:
        """Call ``fn`` on a thread inside this namespace: sockets it opens live there."""
        box: list = []
        self.start(lambda: box.append(fn()), box).join()
        if not box or isinstance(box[0], BaseException):
            raise box[0] if box else RuntimeError("no result")
        return box[0]

    def start(self, fn: Callable[[], object], errors: list | None = None) -> threading.Thread:
        """Start ``fn`` on a daemon thread inside this namespace; an exception it raises is
        appended to ``errors``."""
        def target() -> None:
            try:
                with open(f"/run/netns/{self.name}") as ns:
                    if ctypes.CDLL("libc.so.6", use_errno=True).setns(ns.fileno(), _CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns failed")
                fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                if errors is not None:
                    errors.append(exc)

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        return thread


def _stop_everything_in(namespaces: list[Namespace], grace_s: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for ns in namespaces:
            for pid in ns.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while any(ns.pids() for ns in namespaces) and time.monotonic() < deadline:
            time.sleep(0.2)


@contextmanager
def veth_pair() -> Iterator[tuple[Namespace, Namespace]]:
    """Two fresh namespaces, each with loopback up and one end of a veth pair."""
    tag = secrets.token_hex(3)
    n = int(tag, 16) % 250 + 1
    a = Namespace(f"qs-{tag}-a", SUBNET.format(n=n, host=1))
    b = Namespace(f"qs-{tag}-b", SUBNET.format(n=n, host=2))
    made: list[Namespace] = []
    try:
        for ns in (a, b):
            _ip("netns", "add", ns.name)
            made.append(ns)
        _ip("link", "add", f"qs{tag}a", "type", "veth", "peer", "name", f"qs{tag}b")
        for ns, dev in ((a, f"qs{tag}a"), (b, f"qs{tag}b")):
            _ip("link", "set", dev, "netns", ns.name)
            _ip("-n", ns.name, "addr", "add", f"{ns.address}/30", "dev", dev)
            _ip("-n", ns.name, "link", "set", dev, "up")
            _ip("-n", ns.name, "link", "set", "lo", "up")
        yield a, b
    finally:
        _stop_everything_in(made)
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns.name], capture_output=True, timeout=30)
        # Only if it never reached a namespace (deleting one deletes its veth end and the peer).
        subprocess.run(["ip", "link", "del", f"qs{tag}a"], capture_output=True, timeout=30)
