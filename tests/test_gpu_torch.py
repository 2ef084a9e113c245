"""GPU tests of what needs torch and a GPU but no DALI (the GPU check runs them before DALI is there)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
GPU = torch.device("cuda", 0)


def test_gpu_staged_snapshot_holds_the_state_of_the_hand_off_while_kernels_change_it():
    """The host copy is queued on the training stream without a sync: later kernels that change the
    tensors in place (an optimizer step) must not reach the copy, and the buffers are pinned and reused."""
    from dalipipe.checkpoint import HostStaging

    weights = torch.randn(4096, 1024, device=GPU)
    step = torch.zeros((), device=GPU)
    expected = weights.cpu()
    staging = HostStaging()
    snap = staging.stage({"w": weights, "step": step, "history": [1]})
    for _ in range(20):  # queued right behind the copy, on the same stream
        weights.mul_(1.5).add_(1.0)
        step += 1
    staging.wait()
    saved = snap
    assert torch.equal(saved["w"], expected) and saved["step"].item() == 0 and saved["w"].is_pinned()
    first = saved["w"].data_ptr()
    again = staging.stage({"w": weights, "step": step, "history": [1, 2]})
    staging.wait()
    assert again["w"].data_ptr() == first and torch.equal(again["w"], weights.cpu()) and again["step"].item() == 20
