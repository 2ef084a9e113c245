"""The training loop called as a library: the time limit, what it tells an instrument's callback, the
best-epoch rule and the figures of an epoch over every process."""

from __future__ import annotations

import dataclasses
import json

from dalipipe.config import AugmentSpec, TrainConfig
from dalipipe.checkpoint import Progress, SavedRun
from dalipipe.run.train import RankFigures, train, training_figures


def test_time_limit_stops_at_a_step_with_a_checkpoint_and_resume_finishes(small_synth, tmp_path):
    d = small_synth
    cfg = TrainConfig(images_dir=str(d / "images_train"), labels_csv=str(d / "y_train.csv"), out_dir=str(tmp_path / "run"),
                      epochs=2, batch_size=32, device="cpu", workers=1, augment=AugmentSpec(image_size=16),
                      time_limit_minutes=1e-6)
    events = []
    result = train(cfg, observe=lambda event, value: events.append((event, value)))
    # 168 training samples, batch 32: 6 steps an epoch; the limit has passed at the first step.
    assert result.stopped_early and result.epochs == 0
    assert events == [("epochs", 6), ("stopped", 1)]
    assert SavedRun.read(tmp_path / "run" / "last.pt").partial_steps == 1

    events.clear()
    result = train(dataclasses.replace(cfg, time_limit_minutes=None), resume=True,
                   observe=lambda event, value: events.append((event, value)))
    assert events == [("epochs", 6), ("epoch_end", 1), ("epoch_end", 2)]
    assert not result.stopped_early and result.epochs == 2
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2]


def test_a_loader_state_for_another_loader_is_dropped_at_an_epoch_end_and_refused_mid_epoch():
    import pytest
    import torch

    from dalipipe.distributed import World
    from dalipipe.errors import DataError
    from dalipipe.checkpoint import RankState, loader_key, restore

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
    # DALI's graph with the decoded store is another graph; the torch loader's state fits either way
    assert loader_key("dali", "mixed", cpu, stored=True) != loader_key("dali", "mixed", cpu)
    assert loader_key("torch", "mixed", cpu, stored=True) == loader_key("torch", "mixed", cpu)
    gpu = torch.device("cuda", 0)
    assert loader_key("dali", "mixed", gpu) != loader_key("dali", "cpu", gpu)


def test_a_new_best_beats_the_best_by_more_than_float_noise_and_a_tie_is_not_one():
    p = Progress()
    assert p.record({"epoch": 1}, 0.5)  # the first epoch is the best so far
    assert not p.record({"epoch": 2}, 0.5)  # a tie keeps the earlier epoch as the best
    # The same balanced accuracy summed in another order can differ in its last bit: still a tie.
    assert not p.record({"epoch": 3}, 0.5 + 2 ** -52)
    assert p.record({"epoch": 4}, 0.5 + 1e-6)
    assert not p.record({"epoch": 5}, 0.25)
    assert (p.epochs_done, p.best, p.last_score) == (5, 0.5 + 1e-6, 0.25)
    assert [r["epoch"] for r in p.history] == [1, 2, 3, 4, 5]


def test_an_epochs_training_figures_count_every_process():
    memory = {}
    fast = RankFigures(loss_sum=8.0, seen=4, train_s=2.0, data_wait_s=0.5, memory=memory)  # waited 25%
    slow = RankFigures(loss_sum=4.0, seen=4, train_s=4.0, data_wait_s=0.8, memory=memory)  # waited 20%, longer
    for ranks in ([fast, slow], [slow, fast]):  # whichever is rank 0
        figures = training_figures(ranks)
        assert figures["train_loss"] == 1.5  # (8 + 4) / (4 + 4): every sample once, not rank 0's mean
        assert figures["train_images_per_s"] == 2.0  # 8 images in the slowest process's 4 s
        # the most starved process is the one that waited the largest share of its time
        assert (figures["data_wait_s"], figures["data_wait_share"]) == (0.5, 0.25)


def test_the_thread_setting_reaches_torch_in_train_and_predict(small_synth, tmp_path, monkeypatch, caplog):
    import logging

    import torch

    from dalipipe.loading import loader_rules

    from dalipipe.infer.predict import predict
    from dalipipe.settings import PredictSettings

    d, run = small_synth, tmp_path / "run"
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(loader_rules, "available_cores", lambda: 2)  # the loader's 1 worker leaves 1 core
    cfg = TrainConfig(images_dir=str(d / "images_train"), labels_csv=str(d / "y_train.csv"), out_dir=str(run),
                      epochs=1, batch_size=32, device="cpu", workers=1, augment=AugmentSpec(image_size=16),
                      threads=3, time_limit_minutes=1e-6)  # stops after its first step
    with caplog.at_level(logging.INFO, logger="dalipipe"):
        train(cfg)
    said = [r.getMessage() for r in caplog.records]
    assert any("1 workers), 1 process(es), 3 torch thread(s)" in line for line in said), said
    # more threads than the loader leaves free: named, once
    assert len([line for line in said if line.startswith("note: --threads 3 and 1 loader workers share")]) == 1
    predict(PredictSettings(checkpoints=(str(run / "last.pt"),), images_dir=str(d / "images_test"),
                            out_csv=str(tmp_path / "sub.csv"), device="cpu", workers=1, threads=2))
    assert calls == [3, 2]


def test_by_default_torch_gets_the_cores_its_loader_leaves_free(monkeypatch):
    from dalipipe.loading import loader_rules

    monkeypatch.setattr(loader_rules, "available_cores", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two training processes: 8 cores each
    assert [loader_rules.default_threads(w) for w in (2, 6, 8, 12)] == [6, 2, 1, 1]


def test_the_progress_bars_last_data_wait_is_the_epoch_lines(monkeypatch):
    """The bar's last figure is drawn once the pass is over, from the seconds the epoch's row is made of."""
    import torch
    from torch import nn

    import dalipipe.run.train as loop
    from dalipipe.run.data_wait import shown

    drawn = []

    class Bar(loop.tqdm):
        def set_postfix_str(self, s="", refresh=True):
            drawn.append(s)
            super().set_postfix_str(s, refresh)

    class Plain:  # the loop's recipe, reduced to a loss
        loss = staticmethod(nn.functional.cross_entropy)

        def before_step(self, opt, step):
            pass

        def after_step(self):
            pass

    monkeypatch.setattr(loop, "tqdm", Bar)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    batches = [(torch.randn(4, 3, 2, 2), torch.arange(4) % 3) for _ in range(5)]
    step = loop.Step(net, torch.optim.SGD(net.parameters(), 0.1), torch.amp.GradScaler("cuda", enabled=False),
                     torch.device("cpu"), "fp32", Plain())
    sums = loop.train_epoch(step, batches, torch.arange(3), steps_before=0)
    figures = loop.training_figures([loop.RankFigures(loss_sum=0.0, seen=sums.seen, train_s=sums.train_s,
                                                      data_wait_s=sums.data_wait_s, memory={})])
    assert len(drawn) == 6 and drawn[-1] == f"data wait {shown(figures['data_wait_share'])}"
