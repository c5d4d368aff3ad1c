"""Memory sizes and readings: human units ("12G", "512M"), this process's resident memory, the
machine's available memory (Linux /proc first, portable fallbacks after); and the process-wide
allocator setting that lets a RAM budget hold (`return_freed_memory`, called by loading)."""

from __future__ import annotations

import os
import re
import resource

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int | float | None) -> int | None:
    """'12G', '512M', '1.5GiB', '800MB', 1073741824 -> bytes (binary units); None passes through."""
    if text is None or isinstance(text, int | float):
        return None if text is None else int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read the size {text!r}: use a number with K, M, G or T (e.g. 12G, 512M)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process image (VmHWM). getrusage's ru_maxrss is not used on
    Linux: a child started by fork + exec inherits the parent's figure."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def available_bytes() -> int:
    """Memory the OS can give without swapping (MemAvailable), or total physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def return_freed_memory() -> None:
    """Make glibc serve every block of 1 MiB or more from mmap, returned to the OS when freed.

    Its default threshold grows after big blocks are freed, after which evicted experts' buffers are
    recycled inside the heap (and per-thread arenas) instead of given back, and the process's resident
    memory creeps past the budget. Not glibc (or not Linux): nothing to do.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass
