import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import dropout

KEYS = {"raw": jax.random.PRNGKey(3), "typed": jax.random.key(7)}


@pytest.mark.parametrize("kind", KEYS)
@pytest.mark.parametrize("shape", [(1,), (5,), (3, 4, 7), (2, 3, 64, 64)])
def test_random_bits_are_jax_random_bits(kind, shape):
    ours = jax.jit(lambda k: dropout.random_bits(k, shape))(KEYS[kind])
    np.testing.assert_array_equal(ours, jax.random.bits(KEYS[kind], shape, jnp.uint32))


def test_random_bits_decline_other_prng_implementations():
    assert dropout.random_bits(jax.random.key(0, impl="rbg"), (4,)) is None


def test_threefry_known_answer():
    # Salmon et al. (2011) Threefry-2x32-20 test vector, as in jax's own tests.
    u32 = lambda *v: [jnp.asarray(x, jnp.uint32) for x in v]
    k1, k2, x1, x2 = u32(0x13198A2E, 0x03707344, 0x243F6A88, 0x85A308D3)
    assert tuple(int(y) for y in dropout.threefry2x32(k1, k2, x1, x2)) == (0xC4923A9C, 0x483DF7A0)


def _both(rate, x, rng):
    apply = lambda layer: layer.apply({}, x, deterministic=False, rngs={"dropout": rng})
    return apply(dropout.Dropout(rate)), apply(nn.Dropout(rate))


@pytest.mark.parametrize("rate", [0.1, 0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("kind", KEYS)
def test_masks_are_nn_dropouts_bit_for_bit(rate, kind):
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 6, 33))
    ours, ref = _both(rate, x, KEYS[kind])
    np.testing.assert_array_equal(ours, ref)
    if 0 < rate < 1:
        assert abs(float((ours == 0).mean()) - rate) < 0.06


def test_bfloat16_gradients_and_vmap_match_nn_dropout():
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 16)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(*_both(0.3, x, KEYS["raw"]))
    grads = [jax.grad(lambda x, layer=layer: layer.apply(
        {}, x, deterministic=False, rngs={"dropout": KEYS["raw"]}).astype(jnp.float32).sum())(x)
        for layer in (dropout.Dropout(0.3), nn.Dropout(0.3))]
    np.testing.assert_array_equal(*grads)
    keys = jax.random.split(jax.random.PRNGKey(5), 3)  # vmap over seeds draws each lane's mask
    lanes = jax.vmap(lambda k: _both(0.3, x, k))(keys)
    np.testing.assert_array_equal(*lanes)


def test_deterministic_and_rate_zero_pass_through():
    x = jnp.arange(6.0)
    assert dropout.Dropout(0.5).apply({}, x, deterministic=True) is x
    assert dropout.Dropout(0.0).apply({}, x, deterministic=False) is x


@pytest.mark.parametrize("key", [KEYS["raw"], KEYS["typed"], jax.random.key(0, impl="rbg")],
                         ids=["raw", "typed", "rbg fallback"])
def test_windows_are_the_whole_arrays_mask_sliced(key):
    shape = (2, 3, 8, 8)  # e.g. (B, H, T, S): two query blocks of 4 rows, keys up to their end
    x = jax.random.normal(jax.random.PRNGKey(2), shape)
    whole = nn.Dropout(0.3).apply({}, x, deterministic=False, rngs={"dropout": key})
    starts, parts = [(0, 0, 0, 0), (0, 0, 4, 0)], [x[:, :, :4, :4], x[:, :, 4:, :]]
    ours = jax.jit(lambda x0, x1, k: dropout.Dropout(0.3).apply(
        {}, [x0, x1], shape, starts, False, rngs={"dropout": k},
        method=dropout.Dropout.windows))(*parts, key)
    np.testing.assert_array_equal(ours[0], whole[:, :, :4, :4])
    np.testing.assert_array_equal(ours[1], whole[:, :, 4:, :])


def test_random_bits_of_a_window_are_that_window_of_the_bits():
    shape, start, size = (3, 5, 7), (1, 2, 3), (2, 3, 4)
    ours = dropout.random_bits(KEYS["raw"], shape, start, size)
    whole = jax.random.bits(KEYS["raw"], shape, jnp.uint32)
    np.testing.assert_array_equal(ours, whole[1:3, 2:5, 3:7])
