"""The training loop called as a library: the time limit, and the phase timings it reports."""

from __future__ import annotations

import dataclasses
import json

from dalipipe.config import AugmentSpec, TrainConfig
from dalipipe.run.train import train
from dalipipe.run_state import SavedRun


def test_time_limit_stops_at_a_step_with_a_checkpoint_and_resume_finishes(small_synth, tmp_path):
    d = small_synth
    cfg = TrainConfig(images_dir=str(d / "images_train"), labels_csv=str(d / "y_train.csv"), out_dir=str(tmp_path / "run"),
                      epochs=2, batch_size=32, device="cpu", workers=1, augment=AugmentSpec(image_size=16),
                      time_limit_minutes=1e-6)
    result = train(cfg)
    # 168 training samples, batch 32: 6 steps an epoch; the limit has passed at the first step.
    assert result.stopped_early and result.epochs == 0 and result.partial_steps == 1
    assert result.steps_per_epoch == 6
    assert SavedRun.read(tmp_path / "run" / "last.pt").partial_steps == 1
    t = result.timings
    assert set(t) == {"data_check_s", "model_build_s", "loader_build_s", "train_s", "val_s", "record_wait_s",
                      "total_s"}
    assert all(v >= 0 for v in t.values()) and t["total_s"] >= t["train_s"] + t["val_s"]

    result = train(dataclasses.replace(cfg, time_limit_minutes=None), resume=True)
    assert not result.stopped_early and result.epochs == 2
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2]


def test_a_loader_state_for_another_loader_is_dropped_at_an_epoch_end_and_refused_mid_epoch():
    import pytest
    import torch

    from dalipipe.distributed import World
    from dalipipe.errors import DataError
    from dalipipe.run.train_state import loader_key, restore
    from dalipipe.run_state import RankState

    cpu = torch.device("cpu")
    saved = [RankState(rng_cpu=torch.get_rng_state(), rng_cuda=None, loader={"epoch": 1, "done": 0},
                       loader_key=loader_key("torch", "mixed", cpu))]
    assert restore(saved, partial_steps=None, key="torch", device=cpu, world=World(),
                   run="run").loader == {"epoch": 1, "done": 0}
    assert restore(saved, partial_steps=None, key=loader_key("dali", "mixed", cpu), device=cpu, world=World(),
                   run="run").loader is None
    with pytest.raises(DataError, match="same --loader"):
        restore(saved, partial_steps=2, key=loader_key("dali", "mixed", cpu), device=cpu, world=World(), run="run")
    with pytest.raises(DataError, match="with 1 process"):
        restore(saved, partial_steps=2, key="torch", device=cpu, world=World(rank=0, size=2), run="run")
    # On a GPU the DALI graph depends on the decoding; on the CPU it does not.
    assert loader_key("dali", "mixed", cpu) == loader_key("dali", "cpu", cpu)
    gpu = torch.device("cuda", 0)
    assert loader_key("dali", "mixed", gpu) != loader_key("dali", "cpu", gpu)
