"""Is the model starved? The time the training process waits for the loader's next batch, measured in every
epoch, and one line of advice, naming the settings to try, when that is a large share of the epoch.

What is measured: the host's time inside the loader's next() (and its iter(), where a torch loader starts
its workers), nothing else, and without any synchronization. On a GPU a step's kernels are queued
asynchronously: when the GPU is the slower side, the host blocks in the launches of a later step (the
launch queue is full) and finds the next batch ready when it asks for it, so next() returns at once and the
wait stays near 0. The host waits in next() when the loader is the slower side, and then the GPU runs out of
queued work after finishing what the host queued before: the wait is the time the GPU may have stood idle
for want of data (at most that: the GPU can still be busy with the steps the host queued ahead).
Adding a synchronization to measure "exactly" would itself stall the queue on every step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from dalipipe.config import TrainConfig
from dalipipe.constants import DATA_WAIT_ADVICE_SHARE


class DataWait:
    """Seconds spent waiting for batches, over the batches of one epoch. clock: the host's clock in
    seconds (a test gives one that it advances by known amounts)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.seconds, self.clock = 0.0, clock

    def timed(self, loader: Iterable) -> Iterator:
        """The loader's batches, each next() (and the first, the iterator's start) timed."""
        t = self.clock()
        it = iter(loader)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                self.seconds += self.clock() - t
                return
            self.seconds += self.clock() - t
            yield batch
            t = self.clock()  # the step (and a checkpoint) ran in between: not waiting for data


@dataclass(frozen=True)
class Machine:
    """What the advice names: the cores, and how the run uses them."""
    device_type: str
    cores: int
    processes: int  # training processes on this machine
    workers: int  # loader threads or worker processes per training process
    stored: bool  # the loader reads the decoded store (else it decodes the PNGs in every epoch)


def share_of(wait_s: float, train_s: float) -> float:
    """The data wait's share of a pass's training time, as metrics.jsonl keeps it (4 decimals)."""
    return round(wait_s / max(train_s, 1e-9), 4)


def shown(share: float) -> str:
    """A share as the epoch line and the progress bar show it: tenths of a percent below 10%, where the
    usual figures lie (0.4%, not 0%)."""
    return f"{share:.1%}" if share < 0.1 else f"{share:.0%}"


def advice(cfg: TrainConfig, machine: Machine, share: float, epoch: int) -> str:
    """One line: what share of epoch `epoch` (from 1) the model waited for data, and the settings to try,
    the one most likely to help on this machine and loader first."""
    tips = []
    gpu_dali = machine.device_type == "cuda" and cfg.loader == "dali"
    if not machine.stored:  # decoding the PNGs again in every epoch: the loaders' largest cost at 512 px
        tips.append("--decode-once (each PNG decoded once, into the decoded store)" if not cfg.decode_once else
                    "--store DIR on a disk with room (the decoded store did not fit where it was to go)")
    idle = machine.cores - machine.processes * machine.workers
    if idle > 0:
        tips.append(f"more --workers (the run uses {machine.workers} per process for {machine.processes} "
                    f"process(es); this machine has {machine.cores} cores)")
    if gpu_dali and not machine.stored:  # (the store's reader decodes nothing)
        tips.append("--decoder cpu" if cfg.decoder == "mixed" else "--decoder mixed")
    if cfg.loader == "torch":
        tips.append("--loader dali")
    measure = "python benchmarks/loader_speed.py --train --sweep"
    said = (f"note: the model waited for data {shown(share)} of epoch {epoch}'s training time (more than "
            f"{DATA_WAIT_ADVICE_SHARE:.0%}); ")
    if not tips:  # every core busy, nothing else to switch: say so rather than suggest nothing
        return (said + f"no setting to suggest on this machine (all {machine.cores} cores in use); measure the "
                f"loaders with: {measure}")
    return said + "to feed it faster, try " + "; ".join(tips) + f"; measure them on this machine with: {measure}"


class Advisor:
    """Says advice() once per command, at the first epoch past the threshold that is not the command's
    first (which also starts the loader's workers, tunes cuDNN, compiles: not a steady state)."""

    def __init__(self, cfg: TrainConfig, machine: Machine):
        self.cfg, self.machine = cfg, machine
        self.epochs_seen = 0
        self.said = False

    def after_epoch(self, epoch: int, share: float) -> str | None:
        self.epochs_seen += 1
        if self.said or self.epochs_seen == 1 or share <= DATA_WAIT_ADVICE_SHARE:
            return None
        self.said = True
        return advice(self.cfg, self.machine, share, epoch)
