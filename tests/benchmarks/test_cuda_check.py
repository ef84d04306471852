"""The GPU check's own code path, run on the CPU (the device runs it with --device cuda)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.cuda_check import check_batched, check_family


def test_cuda_check_code_path_on_cpu(tmp_path: Path) -> None:
    line = check_family("llama", "cpu", "float32", tmp_path)
    assert "EQUAL" in line and "prefill max |logit diff| 0" in line, line
    line = check_batched("cpu", tmp_path)
    diff = float(line.rsplit(" ", 1)[1])
    assert diff < 1e-4, line
