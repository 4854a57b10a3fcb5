"""Keep freed memory for reuse instead of giving it back to the kernel at once.

glibc's malloc serves a block above its mmap threshold (128 KiB, raised as blocks are freed, at most
32 MiB) from a fresh mapping and unmaps it when freed, and trims the heap's free top: a model's
large activations are then faulted in page by page on every forward pass. On this project's 2-core
VM that system time was 35% of a resnet50 forward at batch 32 (4.06 s, 1.45 s of it in the kernel;
2.64 s with freed memory kept: `benchmarks/bench_guard.py --keep-freed-memory`). The cost: the
process keeps its peak heap, a server's working set anyway; the first few passes grow it past that
peak (a freed block is reused once its neighbours have been freed and merged), then it settles
(tests/test_allocator.py).

    keep_freed_memory()   # True where it took effect (glibc), False elsewhere (nothing changed)
"""
from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters (malloc.h)
SETTINGS = (
    (M_MMAP_THRESHOLD, 1 << 30),  # blocks under 1 GiB from the heap (resnet50's largest activation at batch 32: 98 MiB)
    (M_TRIM_THRESHOLD, 2**31 - 1),  # never give the heap's free top back
    (M_TOP_PAD, 64 << 20),  # grow the heap 64 MiB at a time
)


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory for reuse (process-wide); False where there is no mallopt
    or it refuses a setting (another C library, an older glibc's 32 MiB threshold cap)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in SETTINGS)
