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


def cuda_index(device: torch.device) -> int | None:
    """The GPU number of a CUDA device (a bare torch.device("cuda") means the current one); None on the CPU.
    DALI needs the number: device_id=None would silently build a CPU pipeline."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def has_bf16(device: torch.device) -> bool:
    """Native bf16 units only: by default torch also says yes where bf16 is emulated (V100, T4), which is
    slow there and would keep the fp16 + GradScaler path from ever running."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 mixed precision on GPUs that support it, fp16 on older ones, nothing on the CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if has_bf16(device) else torch.float16)


def needs_grad_scaler(device: torch.device) -> bool:
    return device.type == "cuda" and not has_bf16(device)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on the current stream (the one training runs on). Not
    torch.cuda.synchronize, which also waits for every other stream, DALI's prefetching of later
    batches included, and so would count that prefetch as our time and stop it from overlapping."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def configure(device: torch.device) -> None:
    """Process-wide settings for fast training on a GPU: cuDNN picks the fastest convolution algorithms
    for our fixed input size (measured once, on the first batches), TF32 matmuls. Nothing on the CPU."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
