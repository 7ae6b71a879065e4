"""Keep freed memory in the process instead of handing it back to the kernel.

A HybridGNet forward pass on the CPU allocates and frees about thirty tensors of
4-32 MiB (the first encoder level alone is 8 x 1024 x 1024 float32). glibc serves
allocations that large with fresh ``mmap`` pages and unmaps them on ``free``, so
every pass touches new pages: ~150,000 page faults, 40% of a forward pass on the
CPU here. Served from the heap and kept there, the same memory is reused from
one image to the next. Numbers do not change; only where the bytes live.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

# mallopt(3) parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# Free memory above this much at the top of the heap still goes back to the kernel.
TRIM_THRESHOLD_BYTES = 512 << 20

_done = False


def keep_freed_memory() -> bool:
    """Tune glibc's allocator for repeated large tensors (once per process).

    Large blocks come from the heap instead of ``mmap``, freed memory up to
    ``TRIM_THRESHOLD_BYTES`` stays mapped, and all threads share one arena so
    that a block freed by one model thread serves the next image in another.
    Returns False where the C library is not glibc (nothing changes there).
    """
    global _done
    if _done:
        return True
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    _done = all(
        mallopt(param, value) == 1
        for param, value in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES), (_M_ARENA_MAX, 1))
    )
    if not _done:
        log.warning("could not tune the memory allocator; inference runs slower")
    return _done
