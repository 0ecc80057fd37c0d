"""A throwaway real Prometheus (Debian's package) on loopback, scraping what a test names.

Why a real server: what is checked is that Prometheus itself accepts the config and
scrapes the stack with it (its credentials file, its rules), not a reading of the YAML.
"""

from __future__ import annotations

import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
import yaml

from local_service import running
from serving.ports import reserved_port

INSTALL_HINT = ("the `prometheus` binary is not installed: run `bash deploy/check.sh tools` "
                "(Debian package prometheus)")


@contextmanager
def prometheus_server(config: dict[str, Any], work: Path, timeout_s: float = 30) -> Iterator[str]:
    """Run Prometheus with ``config`` (data and log under ``work``); yields its URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError(INSTALL_HINT)
    work.mkdir(parents=True, exist_ok=True)
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    # The port is held until Prometheus stops; Prometheus binds it with SO_REUSEADDR.
    with reserved_port() as port, (work / "prometheus.log").open("w") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        with running(proc, "prometheus", ready, lambda: (work / "prometheus.log").read_text()[-3000:],
                     timeout_s=timeout_s, poll_s=0.2, grace_s=10):
            yield url


def instant(url: str, expr: str) -> list[dict[str, Any]]:
    """The result of an instant PromQL query (fails on a rejected query)."""
    body = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body.get("status") == "success", f"query rejected: {expr}\n{body}"
    return body["data"]["result"]
