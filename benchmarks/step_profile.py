"""Named ranges of a training step, seen both in a torch.profiler trace and in a table of milliseconds.

Ranges: data_wait (the loader's next batch, including its host-to-device copy, which the loaders mark as
an inner h2d_copy range), forward, backward, optimizer_step. When `exact`, the current stream (the one
the step runs on, not DALI's) is synchronized at the end of each range, so that GPU work falls in the range
that launched it: slower than a real step, but each range's share is then what it costs.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

RANGES = ("data_wait", "forward", "backward", "optimizer_step")


class StepRanges:
    def __init__(self, device, exact: bool):
        from dalipipe import device as dev

        self.device, self.exact, self.sync = device, exact, dev.synchronize
        self.totals: dict[str, float] = defaultdict(float)
        self.steps = 0

    @contextlib.contextmanager
    def __call__(self, name: str):
        import torch

        t = time.perf_counter()
        with torch.profiler.record_function(name):
            yield
            if self.exact:
                self.sync(self.device)
        self.totals[name] += time.perf_counter() - t

    def table(self, h2d_ms: float | None = None) -> tuple[dict, str]:
        """Per range: total and mean milliseconds, share of the step. h2d_ms: the profiler's CPU time of the
        loaders' h2d_copy ranges, shown inside data_wait (it is part of it)."""
        step = sum(self.totals.values())
        totals = {name: 1000 * self.totals[name] for name in RANGES if name in self.totals}
        if h2d_ms is not None:
            totals = {**{k: v for k, v in totals.items() if k == "data_wait"}, "  h2d_copy": h2d_ms,
                      **{k: v for k, v in totals.items() if k != "data_wait"}}
        rows = {name.strip(): {"total_ms": ms, "mean_ms": ms / max(self.steps, 1),
                               "share": ms / (1000 * step) if step else 0.0} for name, ms in totals.items()}
        lines = [f"{'range':16} {'total ms':>10} {'ms/step':>9} {'share':>7}", "-" * 45]
        lines += [f"{n:16} {ms:>10.1f} {ms / max(self.steps, 1):>9.2f} {100 * ms / (1000 * step) if step else 0:>6.1f}%"
                  for n, ms in totals.items()]
        lines.append(f"{'step':16} {1000 * step:>10.1f} {1000 * step / max(self.steps, 1):>9.2f} {100.0:>6.1f}%  "
                     f"({self.steps} steps)")
        return rows, "\n".join(lines)


def profiler(device):
    """torch.profiler over CPU and, on a GPU, CUDA activity."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=activities, record_shapes=False)
