"""The training loop's pacing on a CPU: how far it runs ahead of XLA, and XLA's freed buffers."""

import os
import subprocess
import sys

import pytest

from gpt_jax import loop as loop_module

_PACED_LOOP = """
from gpt_jax import host_memory, loop

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
pace = loop.StepPacer(compiled)
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
    assert temp >= loop_module.LARGE_TEMP_BYTES  # large: the pacer waits for its release
    # Waiting for the outputs alone, the step often still held its temp buffer (XLA frees it
    # 1-6 ms later) and the next step took a fresh one from a growing heap.
    assert len(held) == 12 and max(held) < temp // 4


def test_the_pacer_keeps_one_small_step_in_flight():
    import jax
    import jax.numpy as jnp

    from gpt_jax import loop

    compiled = jax.jit(lambda x: x + 1).lower(jnp.zeros(4)).compile()
    pace = loop.StepPacer(compiled)
    waited = []
    pace._block_until_ready = waited.append
    for outputs in ("step 1", "step 2", "step 3"):
        pace(outputs)
    # Python dispatches step k+1 while step k runs: each call waits for the step before.
    assert waited == ["step 1", "step 2"]
