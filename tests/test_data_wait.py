"""The data wait: measured around the loader's next() in every epoch, exactly the time a slow loader takes
to hand over its batches and 0 for a loader that is ready, with no synchronization added; shown in
metrics.jsonl, the epoch line, TensorBoard and the plot; one line of advice when a run starves. The clock
is a stand-in that only the stand-in loader and step advance, by known amounts: the figures are exact,
however busy the machine."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dalipipe import device as dev
from dalipipe.config import TrainConfig
from dalipipe.constants import DATA_WAIT_ADVICE_SHARE
from dalipipe.run import train as loop
from dalipipe.run.data_wait import Advisor, DataWait, Machine, advice, shown

CPU = torch.device("cpu")
BATCHES, BATCH = 6, 4
STEP_S = 0.125  # what each training step takes by the stand-in clock (binary fractions: sums stay exact)


class Clock:
    """Seconds that pass only when advanced."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class StandInLoader:
    """Batches of random images; each next() takes `delay` seconds of the clock, and the iterator's start
    `start` seconds (before its first batch, as a torch loader's workers start)."""

    def __init__(self, clock: Clock, delay: float, start: float = 0.0):
        self.clock, self.delay, self.start, self.inside = clock, delay, start, 0.0
        self.batches = [(torch.randn(BATCH, 3, 8, 8), torch.arange(BATCH)) for _ in range(BATCHES)]

    def __len__(self):
        return BATCHES

    def _take(self, seconds):
        self.clock.advance(seconds)
        self.inside += seconds

    def __iter__(self):
        self._take(self.start)
        for batch in self.batches:
            self._take(self.delay)
            yield batch


class SlowStep:
    """A recipe whose loss takes STEP_S seconds of the clock."""

    def __init__(self, clock: Clock):
        self.clock = clock

    def loss(self, logits, y):
        self.clock.advance(STEP_S)
        return nn.functional.cross_entropy(logits, y)

    def before_step(self, opt, step):
        pass

    def after_step(self):
        pass


def one_epoch(loader, monkeypatch):
    """train_epoch over the loader, its data wait timed by the loader's clock: (sums, the epoch's seconds)."""
    clock = loader.clock
    monkeypatch.setattr(loop, "DataWait", lambda: DataWait(clock=clock))
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, BATCH))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    t0 = clock()
    step = loop.Step(net, opt, torch.amp.GradScaler("cuda", enabled=False), CPU, "fp32", SlowStep(clock))
    sums = loop.train_epoch(step, loader, torch.arange(BATCH), steps_before=0, show=False)
    return sums, clock() - t0


def test_the_wait_is_the_time_the_loader_took_to_hand_over_its_batches(monkeypatch):
    slow = StandInLoader(Clock(), delay=0.25, start=0.5)
    sums, elapsed = one_epoch(slow, monkeypatch)
    # All of the loader's own time, its start included, and nothing else (a timer that also counted the
    # steps would add BATCHES * STEP_S)
    assert sums.data_wait_s == slow.inside == 0.5 + BATCHES * 0.25
    assert elapsed == slow.inside + BATCHES * STEP_S
    assert sums.seen == BATCHES * BATCH
    # the share the run reports (wait / the epoch's training time): 2 s of data in 2.75 s
    assert sums.data_wait_s / elapsed == 2.0 / 2.75


def test_a_loader_that_is_ready_makes_the_model_wait_not_at_all(monkeypatch):
    sums, elapsed = one_epoch(StandInLoader(Clock(), delay=0.0), monkeypatch)
    assert sums.data_wait_s == 0.0 and elapsed == BATCHES * STEP_S  # (counting the steps would give it all)


def test_measuring_adds_no_synchronization(monkeypatch):
    """The epoch synchronizes once, at its end (the loss stays on the device), whatever the loader."""
    calls = []
    real = dev.synchronize
    monkeypatch.setattr(dev, "synchronize", lambda device: calls.append(device) or real(device))
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("a host copy inside the epoch"))
    one_epoch(StandInLoader(Clock(), delay=0.25), monkeypatch)
    assert calls == [CPU]


def test_the_timer_counts_only_the_time_inside_the_loader():
    clock = Clock()
    wait = DataWait(clock=clock)
    for _ in wait.timed(StandInLoader(clock, delay=0.25, start=1.0)):
        clock.advance(8.0)  # the step: not waiting
    assert wait.seconds == 1.0 + BATCHES * 0.25


CFG = TrainConfig(images_dir="i", labels_csv="l", out_dir="o")


def test_advice_names_the_settings_most_likely_to_help_on_the_machine_and_loader():
    # decoding every epoch on a GPU machine with idle cores: the store first, then workers, then the decoder
    no_store = TrainConfig(images_dir="i", labels_csv="l", out_dir="o", decode_once=False)
    gpu = advice(no_store, Machine("cuda", cores=16, processes=4, workers=2, stored=False), 0.4, 3)
    assert gpu.startswith("note: the model waited for data 40% of epoch 3's training time")
    named = ["--decode-once", "more --workers", "--decoder cpu", "benchmarks/loader_speed.py --train --sweep"]
    assert [gpu.index(n) for n in named] == sorted(gpu.index(n) for n in named)
    assert "uses 2 per process for 4 process(es); this machine has 16 cores" in gpu
    # with the store (the default) nothing is decoded: neither it nor the decoder is named
    stored = advice(CFG, Machine("cuda", cores=16, processes=4, workers=2, stored=True), 0.4, 3)
    assert "--decode-once" not in stored and "--decoder" not in stored and "more --workers" in stored
    # the store asked for but left out (no room in the cache folder): a place with room is the first tip
    no_room = advice(CFG, Machine("cuda", cores=16, processes=4, workers=2, stored=False), 0.4, 3)
    assert no_room.index("--store DIR on a disk with room") < no_room.index("more --workers")
    assert "--decode-once" not in no_room and "--decoder cpu" in no_room
    # every core busy: no more workers; the torch loader: DALI; no GPU options on the CPU
    cpu = advice(TrainConfig(images_dir="i", labels_csv="l", out_dir="o", loader="torch"),
                 Machine("cpu", cores=2, processes=1, workers=2, stored=True), 0.3, 2)
    assert "--workers" not in cpu and "--decode-once" not in cpu and "--decoder" not in cpu
    assert "--loader dali" in cpu and "loader_speed.py" in cpu
    # nothing to switch (DALI with the store, every core busy): said so, not an empty "try"
    busy = advice(CFG, Machine("cpu", cores=2, processes=1, workers=2, stored=True), 0.3, 2)
    assert "no setting to suggest on this machine (all 2 cores in use)" in busy and "try" not in busy
    # DALI's CPU decoder on a GPU without the store: the other decoder is worth a try
    cpu_decoder = advice(TrainConfig(images_dir="i", labels_csv="l", out_dir="o", decoder="cpu", decode_once=False),
                         Machine("cuda", cores=64, processes=8, workers=8, stored=False), 0.3, 2)
    assert "--decoder mixed" in cpu_decoder and "try" in cpu_decoder


def test_a_small_share_is_shown_in_tenths_of_a_percent():
    assert [shown(x) for x in (0.0, 0.0047, 0.0949, 0.1, 0.334)] == ["0.0%", "0.5%", "9.5%", "10%", "33%"]


def test_advice_once_per_command_never_for_its_first_epoch_nor_below_the_threshold():
    advisor = Advisor(CFG, Machine("cpu", cores=2, processes=1, workers=2, stored=True))
    above = DATA_WAIT_ADVICE_SHARE + 0.01
    assert advisor.after_epoch(5, 0.9) is None  # the command's first epoch starts the loaders: not steady
    assert advisor.after_epoch(6, DATA_WAIT_ADVICE_SHARE) is None
    assert "epoch 7" in advisor.after_epoch(7, above)
    assert advisor.after_epoch(8, 0.9) is None  # said once


def test_a_run_reports_its_data_wait_everywhere_and_a_starved_run_is_advised_once(small_synth, tmp_path,
                                                                               monkeypatch, caplog, capsys):
    """In this process, with a torch loader of one worker, on a stand-in clock that each batch's hand-over
    advances by 3 s and each training step by 1 s: every epoch waits 3/4 of its training time for data,
    and the run says so once, after its second epoch."""
    from dalipipe.run import run_dir
    from tests.test_preview_and_tensorboard import scalars

    clock = Clock()

    class StarvedWait(DataWait):
        def timed(self, loader):
            def slow():
                for batch in loader:
                    clock.advance(3.0)
                    yield batch
            return super().timed(slow())

    step = loop.Step.__call__
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=clock))  # the loop's clock
    monkeypatch.setattr(loop, "DataWait", lambda: StarvedWait(clock=clock))
    monkeypatch.setattr(loop.Step, "__call__", lambda *a, **k: (clock.advance(1.0), step(*a, **k))[1])
    out = tmp_path / "run"
    cfg = run_dir.new_config(str(small_synth / "images_train"), str(small_synth / "y_train.csv"), str(out),
                             {"epochs": 3, "image_size": 16, "batch_size": 32, "device": "cpu", "loader": "torch",
                              "workers": 1, "subset": 100, "tensorboard": True})
    with caplog.at_level(logging.INFO, logger="dalipipe"):
        loop.train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = rows[0]["data_wait_s"] / 3.0
    assert steps >= 1 and all(row["data_wait_s"] == 3.0 * steps and row["data_wait_share"] == 0.75 for row in rows), rows
    notes = [r.getMessage() for r in caplog.records if "the model waited for data" in r.getMessage()]
    assert len(notes) == 1 and "waited for data 75% of epoch 2's training time" in notes[0], notes
    assert "--loader dali" in notes[0]
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch ")]
    assert [ln.split("data wait ")[1] for ln in lines] == ["75%"] * 3
    points, _ = scalars(out / "tensorboard")
    assert [v for _, v in points["time/data_wait_share"]] == [0.75] * 3


def test_the_learning_curves_show_the_wait_and_draw_rows_of_older_runs_without_it(tmp_path, monkeypatch):
    from dalipipe.viz import plots

    drawn = {}
    real = plots._write_png
    monkeypatch.setattr(plots, "_write_png", lambda fig, path: drawn.update({path: fig.axes}) or real(fig, path))
    older = [{"epoch": 1, "train_loss": 2.0, "val_loss": 2.1, "val_balanced_accuracy": 0.3, "lr": 1e-3}]
    rows = older + [{**older[0], "epoch": 2, "data_wait_share": 0.4}]
    for name, history in (("older.png", older), ("now.png", rows)):
        plots.learning_curves_png(history, str(tmp_path / name))
    wait = drawn[str(tmp_path / "now.png")][3]
    assert "waiting for data" in wait.get_ylabel()
    assert [round(bar.get_height()) for bar in wait.patches] == [40]  # epoch 2's 40%; epoch 1 had none
    assert not drawn[str(tmp_path / "older.png")][3].patches and (tmp_path / "older.png").stat().st_size > 0
