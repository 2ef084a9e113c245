"""torchrun with two CPU processes (gloo, DALI cpu pipelines sharded by rank)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score

from dalipipe import checkpoint
from tests.test_cli import dalipipe


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_two_process_epoch_is_sharded_and_validated_once(small_synth, tmp_path, loader):
    if shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("torchrun not found beside this Python")
    d, run, log = small_synth, tmp_path / "run", tmp_path / "samples"
    env = dict(os.environ, DALIPIPE_SAMPLE_LOG=str(log), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node", "2",
           "-m", "dalipipe", "train", str(d / "images_train"), str(d / "y_train.csv"), "--out", str(run),
           "--epochs", "1", "--image-size", "32", "--batch-size", "16", "--device", "cpu", "--workers", "1",
           "--loader", loader]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    # Training: the ranks' samples are disjoint and together are the training split, each once.
    ck = checkpoint.load(run / "last.pt")
    train_ids = set(ck["split"]["train_ids"])
    per_rank = [json.loads((log / f"rank{k}.jsonl").read_text())["file_ids"] for k in (0, 1)]
    assert set(per_rank[0]).isdisjoint(per_rank[1]) or loader == "torch"
    union = per_rank[0] + per_rank[1]
    assert set(union) == train_ids
    # The torch DistributedSampler pads the shorter shard with at most one repeat (documented).
    assert len(union) - len(train_ids) <= (1 if loader == "torch" else 0)

    # Only rank 0 wrote: one set of outputs.
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["best.pt", "last.pt", "config.json", "labels.json", "metrics.jsonl", "learning_curves.png",
         "confusion_matrix.png"])
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1

    # Validation over the whole set once: predict on the validation ids gives the same balanced accuracy.
    val_ids = ck["split"]["val_ids"]
    pd.DataFrame({"file_id": val_ids}).to_csv(tmp_path / "val_ids.csv", index=False)
    dalipipe("predict", run / "last.pt", d / "images_train", "--out", tmp_path / "val.csv", "--ids",
             tmp_path / "val_ids.csv", "--device", "cpu", "--loader", loader)
    pred = pd.read_csv(tmp_path / "val.csv")
    truth = pd.read_csv(d / "y_train.csv").set_index("file_id").loc[val_ids, "cell_line"]
    assert balanced_accuracy_score(truth.to_numpy(), pred.cell_line.to_numpy()) == pytest.approx(
        ck["val_balanced_accuracy"], abs=1e-9)
