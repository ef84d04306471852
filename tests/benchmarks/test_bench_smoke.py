"""The benchmark's code path end to end on a tiny model: every JSON field present and sane.

Not a timing test: it checks that the benchmark measures what it says (real daemons, real
generate calls, positive times, parity with local generation, memory read from /proc), so that
the figures in BENCHMARKS.md come from code that runs.
"""
from __future__ import annotations

import json
import math

import pytest

from benchmarks.measure import span_weight_bytes
from benchmarks.shapes import SHAPES, ensure_model, split_blocks
from benchmarks.swarm_vs_local import BenchConfig, format_report, main, parse_args, run_benchmark

pytestmark = pytest.mark.integration


def test_split_blocks_covers_every_block_once():
    assert split_blocks(16, 3) == [(0, 5), (5, 10), (10, 16)]
    assert split_blocks(8, 2) == [(0, 4), (4, 8)]
    with pytest.raises(ValueError):
        split_blocks(4, 5)


def test_shape_param_counts_match_the_issue():
    assert round(SHAPES["271m"].num_params / 1e6) == 271
    assert round(SHAPES["6.8m"].num_params / 1e5) == 68


def test_bad_options_are_refused(capsys):
    assert main(["--model-size", "tiny", "--new-tokens", "1"]) == 2
    assert "--new-tokens" in capsys.readouterr().err


def test_tiny_run_reports_every_field(tmp_path):
    config, json_path = parse_args([
        "--model-size", "tiny", "--daemons", "2", "--repeats", "1", "--new-tokens", "6",
        "--prefill-tokens", "24", "--sessions", "2", "--local-threads", "1", "--daemon-threads", "1",
        "--cache-budget", str(64 * 2**20), "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "r.json"),
    ])
    assert isinstance(config, BenchConfig) and json_path == tmp_path / "r.json"
    result = run_benchmark(config)
    json.loads(json.dumps(result))  # the record is plain JSON

    assert result["config"]["spans"] == ["0:2", "2:4"]
    assert result["machine"]["cores"] >= 1 and result["machine"]["cpu_model"]
    assert result["machine"]["torch_threads_per_daemon"] == 1

    decode = result["decode"]
    assert len(decode["local_s_per_token"]) == len(decode["swarm_s_per_token"]) == 1
    assert 0 < decode["local_median_s"] < 5 and 0 < decode["swarm_median_s"] < 5
    assert math.isclose(decode["ratio"], decode["swarm_median_s"] / decode["local_median_s"])
    assert decode["tokens_match"] is True  # greedy through the swarm equals local generate

    prefill = result["prefill"]
    assert prefill["tokens"] == 24 and prefill["local_median_s"] > 0 and prefill["swarm_median_s"] > 0

    conc = result["concurrency"]
    assert conc["sessions"] == 2 and conc["single_median"] > 0 and conc["aggregate_median"] > 0
    assert math.isclose(conc["speedup"], conc["aggregate_median"] / conc["single_median"])
    assert 0 < conc["cpu_busy_median"] <= 1.1 and len(conc["cpu_busy_fraction"]) == 1  # (clock ticks round)

    path = ensure_model(SHAPES["tiny"], tmp_path / "cache")
    assert [d["blocks"] for d in result["daemons"]] == ["0:2", "2:4"]
    for daemon, span in zip(result["daemons"], [(0, 2), (2, 4)]):
        assert daemon["span_weight_bytes"] == span_weight_bytes(path, *span) > 0
        assert 0 < daemon["ready_s"] < 120
        # A live Python process with torch loaded holds well over 50 MB; peak is never below current.
        assert 50 * 2**20 < daemon["rss_bytes"] <= daemon["peak_rss_bytes"]
        assert daemon["rss_limit_bytes"] == daemon["span_weight_bytes"] + 64 * 2**20 + 500 * 2**20
    assert result["targets"]["decode_met"] is None  # no target stated for the tiny shape
    assert isinstance(result["targets"]["rss_met"], bool)
    report = format_report(result)
    assert "ratio" in report and "d2 blocks 2:4" in report
