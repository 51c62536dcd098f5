"""benchmarks/gpu_check.py --dry_run: every GPU check runs on CPU at tiny shapes, so the script cannot rot."""

from __future__ import annotations

import importlib.util

from tests.conftest import REPO


def test_gpu_check_dry_run_runs_every_check_and_reports_one_summary(capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    summary = gpu_check.main(["--dry_run"])
    assert set(gpu_check.CHECKS) <= set(summary)
    failed = {k: v for k, v in summary.items() if isinstance(v, dict) and not v.get("ok")}
    assert summary["ok"] and not failed, failed
    assert summary["packed_attention"]["max_logit_diff"] <= 1e-4  # packed documents never see each other
    assert (
        summary["chunked_loss"]["full"]["loss"] == summary["chunked_loss"]["chunked"]["loss"]
        or abs(summary["chunked_loss"]["full"]["loss"] / summary["chunked_loss"]["chunked"]["loss"] - 1)
        < 1e-5
    )
    assert '"ok": true' in capsys.readouterr().out
