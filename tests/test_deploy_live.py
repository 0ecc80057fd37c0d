"""Every panel of every Grafana dashboard shows data against a real Prometheus.

Why: a dashboard query with a misspelt or renamed metric (vLLM renames them between
releases) renders as an empty panel and nobody notices until an incident. Here a real
Debian ``prometheus`` scrapes the real stack's ingress ``/metrics`` (router series and
every engine's re-exported ``vllm:*`` series), a short load runs through the stack,
and then each panel's PromQL — with Grafana's variables filled in — must return at
least one finite sample. The alert rules are loaded too, so a rule Prometheus rejects
fails here as well.

Not skippable: without the ``prometheus`` binary this test fails and says how to
install it (``bash deploy/check.sh tools``).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import yaml

from local_service import ServiceFailed
from prometheus_server import INSTALL_HINT, instant, prometheus_server

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((REPO / "deploy/grafana/dashboards").glob("*.json"))
RULES = REPO / "deploy/prometheus/rules/qwen-serve.rules.yml"
SCRAPE_S = 1.0

# Panels allowed to show no data on the live stack, as (dashboard title, panel title).
# Keep this list explicit and short: every entry is a panel a user may see empty.
OPTIONAL_PANELS = {
    # The router's response cache is future work; its counter
    # qwen_serve_response_cache_requests_total exists only once the cache does.
    ("qwen-serve / Overview", "Response cache hit rate"),
}

# Values Grafana would substitute; the rate window spans the whole short test run.
VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "5m",
             "${replica}": ".*", "$replica": ".*"}


def _panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard title, panel title, PromQL with variables substituted) for each target."""
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                for var, value in VARIABLES.items():
                    expr = expr.replace(var, value)
                out.append((board["title"], panel["title"], expr))
    return out


@pytest.fixture(scope="module")
def prometheus(stack, tmp_path_factory) -> Iterator[str]:
    """A real Prometheus on an ephemeral loopback port scraping the stack; yields its URL."""
    if shutil.which("prometheus") is None:
        pytest.fail(INSTALL_HINT)
    target = httpx.URL(stack.base_url)
    job: dict[str, Any] = {
        "job_name": "qwen-serve",
        "scheme": target.scheme,
        "metrics_path": "/metrics",
        "static_configs": [{"targets": [f"{target.host}:{target.port}"]}],
    }
    if stack.api_key:
        job["authorization"] = {"credentials": stack.api_key}
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S:g}s", "evaluation_interval": f"{SCRAPE_S:g}s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [job],
    }
    try:
        with prometheus_server(config, tmp_path_factory.mktemp("prometheus")) as url:
            yield url
    except ServiceFailed as exc:
        pytest.fail(str(exc))


def _has_finite_sample(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


def _wait_for_scrapes(url: str, count: int) -> None:
    """Wait until `count` more scrapes of the stack succeeded (counters then move between samples)."""
    deadline = time.monotonic() + 30 + count * SCRAPE_S
    start = None
    while time.monotonic() < deadline:
        result = instant(url, 'count_over_time(up{job="qwen-serve"}[10m])')
        up = instant(url, 'up{job="qwen-serve"}')
        if result and up and float(up[0]["value"][1]) == 1.0:
            seen = float(result[0]["value"][1])
            start = seen if start is None else start
            if seen - start >= count:
                return
        time.sleep(SCRAPE_S / 2)
    pytest.fail("prometheus did not scrape the stack successfully (is /metrics up?)")


def _send_load(stack) -> None:
    """A short, bounded mix a real client would send, including two failing requests."""
    headers = {"Authorization": f"Bearer {stack.api_key}"} if stack.api_key else {}
    # A shared system prompt longer than one KV block, so the prefix cache is queried and hit.
    system = "You are a terse assistant for a load test. " * 6
    chat = {"model": stack.model, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": "Name a colour."}]}
    with httpx.Client(base_url=stack.base_url, headers=headers, timeout=120) as client:
        for _ in range(2):
            assert client.post("/v1/chat/completions", json=chat).status_code == 200
        with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as resp:
            assert resp.status_code == 200
            for _ in resp.iter_lines():
                pass
        completion = {"model": stack.model, "prompt": system + "Count: one,", "max_tokens": 8}
        assert client.post("/v1/completions", json=completion).status_code == 200
        # Failures a dashboard must show: an unknown model and a malformed body.
        assert client.post("/v1/chat/completions", json={**chat, "model": "no-such-model"}).status_code >= 400
        bad = client.post("/v1/chat/completions", content=b"{not json",
                          headers={"Content-Type": "application/json"})
        assert bad.status_code >= 400


@pytest.mark.stack
def test_every_dashboard_panel_returns_data(stack, prometheus):
    queries = _panel_queries()
    assert len(DASHBOARDS) >= 2 and len(queries) >= 20, "dashboards missing or nearly empty"

    _wait_for_scrapes(prometheus, 2)
    for _ in range(2):  # two waves, each between scrapes, so every counter has a rate
        _send_load(stack)
        _wait_for_scrapes(prometheus, 2)

    empty = [(board, panel, expr) for board, panel, expr in queries
             if not _has_finite_sample(instant(prometheus, expr))]
    required = [e for e in empty if (e[0], e[1]) not in OPTIONAL_PANELS]
    optional = [e for e in empty if (e[0], e[1]) in OPTIONAL_PANELS]
    if optional:
        print("optional panels without data:\n" + "\n".join(f"  {b} / {p}: {x}" for b, p, x in optional))
    assert not required, (
        f"{len(required)} of {len(queries)} panel queries returned no data:\n"
        + "\n".join(f"  {b} / {p}: {x}" for b, p, x in required)
    )


@pytest.mark.stack
def test_alert_rules_load_and_stay_quiet_on_a_healthy_stack(prometheus):
    """The real Prometheus accepted the rule file, and nothing fires on a healthy stack."""
    _wait_for_scrapes(prometheus, 1)
    groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    names = {rule["name"] for group in groups for rule in group["rules"]}
    expected = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"]
                for rule in group["rules"]}
    assert names == expected
    firing = [a["labels"]["alertname"] for a in
              httpx.get(f"{prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
              if a["state"] == "firing"]
    assert firing == []
