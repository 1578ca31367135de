"""Giving memory back to the system once a big deletion has freed it.

CPython's own allocator for small objects (pymalloc) returns memory only in whole 1 MiB arenas,
and one object that outlives a request keeps its arena. A POST of 50,000 IDs makes and frees
some 20 MB of small objects, and the few that outlive it (a cache entry, a counter, a free list's
spares) land among them: 30 rounds of posting and deleting such a batch grew the process by 45 to
57 % before it levelled off, while the objects alive stayed the same. With the C library's
allocator, ``malloc_trim`` hands back every free page wherever it lies, so the service runs with
``PYTHONMALLOC=malloc`` and trims after a deletion that freed many coins: the same 30 rounds end
within 10 % of the first (README, "Memory").
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
