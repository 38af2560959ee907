"""Process settings for CPU inference that PyTorch leaves to the C library.

PyTorch allocates CPU tensors with ``malloc``. With glibc's defaults a large temporary (the few-MB
activations of every block) is served by a fresh ``mmap`` or by regrowing a heap that was just trimmed,
and the kernel zero-fills it page by page on first touch: about 40,000 page faults per ViT-S/16 forward
at 640² here, 10-15 % of the forward time, for every library alike (``benchmarks/RESULTS.md``).
:func:`tune_cpu_allocator` keeps freed memory in the heap for reuse instead. The ``vitkit`` commands and
the streaming actors call it; library users call it once at start-up (or set
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824``, or preload jemalloc/tcmalloc).
The price: memory the process frees stays in its resident set, up to its peak, for reuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_cpu_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Serve blocks up to ``mmap_threshold`` bytes (glibc's maximum, 32 MiB) from the heap and return the
    heap's free top to the system only beyond ``trim_threshold`` bytes. Returns False, changing nothing,
    where the C library is not glibc (musl, macOS, Windows)."""
    if not 0 < mmap_threshold <= 32 << 20 or trim_threshold <= 0:
        raise ValueError(f"need 0 < mmap_threshold <= 32 MiB and trim_threshold > 0, got {mmap_threshold}, "
                         f"{trim_threshold}")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    trim = min(trim_threshold, 2**31 - 1)
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim))
