"""The spot-check benchmark's code path on the tiny shape: every field present and sane, tokens equal
local at every rate, and the checks it reports really ran (not a timing test)."""
from __future__ import annotations

import json

import pytest

from benchmarks.spot_checks import RATES, format_report, main

pytestmark = pytest.mark.integration


def test_tiny_run_reports_every_rate(tmp_path, capsys):
    out = tmp_path / "spot.json"
    assert main(["--model-size", "tiny", "--repeats", "1", "--new-tokens", "6", "--cache-dir", str(tmp_path),
                 "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["tokens_match"] is True
    assert set(record["per_token_s"]) == {"local", *map(str, RATES)}
    assert all(v > 0 for v in record["per_token_s"].values())
    # R=1.0 checks every step of every generate call (warm-up: 4 tokens, run: 6); R=0 makes no checker.
    assert record["spot_checks"]["1.0"] == {"checked": 4 + 6, "steps": 4 + 6, "disagreements": 0}
    assert "0.0" not in record["spot_checks"]
    assert "spot_check_rate=1.0" in format_report(record) and "x" in capsys.readouterr().out


def test_one_daemon_is_refused(capsys):
    assert main(["--model-size", "tiny", "--daemons", "1"]) == 2
    assert "--daemons >= 2" in capsys.readouterr().err
