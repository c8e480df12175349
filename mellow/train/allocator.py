"""Keep freed memory in the process instead of handing it back to the kernel after every training step.

PyTorch's CPU tensors come from the C library's malloc. glibc serves every block above its mmap threshold (at
most 32 MB) with a fresh `mmap` and returns it with `munmap` when freed, so each training step faults in its
large buffers page by page again: a tied 49 152 × 192 embedding's gradient alone is 37.7 MB, 9 216 pages. The
quickstart's run took 54 M page faults and 178 s of system time. With mmap off and a high trim threshold, freed
blocks go back to malloc's free lists and the next step reuses them (benchmarks/README.md: "allocator").
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)


M_MMAP_MAX = -4


TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: free memory above 2 GB at the heap's top is still returned


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed blocks (no mmap per large block, no trimming); True where it applied.
    Affects this process and the workers it forks from now on; elsewhere (macOS, musl) a no-op."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))

