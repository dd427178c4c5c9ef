"""jax.random's bits, bit for bit, from a Threefry hash written as one elementwise expression.

jax.random's threefry2x32 lowers on CPU to a rolled loop (to keep compile times short) that
writes the whole counter array out five times: dropout on the baby GPT's attention
probabilities (64 x 6 x 256 x 256) takes ~320 ms on 2 cores, against ~70 ms for the same hash
unrolled, which XLA fuses with the comparison and the select of the dropout that uses it.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(k1: jax.Array, k2: jax.Array, x1: jax.Array, x2: jax.Array):
    """Threefry-2x32 with 20 rounds (Salmon et al. 2011), the hash behind jax.random, unrolled."""
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = ((x2 << np.uint32(r)) | (x2 >> np.uint32(32 - r))) ^ x1
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def random_bits(key: jax.Array, shape: tuple[int, ...],
                start: tuple[int, ...] | None = None,
                size: tuple[int, ...] | None = None) -> jax.Array | None:
    """Returns jax.random.bits(key, shape, uint32), bit for bit, computed by the unrolled hash;
    None where that identity does not hold (another PRNG implementation, non-partitionable
    threefry, or 2^32 elements or more).

    With `start` and `size` (given together), returns only that window of the array: the
    bits of its elements' counters.
    """
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if str(jax.random.key_impl(key)) != "threefry2x32":
            return None
        key = jax.random.key_data(key)
    if not jax.config.jax_threefry_partitionable or math.prod(shape) >= 2**32:
        return None
    if start is None or tuple(size) == tuple(shape):
        counts = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    else:  # each element's row-major index in the whole array
        strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
        counts = sum((jax.lax.broadcasted_iota(jnp.uint32, size, d) + np.uint32(start[d]))
                     * np.uint32(strides[d]) for d in range(len(shape)))
    bits1, bits2 = threefry2x32(key[0], key[1], jnp.zeros_like(counts), counts)
    return bits1 ^ bits2
