"""A run killed (SIGKILL) in the middle of an epoch and resumed ends exactly as its uninterrupted twin:
the same metrics (timings aside) and, on the CPU, bit-for-bit the same weights."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

from dalipipe import checkpoint
from tests import processes
from tests.test_cli import dalipipe

# Each run of these tests: under 20 s here (2026-12-06, 2-core CPU, two tests at once; a whole test, three
# runs, 45-57 s); about 4x the longest whole test's share.
RUN_TIMEOUT_S = 240

# what a machine's speed and memory decide, not the training
TIMING = ("train_images_per_s", "val_seconds", "epoch_seconds", "data_wait_s", "data_wait_share",
          "torch_peak_allocated_mb", "device_memory_used_mb")
# 168 training samples, batch 32: 6 steps an epoch (5 of 32, one of 8), 18 in three epochs. Checkpoints at
# every second step and at the epoch ends; the kill after step 3 falls in the first epoch, after the step-2
# checkpoint, so that the resumed run has a partial epoch to finish and two whole epochs after it (a kill
# in the last epoch would hide what goes wrong in the epochs after the partial one).
OPTS = ["--epochs", "3", "--image-size", "16", "--batch-size", "32", "--device", "cpu", "--workers", "2",
        "--checkpoint-every", "2"]
# A weight average and a per-step learning rate, both continued where the kill fell.
RECIPE = ["--ema", "0.9", "--schedule", "cosine", "--warmup-epochs", "0.5"]
KILL_AT = 3


def metrics(run):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_twins(a, b):
    assert metrics(a) == metrics(b)
    ca, cb = checkpoint.load(a / "last.pt"), checkpoint.load(b / "last.pt")
    for key in ("model", "ema"):
        if key == "ema" and ca.get("ema") is None:
            assert cb.get("ema") is None
            continue
        wa, wb = (ca[key], cb[key]) if key == "model" else (ca[key]["model"], cb[key]["model"])
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), key


def killed_at(cmd, env):
    r = processes.run(cmd, env=env, timeout=RUN_TIMEOUT_S)
    assert r.returncode != 0, "the run was meant to be killed"
    return r


@pytest.mark.parametrize("loader, extra", [("dali", RECIPE), ("torch", RECIPE), ("dali", [])],
                         ids=["dali-ema-cosine", "torch-ema-cosine", "dali"])
def test_killed_mid_epoch_and_resumed_equals_the_uninterrupted_run(small_synth, tmp_path, loader, extra):
    d = small_synth
    args = [d / "images_train", d / "y_train.csv", *OPTS, "--loader", loader, *extra]
    dalipipe("train", *args, "--out", tmp_path / "twin")
    env = dict(os.environ, DALIPIPE_KILL_AT_STEP=str(KILL_AT), PYTHONWARNINGS="ignore")
    killed_at([sys.executable, "-m", "dalipipe", "train", *map(str, args), "--out", str(tmp_path / "run")], env)
    saved = checkpoint.load(tmp_path / "run" / "last.pt")
    assert saved["epoch"] == 0 and saved["partial"] == {"steps": 2}  # global step 2: epoch 1, step 2
    if extra:
        assert saved["ema"]["updates"] == 2
    dalipipe("train", "--resume", tmp_path / "run")
    assert_twins(tmp_path / "twin", tmp_path / "run")


def test_torchrun_killed_mid_epoch_and_resumed_equals_the_uninterrupted_run(small_synth, tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if shutil.which(torchrun) is None:
        pytest.skip("torchrun not found beside this Python")
    d = small_synth
    # Two ranks: 84 samples each, batch 16: 6 steps an epoch (5 of 16, one of 4).
    opts = [o if o != "32" else "16" for o in OPTS]
    base = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "dalipipe", "train", str(d / "images_train"),
            str(d / "y_train.csv"), *opts, *RECIPE]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    r = processes.run(base + ["--out", str(tmp_path / "twin")], env=env, timeout=RUN_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    killed_at(base + ["--out", str(tmp_path / "run")], dict(env, DALIPIPE_KILL_AT_STEP=str(KILL_AT)))
    saved = checkpoint.load(tmp_path / "run" / "last.pt")
    assert saved["epoch"] == 0 and saved["partial"] == {"steps": 2} and len(saved["ranks"]) == 2
    r = processes.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "dalipipe", "train", "--resume",
                        str(tmp_path / "run")], env=env, timeout=RUN_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_twins(tmp_path / "twin", tmp_path / "run")
