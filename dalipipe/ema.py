"""train --ema: an exponential moving average of the weights, as timm's ModelEmaV3 keeps it.

A copy of the model in eval mode whose every floating-point state entry (weights and BatchNorm's running
statistics) moves a step towards the trained model's after each optimizer step; integer entries
(num_batches_tracked) are copied. One multi-tensor lerp per step over all tensors, on the device, with
no copy to the host: the decay of each step is computed on the host from the step count alone.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

# The decay warms up as timm's ModelEmaV3 does with use_warmup: 1 - (1 + t / GAMMA) ** -POWER after t
# updates (0 for the first: the average starts as the model), capped at the decay asked for. Without it a
# run from scratch averages in its random start for the first ~1/(1 - decay) steps (1,000 at 0.999, more
# than most short runs take).
WARMUP_GAMMA = 1.0
WARMUP_POWER = 2 / 3


def decay_at(decay: float, updates: int) -> float:
    """The decay used for the update that follows `updates` earlier ones."""
    return min(decay, 1.0 - (1.0 + updates / WARMUP_GAMMA) ** -WARMUP_POWER)


class WeightAverage:
    """The averaged model (`module`, eval mode, no gradients), updated from `model` by update()."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        # state_dict() values share storage with the modules' tensors: pairs made once, updated in place.
        mine, theirs = self.module.state_dict(), model.state_dict()
        floats = {k for k, v in mine.items() if v.is_floating_point()}
        self._floats = ([mine[k] for k in mine if k in floats], [theirs[k] for k in mine if k in floats])
        self._others = [(mine[k], theirs[k]) for k in mine if k not in floats]

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - decay_at(self.decay, self.updates)
        torch._foreach_lerp_(self._floats[0], self._floats[1], weight)  # ema += weight * (model - ema)
        for mine, theirs in self._others:
            mine.copy_(theirs)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "model": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self.module.load_state_dict(state["model"])  # in place: the pairs above stay valid
