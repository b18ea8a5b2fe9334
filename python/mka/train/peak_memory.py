"""Peak memory per variant: the accelerator's allocator peak, or the process's peak RSS on CPU
(Linux lets a process reset its high-water mark through /proc/self/clear_refs)."""

from __future__ import annotations

import resource
import sys

import torch


def reset_peak(device: torch.device) -> bool:
    """Start a fresh peak; False when the platform cannot (CPU peak then covers the whole process)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "peak RSS (VmHWM)"
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "peak RSS (ru_maxrss, whole process)"
