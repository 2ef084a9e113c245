"""The device is one string; everything device-specific is derived from it here."""

from __future__ import annotations

import contextlib

import torch

from dalipipe.errors import DataError


def resolve(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> the GPU when one is present, else the CPU; 'gpu' without a GPU is a clear error."""
    if name not in ("auto", "gpu", "cpu"):
        raise DataError(f"--device must be auto, gpu or cpu, got '{name}'")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DataError("--device gpu: no CUDA GPU is visible to torch (use --device cpu or auto)")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 mixed precision on GPUs that support it, fp16 on older ones, nothing on the CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def needs_grad_scaler(device: torch.device) -> bool:
    return device.type == "cuda" and not torch.cuda.is_bf16_supported()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
