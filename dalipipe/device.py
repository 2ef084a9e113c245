"""The device is one string; everything device-specific is derived from it here."""

from __future__ import annotations

import contextlib

import torch

from dalipipe.config import HALF_PRECISIONS
from dalipipe.errors import DataError


def resolve(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> the GPU when one is present, else the CPU; 'gpu' without a GPU is a clear error. name: one
    of --device's choices, which the options table has checked."""
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


def dali_package() -> str:
    """The DALI wheel for this machine: the one built for the CUDA major version of torch's build
    (nvidia-dali-cuda130 for CUDA 13); nvidia-dali-cuda120 for CUDA 12 and for a CPU-only torch, where
    DALI runs its CPU operators."""
    major = int((torch.version.cuda or "12").split(".")[0])
    return f"nvidia-dali-cuda{max(major, 12)}0"


def has_bf16(device: torch.device) -> bool:
    """Native bf16 units only: by default torch also says yes where bf16 is emulated (V100, T4), which is
    slow there and would keep the fp16 + GradScaler path from ever running."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def amp_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of --precision on this device; None: plain fp32.
    auto: bf16 on GPUs with native bf16, fp16 (with a gradient scaler) on older ones, fp32 on the CPU."""
    if device.type != "cuda":
        if precision in HALF_PRECISIONS:
            raise DataError(f"--precision {precision} needs a CUDA GPU; on the CPU training runs in fp32 "
                            "(--precision auto or fp32)")
        return None
    if precision == "auto":
        return torch.bfloat16 if has_bf16(device) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """Mixed precision as amp_dtype says; nothing for fp32 (and on the CPU)."""
    dtype = amp_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def needs_grad_scaler(device: torch.device, precision: str = "auto") -> bool:
    """fp16's narrow range underflows small gradients: only fp16 needs the scaler."""
    return amp_dtype(device, precision) == torch.float16


def place_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model on the device; on a GPU in channels_last, the layout its tensor cores read convolutions in
    without a transpose. Batches go to it through batch_layout."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def batch_layout(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch in the layout of place_model's model: channels_last on a GPU (a no-op for DALI's batches,
    which arrive so), unchanged on the CPU."""
    return images.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else images


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on the current stream (the one training runs on). Not
    torch.cuda.synchronize, which also waits for every other stream, DALI's prefetching of later
    batches included, and so would count that prefetch as our time and stop it from overlapping."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def reset_peak_memory(device: torch.device) -> None:
    """Start counting memory_in_use's peak afresh (each epoch); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory_in_use(device: torch.device) -> dict[str, float]:
    """On a GPU, in MB: the peak of torch's allocator since reset_peak_memory (the model, its gradients,
    optimizer state, activations), and the device memory in use now by the driver's count (torch's cache,
    DALI's own memory pools, which DALI does not report apart, the CUDA contexts, other processes on the
    GPU). Host-side counters: no synchronization. Nothing on the CPU."""
    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    return {"torch_peak_allocated_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
            "device_memory_used_mb": round((total - free) / 2**20, 1)}


def configure(device: torch.device, threads: int) -> None:
    """Process-wide settings: torch's threads for the model's own CPU work (see loader_rules.default_threads);
    on a GPU, cuDNN picks the fastest convolution algorithms for our fixed input size (measured once, on the
    first batches), TF32 matmuls."""
    torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
