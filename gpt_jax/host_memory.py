"""Keeps freed host memory inside the process, so XLA:CPU steps do not page-fault their buffers.

XLA:CPU mallocs each call's temporary buffer (44 MiB for a CPU-recipe train step) and frees it
when the call returns. glibc serves a request above its mmap threshold (32 MiB at most) with a
fresh mmap and unmaps it on free, so every step faulted in and zeroed its whole working set
again: ~12,000 page faults a step, measured with getrusage, and about a third of the step's
time on a 2-core VM. Past that size the step time jumped (per token, 1.5x slower at 12 rows
than at 8). Serving large blocks from the heap and never trimming it leaves ~1,000 faults.

The entry points (train.py, sample.py, benchmarks/bench.py) call `retain_freed_memory()` first,
before JAX starts its thread pools. It only changes where glibc gets memory: numerics are
untouched. The cost is that the process keeps its peak host memory until it exits. Set
GPT_JAX_GLIBC_DEFAULTS=1 to leave glibc's defaults alone.

A kept heap has one catch. XLA frees a step's temporary buffer a few milliseconds after the
step's outputs are ready (1-6 ms measured), so a loop that dispatches the next step at once
finds the old buffer still held, takes a fresh one past it, and the heap fragments several
buffers deep: the baby GPT at batch 64 (6.9 GiB of temp) reached 20 GiB resident after six
steps. The training loop's pacer (loop.StepPacer) keeps the loop at most one step ahead
of XLA on a CPU and, for steps with a large temporary buffer, runs one step at a time and
waits until XLA has handed the last buffer back (watched with `heap_in_use_counter`): the
heap then holds one buffer.
"""

import ctypes
import ctypes.util
import os

from gpt_jax.errors import UserError

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_retained = False  # whether retain_freed_memory took effect in this process


class _MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2 (2.33+), all size_t
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _glibc():
    """Returns the C library when it is glibc (which has mallopt and mallinfo2), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: other libcs have other (or no) malloc knobs
        return libc
    except (OSError, AttributeError):
        return None


def retain_freed_memory() -> bool:
    """Tells glibc to serve every allocation from one heap that it never trims.

    Returns True when the settings took effect; False off glibc (macOS, musl) or when
    GPT_JAX_GLIBC_DEFAULTS=1. Call it before the first JAX computation: threads that already
    have their own malloc arena keep it.
    """
    global _retained
    choice = os.environ.get("GPT_JAX_GLIBC_DEFAULTS", "0")
    if choice not in ("0", "1"):
        raise UserError(f"GPT_JAX_GLIBC_DEFAULTS={choice!r} is not 0 or 1: set 1 to keep "
                        "glibc's malloc defaults, 0 (or unset it) to keep freed memory")
    libc = _glibc()
    if choice == "1" or libc is None:
        return False
    _retained = all(libc.mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_MAX, 0),  # no mmap per large block: it comes from the heap and stays there
        (_M_TRIM_THRESHOLD, -1),  # -1: never hand the heap's top back to the kernel
        (_M_ARENA_MAX, 1),  # one heap: XLA's worker threads reuse what the others freed
    ))
    return _retained


def retained() -> bool:
    """Returns whether retain_freed_memory took effect in this process."""
    return _retained


def release_freed_memory() -> None:
    """Hands the kept heap's free pages back to the kernel (glibc's malloc_trim), once.

    The kept heap also keeps what one-off work freed: XLA's compilation of the train step (150
    MiB for the CPU recipe), an evaluation's buffers, a checkpoint's host copy. The loop calls
    this after such work; the next step then faults its temporary buffer in once (a few ms),
    and the steps after it find the heap kept again. Does nothing unless
    retain_freed_memory took effect.
    """
    if _retained:
        _glibc().malloc_trim(0)


def resident_bytes() -> int | None:
    """Returns the process's resident memory now (Linux's /proc/self/statm), or None off Linux."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def heap_in_use_counter():
    """Returns a function giving the bytes glibc's heap has handed out, or None off glibc."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):  # mallinfo2: glibc 2.33+
        return None
    libc.mallinfo2.restype = _MallInfo2
    return lambda: libc.mallinfo2().uordblks
