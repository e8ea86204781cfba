"""`benchmarks/gpu_check.py` runs on the CPU: it skips the CUDA steps cleanly and its bf16
integration checks (run on the CPU with `--cpu-smoke`) agree with float64."""

import importlib
import json
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("gpu_check")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path only")
def test_skips_cleanly_without_cuda(gpu_check, tmp_path):
    record = gpu_check.main(["--out", str(tmp_path / "g.json")])
    saved = json.loads((tmp_path / "g.json").read_text())
    assert saved == record
    assert record["status"] == "skipped" and record["cuda_available"] is False
    for step in ("device_tests", "backward_savings", "integrations_bf16"):
        assert record[step] == {"status": "skipped", "reason": "no CUDA device"}


def test_cpu_smoke_runs_the_bf16_integration_checks(gpu_check, tmp_path):
    record = gpu_check.main(["--cpu-smoke", "--out", str(tmp_path / "g.json")])
    checks = record["integrations_bf16"]["checks"]
    assert record["integrations_bf16"]["status"] == "passed", checks
    assert set(checks) >= {"verl/token-mean", "rlinf/embodied", "simplevla/gather", "fold/token-mean"}
    assert all(c["ok"] for c in checks.values())
    assert all(c["relative_error"] < 2e-2 for c in checks.values() if "relative_error" in c)


def test_device_test_files_have_cuda_cases(gpu_check):
    for name in gpu_check.DEVICE_TEST_FILES:
        text = (BENCHMARKS.parent / name).read_text()
        assert "torch.cuda.is_available()" in text and "cuda" in text, name
