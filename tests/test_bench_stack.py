"""One short real run of the benchmark tool against the real stack."""

import json

import pytest

from benchmarks.cli import main


@pytest.mark.stack
def test_short_benchmark_run_against_the_stack(stack, tmp_path):
    key = ["--api-key", stack.api_key] if stack.api_key else []
    out = tmp_path / "run"
    code = main(["--url", stack.base_url, "--model", stack.model, *key,
                 "--workload", "synthetic", "--input-len", "16", "--output-len", "8",
                 "--concurrency", "2", "-n", "4", "--max-duration", "120",
                 "--slo", "ttft=60000,tpot=10000", "--output-dir", str(out), "--no-progress"])
    assert code == 0
    doc = json.loads((out / "result.json").read_text())
    assert doc["config"]["ignore_eos"] is True  # vLLM behind the stack accepts it
    s = doc["levels"][0]["summary"]
    assert (s["completed"], s["failed"], s["cancelled"]) == (4, 0, 0)
    # ignore_eos + usage from the server: exactly 8 output tokens per request
    assert s["total_output_tokens"] == 32
    assert s["total_input_tokens"] >= 4 * 16
    assert 0 < s["ttft"]["median"] < s["e2el"]["median"]
    assert s["tpot"]["count"] == 4 and s["itl"]["count"] > 0
    assert s["good_completed"] == 4 and s["request_throughput"] > 0
    for req in doc["levels"][0]["requests"]:
        assert req["ok"] and req["usage_reported"] and req["output_tokens"] == 8
    assert (out / "report.md").read_text().count("| concurrency=2 | 4/4 |") == 1
    assert (out / "latency_vs_load.png").stat().st_size > 0
