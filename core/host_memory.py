"""Keep the host memory a CPU training or sampling process frees, so that its next step reuses pages already mapped.

glibc's malloc hands a freed block above its mmap threshold back to the OS at once, and trims the heap's top when
more than twice that threshold lies free there; the threshold itself moves with the sizes freed. A step frees and
allocates the same megabyte-sized tensors every time, and by the order in which their sizes first came and went a
process can settle where every step maps them afresh and the kernel zeroes each 4 KiB page at its first touch:
sampling DiT-T/2 for FID on the 2-core box ran at 69-72 images/s instead of 101-106 in two runs of three, with
1.7 million page faults against 0.2 (benchmarks/README.md, "Host memory"). PyTorch's CPU tuning guide swaps in
another allocator (jemalloc, tcmalloc) for this; glibc's own mallopt does the same here without a preload: the
mmap threshold fixed at glibc's largest (blocks above it still come from, and go back to, the OS) and no trimming
short of 2 GiB free at the top. Memory a step freed stays with the process, which takes it again the next step.
"""
import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
MMAP_THRESHOLD = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit): mallopt refuses more
TRIM_THRESHOLD = 2 ** 31 - 1  # mallopt takes a C int
# Settings a user (or a cluster's launcher) gave glibc at the process's start: theirs stand.
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")

held = False  # whether this process's thresholds are set


def hold_freed_memory():
    """Set glibc's mmap and trim thresholds once per process; whether they are set (not glibc, or a user's: no)."""
    global held
    if held or any(name in os.environ for name in USER_SETTINGS):
        return held
    try:
        libc = ctypes.CDLL(None)
    except OSError:  # Windows
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc: macOS, musl
        return False
    # Setting either also stops glibc moving them with the sizes freed (its dynamic threshold).
    held = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    held = held and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return held
