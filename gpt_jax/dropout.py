"""Dropout with the mask drawn by a fused Threefry: nn.Dropout's masks, bit for bit, faster on CPU.

jax.random's threefry2x32 lowers on CPU to a rolled loop (to keep compile times short) that
writes the whole counter array out five times: nn.Dropout on the baby GPT's attention
probabilities (64 x 6 x 256 x 256) takes ~320 ms on 2 cores, against ~70 ms for the same hash
written as one elementwise expression, which XLA fuses with the comparison and the select.
On GPUs and TPUs jax already unrolls the hash, so there the two should cost about the same
(not measured: no accelerator was available).
"""

import math

import flax.linen as nn
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


class Dropout(nn.Module):
    """nn.Dropout (inverted dropout, same masks from the same 'dropout' rng), drawn by
    `random_bits`: a kept element is one whose uniform draw, built from the bits exactly as
    jax.random.uniform builds it, is below 1 - rate."""

    rate: float

    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        return self.windows([x], x.shape, [(0,) * x.ndim], deterministic)[0]

    def windows(self, xs: list[jax.Array], shape: tuple[int, ...],
                starts: list[tuple[int, ...]], deterministic: bool) -> list[jax.Array]:
        """Returns dropout of an array of `shape` of which the xs are windows (xs[i] starting
        at starts[i]), from one rng: each window's mask is that array's mask, sliced."""
        if deterministic or self.rate == 0.0:
            return list(xs)
        if self.rate == 1.0:  # as nn.Dropout: no x / 0, whose gradient would be NaN
            return [jnp.zeros_like(x) for x in xs]
        keep_prob = 1.0 - self.rate
        rng = self.make_rng("dropout")
        whole = None  # the fallback's mask of the whole array, drawn once
        out = []
        for x, start in zip(xs, starts, strict=True):
            bits = random_bits(rng, shape, start, x.shape)
            if bits is None:
                if whole is None:
                    whole = jax.random.bernoulli(rng, p=keep_prob, shape=shape)
                keep = jax.lax.dynamic_slice(whole, start, x.shape)
            else:  # jax.random.uniform's float: 23 random mantissa bits under exponent 0, - 1
                mantissa = (bits >> np.uint32(9)) | np.uint32(0x3F800000)
                uniform = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1.0)
                keep = uniform < np.float32(keep_prob)
            out.append(jax.lax.select(keep, x / keep_prob, jnp.zeros_like(x)))
        return out
