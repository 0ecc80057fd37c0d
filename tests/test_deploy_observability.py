"""Dashboards, alert rules and the KEDA trigger name only metrics that exist.

vLLM renames metrics between releases (gpu_cache_usage_perc became
kv_cache_usage_perc); a stale name gives an empty panel or an alert that can never
fire. Every `vllm:` name must be defined by the installed vLLM's metrics code (the
same 0.32.0 the images pin), every `qwen_serve_` name must be one the router exports.
The live test (test_deploy_live.py) then proves each query returns data.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import vllm

REPO = Path(__file__).resolve().parents[1]
SOURCES = (sorted((REPO / "deploy/grafana/dashboards").glob("*.json"))
           + sorted((REPO / "deploy/prometheus/rules").glob("*.yml"))
           + [REPO / "helm/qwen-serve/templates/keda.yaml"])
# The router's series (the ingress /metrics contract, see the core stack issue).
ROUTER_METRICS = {
    "qwen_serve_requests_total", "qwen_serve_request_duration_seconds",
    "qwen_serve_time_to_first_byte_seconds", "qwen_serve_requests_in_flight",
    "qwen_serve_replicas", "qwen_serve_replica_up", "qwen_serve_rejected_requests_total",
    "qwen_serve_response_cache_requests_total", "qwen_serve_tokens_total",
}
SUFFIX = re.compile(r"_(bucket|count|sum)$")


def _used(pattern: str) -> dict[str, set[str]]:
    used: dict[str, set[str]] = {}
    for path in SOURCES:
        for name in re.findall(pattern, path.read_text()):
            used.setdefault(name, set()).add(path.name)
    return used


def _vllm_defined() -> set[str]:
    root = Path(vllm.__file__).parent / "v1" / "metrics"
    names = set()
    for source in root.rglob("*.py"):
        names.update(re.findall(r'"(vllm:[a-z0-9_]+)"', source.read_text()))
    return names


def test_vllm_metric_names_exist_in_the_pinned_vllm():
    assert vllm.__version__ == "0.32.0"
    defined = _vllm_defined()
    used = _used(r"vllm:[a-z0-9_]+")
    assert len(used) >= 10
    unknown = {}
    for name, files in used.items():
        base = SUFFIX.sub("", name)
        if base not in defined and base.removesuffix("_total") not in defined:
            unknown[name] = sorted(files)
    assert not unknown, f"not defined by vLLM {vllm.__version__}: {unknown}"


def test_router_metric_names_are_the_exported_ones():
    used = {SUFFIX.sub("", n): f for n, f in _used(r"qwen_serve_[a-z_]+").items()}
    assert set(used) <= ROUTER_METRICS, {n: sorted(f) for n, f in used.items() if n not in ROUTER_METRICS}


def test_dashboards_are_well_formed_and_every_panel_queries_something():
    uids = set()
    for path in sorted((REPO / "deploy/grafana/dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        assert board["uid"] not in uids
        uids.add(board["uid"])
        for panel in board["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["targets"], f"{path.name}: {panel['title']} has no query"
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}", "dashboards must not pin a datasource"
    assert uids == {"qwen-serve-overview", "qwen-serve-replica"}


def test_chart_ships_the_same_rules_and_dashboards():
    files = REPO / "helm/qwen-serve/files"
    assert (files / "rules").resolve() == (REPO / "deploy/prometheus/rules").resolve()
    assert (files / "dashboards").resolve() == (REPO / "deploy/grafana/dashboards").resolve()
