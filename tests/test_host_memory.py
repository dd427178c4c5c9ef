"""retain_freed_memory: a large buffer freed and allocated again costs no new page faults;
the entry points refuse a bad GPT_JAX_GLIBC_DEFAULTS in one line."""

import os
import subprocess
import sys

import pytest

_PROBE = """
import ctypes, resource
from gpt_jax import host_memory

print(host_memory.retain_freed_memory())
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def faults_of_a_48_mib_buffer():  # as XLA:CPU does with a step's temp buffer: malloc, use, free
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    size = 48 << 20  # above glibc's largest mmap threshold (32 MiB)
    buffer = libc.malloc(size)
    ctypes.memset(buffer, 1, size)
    libc.free(buffer)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_a_48_mib_buffer()
print(faults_of_a_48_mib_buffer())  # the second time: like XLA's per-step temp buffer
host_memory.release_freed_memory()  # its pages go back to the kernel, once
print(faults_of_a_48_mib_buffer())
print(faults_of_a_48_mib_buffer())  # and the heap is kept again
"""


def _probe(**env) -> tuple[str, int, int, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**os.environ, **env},
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1]), int(out[2]), int(out[3])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_buffer_is_reused_without_page_faults():
    took_effect, faults, _, _ = _probe(GPT_JAX_GLIBC_DEFAULTS="0")
    assert took_effect == "True"
    assert faults < 100  # 12,288 pages of 4 KiB with glibc's defaults

    took_effect, faults, _, _ = _probe(GPT_JAX_GLIBC_DEFAULTS="1")
    assert took_effect == "False"
    assert faults > 12_000  # glibc unmapped the buffer on free and maps fresh pages again


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_hands_the_kept_pages_back_once():
    _, kept, after_release, kept_again = _probe(GPT_JAX_GLIBC_DEFAULTS="0")
    assert kept < 100
    assert after_release > 12_000  # the pages were returned to the kernel: faulted in anew
    assert kept_again < 100



@pytest.mark.parametrize("entry_point",
                         ["train.py", "sample.py", "benchmarks/bench.py"])
def test_a_bad_glibc_setting_is_a_one_line_error(entry_point):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = (["--init_from", "gpt2"] if entry_point == "sample.py"
            else ["--config", "configs/shakespeare_cpu.py"])
    run = subprocess.run([sys.executable, entry_point, *args], cwd=root, capture_output=True,
                         text=True, env={**os.environ, "GPT_JAX_GLIBC_DEFAULTS": "yes"})
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "error: GPT_JAX_GLIBC_DEFAULTS='yes' is not 0 or 1: set 1 to keep glibc's malloc "
        "defaults, 0 (or unset it) to keep freed memory"]
