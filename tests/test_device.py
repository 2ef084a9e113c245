"""Device-dependent choices, checked on the CPU by standing in for what torch.cuda would answer."""

from __future__ import annotations

import pytest
import torch

from dalipipe import device as dev
from dalipipe.run.train_setup import restore_scaler


def test_bf16_needs_native_units(monkeypatch):
    # torch says yes for emulated bf16 (V100, T4) unless asked for native units only.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    gpu = torch.device("cuda", 0)
    assert not dev.has_bf16(gpu)
    assert dev.needs_grad_scaler(gpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert dev.has_bf16(gpu) and not dev.needs_grad_scaler(gpu)
    assert not dev.has_bf16(torch.device("cpu")) and not dev.needs_grad_scaler(torch.device("cpu"))


def test_bare_cuda_device_resolves_to_the_current_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert dev.cuda_index(torch.device("cuda")) == 3
    assert dev.cuda_index(torch.device("cuda", 1)) == 1
    assert dev.cuda_index(torch.device("cpu")) is None


@pytest.mark.parametrize("saved_enabled,now_enabled", [(False, True), (True, False), (True, True), (False, False)])
def test_resume_across_precisions_restores_the_scaler_where_it_means_something(saved_enabled, now_enabled):
    saved = torch.amp.GradScaler("cpu", enabled=saved_enabled, init_scale=1024.0)
    state = saved.state_dict()
    assert bool(state) == saved_enabled  # a disabled scaler saves an empty state, which load_state_dict refuses
    scaler = torch.amp.GradScaler("cpu", enabled=now_enabled)
    restore_scaler(scaler, state)
    if saved_enabled and now_enabled:
        assert scaler.get_scale() == 1024.0
    elif now_enabled:
        assert scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()
