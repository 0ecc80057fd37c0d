"""The guarded stack: two replicas behind API keys, limits and a body cap.

Shared (session-scoped, conftest.py) by the reliability module, which ends it with its
drain test, and the overload module, which puts its own latency-first ingress in front
of the same engines: one pair of engines for both instead of a pair each.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

KEY_PLAIN = "rel-test-key-alpha-7f3c9a1d5e"
KEY_HASHED = "rel-test-key-beta-2b8e6f0c4a"
MAX_IN_FLIGHT_PER_REPLICA = 4
REPLICAS = 2
# Big enough that no other test notices it; the 429 test asks for more than a minute's worth.
TOKENS_PER_MINUTE = 1_000_000
MAX_BODY_BYTES = 65536
MAX_MODEL_LEN = 8192  # deploy/configs/local-cpu.yaml
DRAIN_TIMEOUT_S = 60
ENGINE_KEY = "rel-test-engine-key-0c1d9e"  # what the guarded stack's engines accept


def write_keys(tmp: Path) -> Path:
    path = tmp / "api-keys.txt"
    digest = hashlib.sha256(KEY_HASHED.encode()).hexdigest()
    path.write_text(f"# reliability test keys\n{KEY_PLAIN}\n\nsha256:{digest}\n")
    return path


def ingress_args(keys_file: Path, in_flight_per_replica: int = MAX_IN_FLIGHT_PER_REPLICA) -> list[str]:
    """The guarded ingress's settings (also what a second ingress in front of it takes)."""
    return ["--set", f"server.api_keys_file={keys_file}",
            "--set", f"server.limits.max_in_flight_per_replica={in_flight_per_replica}",
            "--set", f"server.limits.tokens_per_minute={TOKENS_PER_MINUTE}",
            "--set", f"server.limits.max_body_bytes={MAX_BODY_BYTES}",
            "--set", f"server.drain_timeout_s={DRAIN_TIMEOUT_S}"]


def guarded_args(keys_file: Path, in_flight_per_replica: int = MAX_IN_FLIGHT_PER_REPLICA) -> list[str]:
    return ["--set", f"topology.replicas={REPLICAS}",
            *ingress_args(keys_file, in_flight_per_replica),
            "--set", "engine.cpu_kv_cache_bytes=536870912",
            # These stacks test admission and recovery, not decode speed: eager engines
            # start in about half the time (README, engine.enforce_eager).
            "--set", "engine.enforce_eager=true"]
