"""The conversion's resident memory: freed blocks given back to the system.

Calibration and tuning allocate and free arrays of many sizes, again and again.  glibc's allocator
serves blocks below its mmap threshold from its heaps, and that threshold rises (up to 32 MiB) each
time a larger mapped block is freed, so after the first few layers nearly every array lives in a
heap, where freed blocks stay resident unless they sit at the heap's top: the process's resident
memory climbed by about 0.2 GiB a tuning step for the first steps of the default model, and
calibration's leftovers stayed resident through the tuning (0.7 GiB), though the live data did not
grow.  During the tuning, blocks of `LARGE` bytes or more are mapped on their own (returned as
soon as they are freed: a fixed threshold also stops it rising), and the heaps are trimmed
between the stages.  Not during calibration: its large arrays are mapped anyway, and mapping the
middle-sized ones cost 0.2 s a layer in page faults.  Elsewhere (not glibc) both are no-ops."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os

LARGE = int(os.environ.get("EDGEPANEL_MMAP_LARGE", 4 << 20))   # bytes: mapped on their own during the tuning (0: leave glibc's)
_DEFAULT_MAX = 32 << 20  # glibc's own ceiling for its moving threshold (64-bit)
_M_MMAP_THRESHOLD = -3   # mallopt's parameter number (malloc.h)


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        return libc
    except (OSError, AttributeError):   # not glibc (musl, macOS): nothing to tune
        return None


class large_blocks_mapped:
    """Within the block, allocations of LARGE bytes or more are mapped on their own; on leaving,
    the threshold is set to glibc's own ceiling (a fixed value: glibc cannot be handed back its
    moving one) and the heaps are trimmed."""

    def __enter__(self):
        libc = _libc()
        if libc is not None and LARGE:
            libc.mallopt(_M_MMAP_THRESHOLD, LARGE)
        return self

    def __exit__(self, *exc):
        libc = _libc()
        if libc is not None and LARGE:
            libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_MAX)
        give_back()


def give_back() -> bool:
    """Collect garbage and return the heaps' free pages to the system; whether it could."""
    gc.collect()
    libc = _libc()
    return libc is not None and libc.malloc_trim(0) >= 0
