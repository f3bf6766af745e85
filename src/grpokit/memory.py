"""Peak memory of a phase of the step (generation, reward, logprobs, backward, optimizer).

On CUDA: the peak of `torch.cuda.memory_allocated` within the phase (`reset_peak_memory_stats`
at its start). On Linux CPU: the peak resident set size within the phase (the kernel's high-water
mark, `ru_maxrss`, reset at the phase's start by writing 5 to /proc/self/clear_refs). Elsewhere
the process-lifetime peak RSS (no per-phase reset is possible).

Resetting the kernel's high-water mark also resets what `getrusage(...).ru_maxrss` reports, so
`lifetime_peak_gb()` keeps the running maximum over every phase measured (and everything before
the first reset) for the "memory/peak_*" metrics.
"""

from __future__ import annotations

import resource

import torch

_lifetime = {"rss": 0.0, "cuda": 0.0}
_CLEAR_REFS = "/proc/self/clear_refs"
_can_reset_rss: bool | None = None


def _rss_hwm_gb() -> float:
    # ru_maxrss follows the kernel's high-water mark, reset by clear_refs like VmHWM (Linux); one syscall
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _reset_rss_hwm() -> None:
    global _can_reset_rss
    if _can_reset_rss is False:
        return
    _lifetime["rss"] = max(_lifetime["rss"], _rss_hwm_gb())
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        _can_reset_rss = True
    except OSError:
        _can_reset_rss = False


def reset_peak(device: torch.device | None = None) -> None:
    """Start measuring a phase's peak."""
    if device is not None and device.type == "cuda":
        _lifetime["cuda"] = max(_lifetime["cuda"], torch.cuda.max_memory_allocated(device) / 2**30)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _reset_rss_hwm()


def peak_gb(device: torch.device | None = None) -> float:
    """Peak (GiB) since the last `reset_peak`: CUDA allocated memory, else resident memory."""
    if device is not None and device.type == "cuda":
        value = torch.cuda.max_memory_allocated(device) / 2**30
        _lifetime["cuda"] = max(_lifetime["cuda"], value)
        return value
    value = _rss_hwm_gb()
    _lifetime["rss"] = max(_lifetime["rss"], value)
    return value


def lifetime_peak_gb(kind: str = "rss", device: torch.device | None = None) -> float:
    """Process-lifetime peak (GiB) of "rss" or "cuda", across the per-phase resets."""
    if kind == "cuda":
        current = torch.cuda.max_memory_allocated(device) / 2**30 if torch.cuda.is_available() else 0.0
        return max(_lifetime["cuda"], current)
    return max(_lifetime["rss"], _rss_hwm_gb())
