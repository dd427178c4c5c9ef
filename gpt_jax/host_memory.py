"""Keeps freed host memory inside the process, so XLA:CPU steps do not page-fault their buffers.

XLA:CPU mallocs each call's temporary buffer (44 MiB for a CPU-recipe train step) and frees it
when the call returns. glibc serves a request above its mmap threshold (32 MiB at most) with a
fresh mmap and unmaps it on free, so every step faulted in and zeroed its whole working set
again: ~12,000 page faults a step, measured with getrusage, and about a third of the step's
time on a 2-core VM. Past that size the step time jumped (per token, 1.5x slower at 12 rows
than at 8). Serving large blocks from the heap and never trimming it leaves ~1,000 faults.

The entry points (train.py, sample.py, bench.py) call `retain_freed_memory()` first thing,
before JAX starts its thread pools. It only changes where glibc gets memory: numerics are
untouched. The cost is that the process keeps its peak host memory until it exits. Set
GPT_JAX_GLIBC_DEFAULTS=1 to leave glibc's defaults alone.
"""

import ctypes
import ctypes.util
import os

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def retain_freed_memory() -> bool:
    """Tells glibc to serve every allocation from one heap that it never trims.

    Returns True when the settings took effect; False off glibc (macOS, musl) or when
    GPT_JAX_GLIBC_DEFAULTS=1. Call it before the first JAX computation: threads that already
    have their own malloc arena keep it.
    """
    if os.environ.get("GPT_JAX_GLIBC_DEFAULTS") == "1":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: other libcs have no mallopt or other params
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_MAX, 0),  # no mmap per large block: it comes from the heap and stays there
        (_M_TRIM_THRESHOLD, -1),  # -1: never hand the heap's top back to the kernel
        (_M_ARENA_MAX, 1),  # one heap: XLA's worker threads reuse what the others freed
    ))
