"""What a benchmark row costs besides time: the loader's own CPU, and device memory as the driver sees it.

CPU: on Linux each thread's CPU time is read from /proc/self/task/*/stat and classed by the thread's name:
DALI's threads ("[DALI]..." executor and pool threads, "PrefetchWorker" reader threads) are the loader's;
the main thread is the training loop's (on a GPU mostly spinning in CUDA syncs); the rest are torch's own
(intra-op compute threads). The processes below this one are the loader's too: torch's DataLoader workers
are persistent children of a forkserver (itself a child), so they neither exit during a row nor are this
process's children; they are read live from /proc, with what they reaped. Elsewhere only the process total
(and the children it reaped) is known.

Device memory: torch's allocator counters do not see DALI's own pools; cudaMemGetInfo (the driver's view)
sees everything this process (and any other) holds on the GPU.
"""

from __future__ import annotations

import os
import resource

LOADER_THREAD_PREFIXES = ("[DALI]", "PrefetchWorker")
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _thread_cpu() -> dict[str, float] | None:
    pid = os.getpid()
    out = {"main": 0.0, "loader": 0.0, "other": 0.0}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        seconds = (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14 and 15 of stat)
        kind = "main" if int(tid) == pid else "loader" if name.startswith(LOADER_THREAD_PREFIXES) else "other"
        out[kind] += seconds
    return out


def _descendants() -> dict[int, list[str]]:
    """The live processes below this one (Linux), each with the fields of its /proc stat after the name."""
    stats: dict[int, list[str]] = {}
    kids: dict[int, list[int]] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return {}
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        stats[int(entry)] = fields
        kids.setdefault(int(fields[1]), []).append(int(entry))  # field 4: the parent
    out, todo = {}, [os.getpid()]
    while todo:
        for pid in kids.get(todo.pop(), []):
            out[pid] = stats[pid]
            todo.append(pid)
    return out


def own_peak_rss_kb() -> int:
    """This process's peak resident memory in kB (VmHWM), since it started its program. Not getrusage's
    ru_maxrss: Linux carries that over an exec, so a row process started by a benchmark holding 400 MB read
    400 MB whatever it did itself."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def peak_host_memory_mb(live_kb: int = 0) -> float:
    """A row's peak host memory: the largest of its own process's (own_peak_rss_kb), its ended children's
    and live_kb (its live workers', descendants_peak_rss_kb, read before they end), in MB."""
    return max(own_peak_rss_kb(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, live_kb) / 1024


def descendants_peak_rss_kb() -> int:
    """The largest peak resident memory of the live processes below this one (torch's workers), in kB."""
    peak = 0
    for pid in _descendants():
        try:
            with open(f"/proc/{pid}/status") as f:
                peak = max([peak] + [int(line.split()[1]) for line in f if line.startswith("VmHWM:")])
        except (OSError, ValueError, IndexError):
            continue
    return peak


def cpu_snapshot() -> dict[str, float]:
    """CPU seconds so far: total (process, exited children and live descendants), and where threads can be
    told apart, main, loader (DALI threads, and the processes below: torch's workers) and other."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    # utime, stime, cutime, cstime (fields 14-17 of stat): a process reaped between two snapshots moves
    # from here into its parent's cutime and cstime, or into RUSAGE_CHILDREN, and is counted once either way.
    live = sum(sum(int(x) for x in fields[11:15]) for fields in _descendants().values()) / _TICK
    children = c.ru_utime + c.ru_stime + live
    snap = {"total": s.ru_utime + s.ru_stime + children}
    threads = _thread_cpu()
    if threads is not None:
        snap.update(main=threads["main"], loader=threads["loader"] + children, other=threads["other"])
    return snap


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after if k in before}


class DeviceMemory:
    """Peak device memory in use during a row, in MB, by the driver's count and by torch's allocator."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.device = device
        self.min_free = None
        if self.cuda:
            torch.cuda.init()
            torch.cuda.reset_peak_memory_stats(device)
            self.sample()
            self.start_used = self.total - self.min_free  # the CUDA context, and other processes on the GPU

    def sample(self) -> None:
        if self.cuda:
            import torch

            free, self.total = torch.cuda.mem_get_info(self.device)
            self.min_free = free if self.min_free is None else min(self.min_free, free)

    def result(self) -> dict[str, float]:
        if not self.cuda:
            return {}
        import torch

        return {"peak_device_memory_mb": (self.total - self.min_free) / 2**20,
                "device_memory_at_start_mb": self.start_used / 2**20,
                "torch_peak_reserved_mb": torch.cuda.max_memory_reserved(self.device) / 2**20}
