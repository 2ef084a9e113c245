"""The one-command GPU verification runs on the CPU too (tiny sizes), so that it cannot rot between the
rare sessions that have a GPU machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_quick_on_the_cpu_writes_a_complete_report(tmp_path):
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--quick",
                        "--out", str(out), "--work", str(tmp_path / "work")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [s["step"] for s in report["steps"]] == ["environment", "gpu tests", "synthetic data", "loader benchmark",
                                                    "reference recipe"]
    assert all(s["status"] == "ok" for s in report["steps"]), report["steps"]
    assert report["environment"]["device"] == "cpu" and report["environment"]["torch"]
    assert report["gpu_tests"]["counts"].get("skipped", 0) >= 1  # no GPU here: the GPU tests skip, none fail
    assert not report["gpu_tests"]["failed"]
    summary = report["benchmark"]["summary"]
    for key in ("torch_load_images_per_s", "dali_load_images_per_s", "dali_train_images_per_s",
                "ceiling_train_images_per_s", "dali_train_data_wait"):
        assert summary[key] > 0 or key.endswith("wait"), key
    rec = report["recipe"]
    assert rec["epochs_done"] == rec["epochs_planned"] == 2 and not rec["stopped_early"]
    for key in ("data_check_s", "loader_build_s", "train_s", "val_s", "predict_s", "train_images_per_s"):
        assert rec[key] >= 0, key
    assert 0 <= rec["test_balanced_accuracy"] <= 1
    assert len(report["verdict"]) == 3
    md = (out / "report.md").read_text()
    for heading in ("## Steps", "## GPU tests", "## Loader benchmark", "## Reference recipe", "## Verdict"):
        assert heading in md
    # Only the report's few files, no run folders or checkpoints (they go to --work).
    assert not list(out.rglob("*.pt"))
