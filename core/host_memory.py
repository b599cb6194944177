"""Keep the host memory a CPU training or sampling process frees, so that its next step reuses pages already mapped.

glibc's malloc maps a block over its mmap threshold afresh and unmaps it at its free, and trims the heap's top when
its trim threshold lies free there; both move with the sizes freed. By the order of a process's first allocations it
may settle where a step's megabyte-sized tensors are mapped again every step and the kernel zeroes each 4 KiB page at
its first touch: sampling DiT-T/2 in fresh processes ran at 60 images/s against 104 with the settings below, and
its compiled training steps at 51-58% of the fp32 peak against 61-65% (benchmarks/README.md, "Host memory" and
"Training throughput"; eager trials, which train before they sample, settled well in the runs measured).
PyTorch's CPU tuning guide swaps in another allocator (jemalloc, tcmalloc) for this; glibc's mallopt does it without
a preload. Memory a step frees stays with the process, which takes it again the next step.
"""
import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
# The highest glibc's own moving threshold reaches (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit; older glibc refuses more):
# larger blocks still come from, and go back to, the OS.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 2 ** 31 - 1  # mallopt takes a C int: trimmed past 2 GiB free at the top
# Thresholds a user (or a cluster's launcher) gave glibc's malloc at the process's start: theirs stand.
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
USER_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold", "glibc.malloc.top_pad",
                 "glibc.malloc.mmap_max")

held = False  # whether this process's thresholds are set


def users_settings(environ):
    """The variables of environ that set glibc's malloc thresholds (GLIBC_TUNABLES where it names one)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    named = [k for k in USER_SETTINGS if k in environ]
    return named + (["GLIBC_TUNABLES"] if any(t in tunables for t in USER_TUNABLES) else [])


def _glibc():
    """This process's C library through ctypes where it is glibc, else None."""
    try:
        if os.confstr("CS_GNU_LIBC_VERSION"):  # glibc alone answers
            return ctypes.CDLL(None)
    except (AttributeError, ValueError, OSError):  # Windows has no confstr; macOS and musl no such name
        pass
    return None


def hold_freed_memory():
    """Set glibc's mmap and trim thresholds once per process; whether they are set (not glibc, or a user's: no)."""
    global held
    if held or users_settings(os.environ):
        return held
    libc = _glibc()
    if libc is None:
        return False
    # Setting either also stops glibc moving them with the sizes freed.
    held = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return held
