"""A consistent copy of a training state in host memory, taken without stopping the GPU.

The state a checkpoint holds (weights, optimizer moments, generators, loader positions) must be the state
at one step, although training goes on while the checkpoint is written. Serializing the live tensors in a
background thread would mix steps (Lightning's AsyncCheckpointIO met this and now clones first), so every
tensor is copied here, in the training thread, into host buffers that are kept and reused from one save to
the next (like torch.distributed.checkpoint's cached staging): after the first save nothing is allocated.

On a GPU the buffers are pinned and the copies are queued with non_blocking on the training stream: the
host does not wait for them and goes on queueing the next steps, and the stream runs them in order, before
any later kernel changes a weight. The writer waits on an event recorded after the copies.
"""

from __future__ import annotations

from typing import Any

import torch


class HostStaging:
    """Host buffers for one kind of state, reused from one stage() to the next. A buffer is overwritten by
    the next stage(): the caller must be done with the previous snapshot (the run recorder writes one
    checkpoint at a time and waits for it before staging the next)."""

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.gpu: torch.device | None = None  # the device of the GPU tensors staged, if any

    def stage(self, state: Any) -> "Snapshot":
        self.gpu = None
        tree = self._copy(state, ())
        event = None
        if self.gpu is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.gpu))
        return Snapshot(tree, event)

    def _buffer(self, path: tuple, t: torch.Tensor) -> torch.Tensor:
        buf = self.buffers.get(path)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.is_pinned() != t.is_cuda:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
            self.buffers[path] = buf
        return buf

    def _copy(self, x: Any, path: tuple) -> Any:
        # Containers are rebuilt (the training loop appends to lists such as the history it hands over);
        # strings, numbers and None are immutable and shared.
        if isinstance(x, torch.Tensor):
            buf = self._buffer(path, x)
            buf.copy_(x.detach(), non_blocking=x.is_cuda)
            if x.is_cuda:
                self.gpu = x.device
            return buf
        if isinstance(x, dict):
            return {k: self._copy(v, path + (k,)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(self._copy(v, path + (i,)) for i, v in enumerate(x))
        return x


class Snapshot:
    def __init__(self, tree: Any, event: "torch.cuda.Event | None"):
        self._tree, self._event = tree, event

    def state(self) -> Any:
        """The state as it was when staged (waits for the queued copies, in the writer's thread)."""
        if self._event is not None:
            self._event.synchronize()
        return self._tree
