"""What an exact resume needs beyond weights and optimizer: every rank's random generators and loader
position, the partial epoch's running sums, and when to save them (CheckpointPolicy).

Saved in every last.pt (at epoch ends and, with the checkpoint interval, mid-epoch). A resumed run
restores them instead of reseeding, so that it goes on with the same sample order, augmentation draws and
dropout masks as the run would have without the interruption.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import torch

from dalipipe import distributed
from dalipipe.distributed import World
from dalipipe.errors import DataError
from dalipipe.run_state import RankState

# Under torchrun the time-based decision to save is rank 0's, shared every this many steps (a small
# collective; every step would cost a little on every step).
DECIDE_EVERY_STEPS = 10


def loader_key(kind: str, decoder: str, device: torch.device) -> str:
    """What a loader state fits: DALI's belongs to one pipeline graph (CPU, or GPU with this decoding)."""
    if kind == "torch":
        return "torch"
    return f"dali/{device.type}" + (f"/{decoder}" if device.type == "cuda" else "")


def capture(loader, *, key: str, device: torch.device, world: World, loss_sum: torch.Tensor | None = None,
            seen: int = 0) -> list[RankState]:
    """Every rank's generators, loader state and partial-epoch sums, gathered (in rank order) on every rank."""
    mine = RankState(rng_cpu=torch.get_rng_state(),
                     rng_cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                     loader=loader.state(), loader_key=key,
                     loss_sum=None if loss_sum is None else loss_sum.detach().cpu().clone(), seen=seen)
    return distributed.gather(mine, world)


def restore(ranks: list[RankState] | None, *, partial_steps: int | None, key: str, device: torch.device, world: World,
            run: str) -> RankState | None:
    """This rank's saved state (generators restored here), or None where the run has none to give (a run
    from an older dalipipe, or another number of processes at an epoch's end: then the loaders reseed).
    A loader state saved for another loader, device or decoding is dropped at an epoch's end (the loader
    reseeds) and refused in the middle of one (its order cannot be continued)."""
    if not ranks:
        return None
    if len(ranks) != world.size:
        if partial_steps:
            raise DataError(f"{run}: the run was saved in the middle of an epoch with {len(ranks)} process(es); "
                            f"resume it with {len(ranks)} (got {world.size})")
        return None
    mine = ranks[world.rank]
    if mine.loader_key != key:
        if partial_steps:
            raise DataError(f"{run}: the run was saved in the middle of an epoch with the loader {mine.loader_key}; "
                            f"resume it with the same --loader, --device and --decoder (got {key})")
        mine = dataclasses.replace(mine, loader=None)
    torch.set_rng_state(mine.rng_cpu)
    if device.type == "cuda" and mine.rng_cuda is not None:
        torch.cuda.set_rng_state(mine.rng_cuda, device)
    return mine


class TimeLimitReached(Exception):
    """Raised after a mid-epoch checkpoint when --time-limit has passed: the run stops there, resumable."""


class CheckpointPolicy:
    """When to save in the middle of an epoch (--checkpoint-every steps, counted over the whole run, and/or
    --checkpoint-minutes; never at an epoch's last step, where the epoch's own checkpoint follows) and when
    --time-limit stops the run. Time is rank 0's clock: under torchrun its reading is shared every
    DECIDE_EVERY_STEPS steps, so that every rank saves, and stops, at the same step."""

    def __init__(self, every: int | None, minutes: float | None, time_limit_minutes: float | None, start: float,
                 world: World):
        self.every, self.world = every, world
        self.seconds = None if minutes is None else 60 * minutes
        self.deadline = None if time_limit_minutes is None else start + 60 * time_limit_minutes
        self.last_save = time.perf_counter()

    def _clock(self, global_step: int | None) -> tuple[bool, bool]:
        """(the time limit has passed, the checkpoint interval's time has passed), by rank 0's clock."""
        if self.world.size > 1 and global_step is not None and global_step % DECIDE_EVERY_STEPS:
            return False, False
        now = time.perf_counter()
        reading = (self.deadline is not None and now > self.deadline,
                   self.seconds is not None and now - self.last_save >= self.seconds)
        if self.world.size > 1:
            reading = tuple(distributed.broadcast(reading, self.world))
        return reading

    def at_step(self, global_step: int, last_step_of_epoch: bool) -> tuple[bool, bool]:
        """(save now, then stop the run)."""
        if last_step_of_epoch:
            return False, False
        every = self.every is not None and global_step % self.every == 0
        if self.deadline is None and self.seconds is None:
            return every, False
        time_up, interval_passed = self._clock(global_step)
        return time_up or every or interval_passed, time_up

    def time_up_at_epoch_end(self) -> bool:
        return self.deadline is not None and self._clock(None)[0]

    def saved(self) -> None:
        self.last_save = time.perf_counter()


def kill_for_test(global_step: int, before) -> None:
    """Testing aid: DALIPIPE_KILL_AT_STEP=N ends this process with SIGKILL right after training step N,
    as a pre-emption would, so that exact resume can be tested at a known point. before() runs first: the
    checkpoints handed over until then are written, as they would be by a pre-emption that comes later than
    their writes (a kill in the middle of a write has its own aid: run_recorder.KILL_IN_WRITE)."""
    at = os.environ.get("DALIPIPE_KILL_AT_STEP")
    if at and int(at) == global_step:
        before()
        os.kill(os.getpid(), signal.SIGKILL)
