"""What an exact resume needs beyond weights and optimizer: every rank's random generators and loader
position, the partial epoch's running sums, and when to save them.

Saved in every last.pt (at epoch ends and, with the checkpoint interval, mid-epoch). A resumed run
restores them instead of reseeding, so that it goes on with the same sample order, augmentation draws and
dropout masks as the run would have without the interruption.
"""

from __future__ import annotations

import os
import signal
import time

import torch

from dalipipe import distributed
from dalipipe.distributed import World
from dalipipe.errors import DataError

# Under torchrun the time-based decision to save is rank 0's, shared every this many steps (a small
# collective; every step would cost a little on every step).
DECIDE_EVERY_STEPS = 10


def loader_key(kind: str, decoder: str, device: torch.device) -> str:
    """What a loader state fits: DALI's belongs to one pipeline graph (CPU, or GPU with this decoding)."""
    if kind == "torch":
        return "torch"
    return f"dali/{device.type}" + (f"/{decoder}" if device.type == "cuda" else "")


def capture(loader, key: str, device: torch.device, world: World, loss_sum: torch.Tensor | None = None,
            seen: int = 0) -> list[dict]:
    """Every rank's generators, loader state and partial-epoch sums, gathered (in rank order) on every rank."""
    mine = {"rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "loader": loader.state(), "loader_key": key,
            "loss_sum": None if loss_sum is None else loss_sum.detach().cpu().clone(), "seen": seen}
    return distributed.gather(mine, world)


def restore(ranks: list[dict] | None, partial: dict | None, key: str, device: torch.device, world: World,
            run: str) -> dict | None:
    """This rank's saved state (generators restored here), or None where the run has none to give (a run
    from an older dalipipe, or another number of processes at an epoch's end: then the loaders reseed).
    A loader state saved for another loader, device or decoding is dropped at an epoch's end (the loader
    reseeds) and refused in the middle of one (its order cannot be continued)."""
    if not ranks:
        return None
    if len(ranks) != world.size:
        if partial:
            raise DataError(f"{run}: the run was saved in the middle of an epoch with {len(ranks)} process(es); "
                            f"resume it with {len(ranks)} (got {world.size})")
        return None
    mine = dict(ranks[world.rank])
    if mine.get("loader_key") != key:
        if partial:
            raise DataError(f"{run}: the run was saved in the middle of an epoch with the loader {mine.get('loader_key')}; "
                            f"resume it with the same --loader, --device and --decoder (got {key})")
        mine["loader"] = None
    torch.set_rng_state(mine["rng_cpu"])
    if device.type == "cuda" and mine["rng_cuda"] is not None:
        torch.cuda.set_rng_state(mine["rng_cuda"], device)
    return mine


class Interval:
    """When to save a mid-epoch checkpoint: every `every` steps (counted over the whole run), and/or
    every `minutes`; never at an epoch's last step, where the epoch's own checkpoint follows."""

    def __init__(self, every: int | None, minutes: float | None, world: World):
        self.every, self.seconds, self.world = every, None if minutes is None else 60 * minutes, world
        self.last = time.monotonic()

    def due(self, global_step: int, last_step_of_epoch: bool) -> bool:
        if last_step_of_epoch:
            return False
        if self.every is not None and global_step % self.every == 0:
            return True
        if self.seconds is None:
            return False
        if self.world.size > 1:  # rank 0's clock, shared at fixed steps so that every rank saves together
            if global_step % DECIDE_EVERY_STEPS:
                return False
            return bool(distributed.broadcast(time.monotonic() - self.last >= self.seconds, self.world))
        return time.monotonic() - self.last >= self.seconds

    def saved(self) -> None:
        self.last = time.monotonic()


class TimeLimitReached(Exception):
    """Raised after a mid-epoch checkpoint when --time-limit has passed: the run stops there, resumable."""


class Deadline:
    """--time-limit: rank 0's clock decides (under torchrun shared every DECIDE_EVERY_STEPS steps), so that
    every rank stops at the same step."""

    def __init__(self, minutes: float | None, start: float, world: World):
        self.at = None if minutes is None else start + 60 * minutes
        self.world = world

    def passed(self, global_step: int | None = None) -> bool:
        if self.at is None:
            return False
        if self.world.size > 1:
            if global_step is not None and global_step % DECIDE_EVERY_STEPS:
                return False
            return bool(distributed.broadcast(time.perf_counter() > self.at, self.world))
        return time.perf_counter() > self.at


def kill_for_test(global_step: int, before) -> None:
    """Testing aid: DALIPIPE_KILL_AT_STEP=N ends this process with SIGKILL right after training step N,
    as a pre-emption would, so that exact resume can be tested at a known point. before() runs first: the
    checkpoints handed over until then are written, as they would be by a pre-emption that comes later than
    their writes (a kill in the middle of a write has its own aid: run_recorder.KILL_IN_WRITE)."""
    at = os.environ.get("DALIPIPE_KILL_AT_STEP")
    if at and int(at) == global_step:
        before()
        os.kill(os.getpid(), signal.SIGKILL)
