"""The training loop called as a library: time limit and the phase timings it reports."""

from __future__ import annotations

import json

from dalipipe.config import AugmentSpec, TrainConfig
from dalipipe.train import train


def test_time_limit_stops_cleanly_after_an_epoch_and_reports_phases(small_synth, tmp_path):
    d = small_synth
    cfg = TrainConfig(images_dir=str(d / "images_train"), labels_csv=str(d / "y_train.csv"), out_dir=str(tmp_path / "run"),
                      epochs=3, batch_size=32, device="cpu", workers=1, augment=AugmentSpec(image_size=16),
                      time_limit_minutes=1e-6)
    result = train(cfg)
    assert result["stopped_early"] and result["epochs"] == 1
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1]
    t = result["timings"]
    assert set(t) == {"data_check_s", "model_build_s", "loader_build_s", "train_s", "val_s", "total_s"}
    assert all(v >= 0 for v in t.values()) and t["total_s"] >= t["train_s"] + t["val_s"]
