"""Giving memory back to the system once a big deletion has freed it.

CPython's own allocator for small objects (pymalloc) returns memory only in whole 1 MiB arenas,
and one object that outlives a request keeps its arena. A big POST makes and frees many small
objects, and the few that outlive it (a cache entry, a counter, a free list's spares) land among
them, so rounds of posting and deleting grew the process while the objects alive stayed the same.
With the C library's allocator, ``malloc_trim`` hands back every free page wherever it lies, so the
service runs with ``PYTHONMALLOC=malloc`` and trims after a deletion that freed many coins
(docs/performance.md, "Why the code is shaped so").
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys

# Two malloc arenas rather than eight a core: the GIL serialises allocation anyway, and 64
# request threads each with its own arena would each keep its own free memory.
SYSTEM_ALLOCATOR = {"PYTHONMALLOC": "malloc", "MALLOC_ARENA_MAX": "2"}

# Deleting fewer coins than this frees too little to be worth a full collection.
RELEASE_AFTER = 1_000


def _find_malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None  # not glibc: the allocator keeps what it keeps


_malloc_trim = _find_malloc_trim()


def restart_with_system_allocator() -> None:
    """Run this same command again under the C library's allocator, unless the environment has
    already chosen one (``PYTHONMALLOC`` set, to anything). The allocator is fixed when the
    interpreter starts, hence the ``exec``: same process ID, same arguments, same descriptors."""
    if "PYTHONMALLOC" in os.environ or not sys.executable:
        return
    env = {**SYSTEM_ALLOCATOR, **os.environ}
    os.execve(sys.executable, sys.orig_argv, env)


def release_freed_memory(freed: int) -> None:
    """After ``freed`` coins were deleted: collect what is garbage, empty the free lists, and hand
    the C library's free pages back to the system."""
    if freed < RELEASE_AFTER:
        return
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)
