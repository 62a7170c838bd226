"""Give freed heap memory back to the OS after dropping large tensors.

Why: glibc serves allocations below its (adaptive) mmap threshold from its heap, and free() keeps
that memory for reuse unless it sits at the top of the heap. Weights dropped in the middle of the
heap, such as the frozen vision encoder once its features are cached (344 MB for rd64), would
stay resident for the whole run (the benchmark's memory probe shows the difference; numbers in
benchmarks/README.md). ``malloc_trim(3)`` releases free pages anywhere in the heap. No Python
library wraps it, so we call it through ctypes; on other C
libraries (musl, macOS) :func:`return_free_memory` does nothing and returns False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc
        return None


def return_free_memory() -> bool:
    """Release free heap pages to the OS; True if glibc released any."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
