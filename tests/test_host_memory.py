"""retain_freed_memory: a large buffer freed and allocated again costs no new page faults;
StepPacer: how far a CPU loop runs ahead of XLA."""

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
"""


def _probe(**env) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**os.environ, **env},
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_buffer_is_reused_without_page_faults():
    took_effect, faults = _probe(GPT_JAX_GLIBC_DEFAULTS="0")
    assert took_effect == "True"
    assert faults < 100  # 12,288 pages of 4 KiB with glibc's defaults

    took_effect, faults = _probe(GPT_JAX_GLIBC_DEFAULTS="1")
    assert took_effect == "False"
    assert faults > 12_000  # glibc unmapped the buffer on free and maps fresh pages again



_PACED_LOOP = """
from gpt_jax import host_memory

host_memory.retain_freed_memory()
import jax, jax.numpy as jnp

heap_in_use = host_memory.heap_in_use_counter()

def step(w, x):  # elementwise layers: cheap, but their activations make a large temp buffer
    def loss(w):
        h = x
        for _ in range(6):
            h = jnp.tanh(h * w + 0.1)
        return jnp.mean(h * h)
    loss_value, grad = jax.value_and_grad(loss)(w)
    return w - 0.1 * grad, loss_value

w, x = jnp.ones((4096,)), jnp.full((4096, 4096), 0.5)
compiled = jax.jit(step, donate_argnums=0).lower(w, x).compile()
print(compiled.memory_analysis().temp_size_in_bytes)
pace = host_memory.StepPacer(compiled)
for _ in range(12):
    in_use_before = heap_in_use()
    w, loss_value = compiled(w, x)
    pace(loss_value)
    print(heap_in_use() - in_use_before)  # what the step still holds
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_pacer_lets_xla_free_a_large_temp_buffer_before_the_next_step():
    out = subprocess.run([sys.executable, "-c", _PACED_LOOP],
                         env={**os.environ, "GPT_JAX_GLIBC_DEFAULTS": "0"},
                         capture_output=True, text=True, check=True).stdout.split()
    temp, held = int(out[0]), [int(n) for n in out[1:]]
    assert temp >= 256 << 20  # large: the pacer waits for its release
    # Waiting for the outputs alone, the step often still held its temp buffer (XLA frees it
    # 1-6 ms later) and the next step took a fresh one from a growing heap.
    assert len(held) == 12 and max(held) < temp // 4


@pytest.mark.parametrize("entry_point", ["train.py", "sample.py", "bench.py"])
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


def test_the_pacer_keeps_one_small_step_in_flight():
    import jax
    import jax.numpy as jnp

    from gpt_jax import host_memory

    compiled = jax.jit(lambda x: x + 1).lower(jnp.zeros(4)).compile()
    pace = host_memory.StepPacer(compiled)
    waited = []
    pace._block_until_ready = waited.append
    for outputs in ("step 1", "step 2", "step 3"):
        pace(outputs)
    # Python dispatches step k+1 while step k runs: each call waits for the step before.
    assert waited == ["step 1", "step 2"]
