"""Result files: JSON round trip, Markdown tables, PNG plots, CLI argument errors."""

import argparse
import json

from benchmarks.cli import main, register
from benchmarks.compare import CompareLevel
from benchmarks.loadgen import LoadShape, RunResult
from benchmarks.metrics import summarize
from benchmarks.plots import write_plots
from benchmarks.report import (compare_document, compare_markdown, run_document, run_markdown,
                               write_json)
from benchmarks.stream import RequestRecord
from benchmarks.sweep import LevelResult


def _level(conc, ttft, target="A", rep=0):
    recs = [RequestRecord(i, 0.1 * i, True, 200, None, None, ttft, [0.02, 0.03], ttft + 0.05, 8,
                          3, True) for i in range(5)]
    recs.append(RequestRecord(5, 0.0, False, 503, "http_503", "busy", None, [], None, None, 0,
                              False))
    return LevelResult(LoadShape(concurrency=conc), RunResult(recs, 2.0, False, 0.0),
                       summarize(recs, 2.0, {"ttft": 150.0}), target=target, repeat=rep)


def test_run_outputs(tmp_path):
    levels = [_level(1, 0.1), _level(4, 0.2)]
    cfg = {"workload": "synthetic", "model": "m", "num_requests": 6}
    env = {"cpu": "test cpu", "cpu_count": 2, "packages": {"httpx": "0"}, "git": {}}
    targets = {"A": {"base_url": "http://a"}}
    path = write_json(tmp_path / "result.json",
                      run_document(cfg, env, targets, levels, "saturated: x"))
    doc = json.loads(path.read_text())
    assert doc["config"] == cfg and doc["environment"]["cpu"] == "test cpu"
    lv = doc["levels"][1]
    assert lv["shape"]["concurrency"] == 4 and lv["summary"]["completed"] == 5
    assert lv["summary"]["errors"] == {"http_503": 1} and lv["summary"]["goodput"] == 0.0
    assert lv["requests"][0]["itl"] == [0.02, 0.03] and "text" not in lv["requests"][0]
    md = run_markdown(cfg, env, targets, levels, "saturated: x")
    assert "| concurrency=4 | 5/6 | 1 | 2.0 | 2.50 | 7.5 |" in md
    assert "http_503: 1" in md and "saturated: x" in md
    pngs = write_plots(levels, tmp_path, {"A": "server"})
    assert {p.name for p in pngs} == {"latency_vs_load.png", "throughput_vs_load.png",
                                      "ttft_cdf.png", "itl_cdf.png"}
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_compare_outputs(tmp_path):
    cl = CompareLevel(LoadShape(concurrency=2),
                      [_level(2, 0.1, "A", 0), _level(2, 0.2, "B", 0),
                       _level(2, 0.3, "B", 1), _level(2, 0.1, "A", 1)])
    targets = {"A": {"base_url": "http://a"}, "B": {"base_url": "http://b"}}
    doc = compare_document({"repeats": 2}, {}, targets, [cl])
    ttft = doc["levels"][0]["ratios_b_over_a"]["ttft.median"]
    assert ttft["values"] == [2.0, 3.0] and ttft["median"] == 2.5
    md = compare_markdown({"repeats": 2}, {}, targets, [cl])
    assert "2.500 [2.000 – 3.000]" in md and "| B#2 | concurrency=2 |" in md
    assert len(write_plots(cl.runs, tmp_path, {"A": "a", "B": "b"})) == 4


def test_cli_rejects_bad_arguments_without_traffic(capsys):
    assert main(["--url", "http://127.0.0.1:9", "--slo", "foo=1"]) == 2
    assert "SLO" in capsys.readouterr().err
    assert main(["--url", "http://127.0.0.1:9", "--sweep", "qps=1"]) == 2
    assert main(["--url", "http://127.0.0.1:9", "-n", "1"]) == 2  # unreachable server
    assert "cannot reach" in capsys.readouterr().err
    assert main(["--url", "http://127.0.0.1:9", "--model", "a", "--compare-models", "a", "b"]) == 2
    assert "--compare-models" in capsys.readouterr().err


def test_register_adds_bench_subcommand():
    parser = argparse.ArgumentParser(prog="qwen-serve")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--url", "http://x", "--concurrency", "8",
                              "--compare", "http://a", "http://b"])
    assert args.command == "bench" and args.concurrency == 8 and callable(args.func)
    assert args.compare == ["http://a", "http://b"]
