"""Scoring an evaluation loader: every sample once, whatever the shards repeat."""

from __future__ import annotations

import numpy as np
import torch

from dalipipe.infer.inference import scores_by_position

CPU = torch.device("cpu")


class ValueLogits(torch.nn.Module):
    """Logits that carry the input's value: (x, -x)."""

    def forward(self, images):
        v = images.mean((1, 2, 3))[:, None]
        return torch.cat([v, -v], 1)


def test_padded_shards_are_scored_once_per_sample_in_position_order():
    # As a DistributedSampler pads its last shard: positions 0 and 3 handed out twice.
    batches = [(torch.full((2, 3, 4, 4), float(p)).index_fill(0, torch.tensor([1]), float(q)), torch.tensor([p, q]))
               for p, q in ((3, 1), (0, 2), (3, 0))]
    pos, logits = scores_by_position(ValueLogits(), batches, device=CPU)
    assert pos.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(logits[:, 0], [0.0, 1.0, 2.0, 3.0])
