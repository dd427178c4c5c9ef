"""The kernel sets: each one's values and gradients equal the reference kernels'."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax.kernels import cpu, fused, reference, threefry
from gpt_jax.kernels import sets as kernels
from gpt_jax.model import GPT, GPTConfig, init_params

KEYS = {"raw": jax.random.PRNGKey(3), "typed": jax.random.key(7)}
SETS = ("cpu", "fused")


def _normal(shape, seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(seed), shape).astype(dtype)


def _value_and_grads(f, *args):
    y, vjp = jax.vjp(f, *args)
    return (y, *vjp(_normal(y.shape, seed=9, dtype=y.dtype)))


def _assert_close(ours, ref, tol=1e-5):
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


# Dense layers: (x, kernel, bias) with tall, wide and square kernels, and no bias.
@pytest.mark.parametrize("name", SETS)
@pytest.mark.parametrize("shape", [(3, 32, 64, 16), (3, 32, 16, 64), (2, 7, 33, 5)],
                         ids=["tall kernel", "wide kernel", "odd sizes"])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_equals_the_reference(name, shape, bias):
    B, T, D, F = shape
    args = [_normal((B, T, D)), _normal((D, F), 1)] + ([_normal((F,), 2)] if bias else [])
    f = lambda ks: lambda x, w, *b: ks.dense(x, w, b[0] if b else None)
    ours = jax.jit(lambda *a: _value_and_grads(f(kernels.SETS[name]), *a))(*args)
    ref = jax.jit(lambda *a: _value_and_grads(f(reference), *a))(*args)
    np.testing.assert_array_equal(ours[0], ref[0])  # the forward is the same dot
    _assert_close(ours[1:], ref[1:])


def test_the_cpu_dense_takes_a_tall_kernels_gradient_transposed():
    def backward(d, f):
        x, w = jnp.ones((2, 4, d)), jnp.ones((d, f))
        return str(jax.make_jaxpr(lambda *a: _value_and_grads(
            lambda x, w: cpu.dense(x, w, None), *a))(x, w))
    assert "optimization_barrier" in backward(64, 16)  # dy^T @ x, kept from its transpose
    assert "optimization_barrier" not in backward(16, 64)
    assert "optimization_barrier" not in backward(32, 32)


def test_cpu_dense_in_bfloat16_and_under_vmap():
    x, w, b = _normal((4, 6, 32)), _normal((32, 8), 1), _normal((8,), 2)

    def grads(ks):
        def loss(w, b, xi):
            y = ks.dense(xi.astype(jnp.bfloat16), w.astype(jnp.bfloat16), b.astype(jnp.bfloat16))
            return jnp.sum(y.astype(jnp.float32) ** 2)
        return jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(None, None, 0)))(w, b, x)

    _assert_close(grads(cpu), grads(reference), tol=2e-2)  # bfloat16 products


@pytest.mark.parametrize("name", SETS)
def test_tied_logits_equal_the_reference(name):
    x, emb = _normal((2, 5, 16)), _normal((11, 16), 1)
    ours = jax.jit(lambda *a: _value_and_grads(kernels.SETS[name].logits, *a))(x, emb)
    _assert_close(ours, jax.jit(lambda *a: _value_and_grads(reference.logits, *a))(x, emb))


# Causal attention: T = 256 goes in two query blocks on the cpu set; odd batches skip halving.
@pytest.mark.parametrize("name", SETS)
@pytest.mark.parametrize("shape", [(2, 256, 2, 8), (3, 16, 2, 8)], ids=["two blocks", "odd"])
def test_causal_attention_equals_the_reference(name, shape):
    q, k, v = (_normal(shape, seed=s) for s in range(3))
    opts = dict(dropout_rate=0.0, rng=None, dtype=jnp.float32)
    attend = lambda ks: lambda q, k, v: ks.causal_attention(q, k, v, **opts)
    ours = jax.jit(lambda *a: _value_and_grads(attend(kernels.SETS[name]), *a))(q, k, v)
    _assert_close(ours, jax.jit(lambda *a: _value_and_grads(attend(reference), *a))(q, k, v))


@pytest.mark.parametrize("T", [16, 256])
def test_cpu_attention_with_dropout_equals_the_reference(T):
    # Same masks (the whole (T, T) matrix's, sliced per block): the same values to rounding.
    q, k, v = (_normal((2, T, 2, 8), seed=s) for s in range(3))
    opts = dict(dropout_rate=0.2, rng=jax.random.PRNGKey(4), dtype=jnp.float32)
    ours = jax.jit(lambda *a: _value_and_grads(
        lambda q, k, v: cpu.causal_attention(q, k, v, **opts), *a))(q, k, v)
    ref = jax.jit(lambda *a: _value_and_grads(
        lambda q, k, v: reference.causal_attention(q, k, v, **opts), *a))(q, k, v)
    _assert_close(ours, ref)
    # The fused set falls back to the reference when the attention weights drop out.
    np.testing.assert_array_equal(fused.causal_attention(q, k, v, **opts),
                                  reference.causal_attention(q, k, v, **opts))


def test_attention_in_batch_halves_equals_one_einsum():
    q, k = _normal((6, 16, 2, 8)), _normal((6, 16, 2, 8), 1)
    for spec, a, b in (("bthk,bshk->bhts", q, k),
                       ("bhts,bshk->bthk", _normal((6, 2, 16, 16), 2), k)):
        halves = jax.jit(lambda a, b, s=spec: cpu.batch_halves_einsum(s, a, b))(a, b)
        whole = jax.jit(lambda a, b, s=spec: jnp.einsum(s, a, b))(a, b)
        np.testing.assert_array_equal(halves, whole)  # rows never mix: bit for bit


def test_query_blocks():
    assert [cpu.query_blocks(t) for t in (64, 128, 200, 256, 384, 1024)] == [1, 1, 1, 2, 3, 8]


@pytest.mark.parametrize("name", SETS)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_a_whole_model_equals_the_reference(name, dropout):
    cfg = GPTConfig(vocab_size=50, block_size=256, n_layer=1, n_head=2, n_embd=16,
                    dropout=dropout, kernels=name)
    params = init_params(cfg, jax.random.PRNGKey(0))
    idx = jax.random.randint(jax.random.PRNGKey(1), (2, 256), 0, 50)

    def loss_and_grads(c):
        def loss(p):
            logits = GPT(c).apply({"params": p}, idx, rngs={"dropout": jax.random.PRNGKey(3)})
            return (logits ** 2).mean()
        return jax.jit(jax.value_and_grad(loss))(params)

    _assert_close(loss_and_grads(cfg),
                  loss_and_grads(dataclasses.replace(cfg, kernels="reference")))


def test_select_resolves_auto_and_the_older_attention_switch():
    backend = jax.default_backend()
    assert kernels.select("auto").name == kernels.resolve("auto", backend)
    assert kernels.resolve("auto", "cpu") == "cpu"
    assert kernels.resolve("auto", "gpu") == kernels.resolve("auto", "tpu") == "fused"
    assert kernels.resolve("reference", "gpu") == "reference"
    assert kernels.select("cpu", "fused").causal_attention is fused.causal_attention
    assert kernels.select("cpu", "einsum").causal_attention is cpu.causal_attention
    assert kernels.select("fused", "einsum").causal_attention is reference.causal_attention
    assert kernels.select("reference", "auto") == kernels.SETS["reference"]


def test_model_py_never_asks_for_the_backend():
    import gpt_jax.model

    with open(gpt_jax.model.__file__, encoding="utf-8") as f:
        assert "default_backend" not in f.read()


# Dropout masks: the unrolled Threefry gives jax.random's bits, so nn.Dropout's masks.
@pytest.mark.parametrize("kind", KEYS)
@pytest.mark.parametrize("shape", [(1,), (5,), (3, 4, 7), (2, 3, 64, 64)])
def test_random_bits_are_jax_random_bits(kind, shape):
    ours = jax.jit(lambda k: threefry.random_bits(k, shape))(KEYS[kind])
    np.testing.assert_array_equal(ours, jax.random.bits(KEYS[kind], shape, jnp.uint32))


def test_random_bits_decline_other_prng_implementations():
    assert threefry.random_bits(jax.random.key(0, impl="rbg"), (4,)) is None


def test_threefry_known_answer():
    # Salmon et al. (2011) Threefry-2x32-20 test vector, as in jax's own tests.
    u32 = lambda *v: [jnp.asarray(x, jnp.uint32) for x in v]
    k1, k2, x1, x2 = u32(0x13198A2E, 0x03707344, 0x243F6A88, 0x85A308D3)
    assert tuple(int(y) for y in threefry.threefry2x32(k1, k2, x1, x2)) == (0xC4923A9C, 0x483DF7A0)


def _nn_dropout(rate, x, rng):
    return nn.Dropout(rate).apply({}, x, deterministic=False, rng=rng)


@pytest.mark.parametrize("name", ["reference", *SETS])
@pytest.mark.parametrize("rate", [0.1, 0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("kind", KEYS)
def test_masks_are_nn_dropouts_bit_for_bit(name, rate, kind):
    x = _normal((4, 6, 33))
    ours = jax.jit(lambda x, k: kernels.SETS[name].dropout(x, rate, k))(x, KEYS[kind])
    np.testing.assert_array_equal(ours, _nn_dropout(rate, x, KEYS[kind]))
    if 0 < rate < 1:
        assert abs(float((ours == 0).mean()) - rate) < 0.06


def test_bfloat16_gradients_and_vmap_match_nn_dropout():
    x = _normal((8, 16), 1, jnp.bfloat16)
    key = KEYS["raw"]
    np.testing.assert_array_equal(cpu.dropout(x, 0.3, key), _nn_dropout(0.3, x, key))
    grads = [jax.grad(lambda x, f=f: f(x).astype(jnp.float32).sum())(x) for f in (
        lambda x: cpu.dropout(x, 0.3, key), lambda x: _nn_dropout(0.3, x, key))]
    np.testing.assert_array_equal(*grads)
    keys = jax.random.split(jax.random.PRNGKey(5), 3)  # vmap over seeds draws each lane's mask
    lanes = jax.vmap(lambda k: (cpu.dropout(x, 0.3, k), _nn_dropout(0.3, x, k)))(keys)
    np.testing.assert_array_equal(*lanes)


@pytest.mark.parametrize("key", [KEYS["raw"], KEYS["typed"], jax.random.key(0, impl="rbg")],
                         ids=["raw", "typed", "rbg fallback"])
def test_windows_are_the_whole_arrays_mask_sliced(key):
    shape = (2, 3, 8, 8)  # e.g. (B, H, T, S): two query blocks of 4 rows, keys up to their end
    x = _normal(shape, 2)
    whole = _nn_dropout(0.3, x, key)
    starts, parts = [(0, 0, 0, 0), (0, 0, 4, 0)], [x[:, :, :4, :4], x[:, :, 4:, :]]
    ours = jax.jit(lambda x0, x1, k: cpu.dropout_windows([x0, x1], shape, starts, 0.3, k))(
        *parts, key)
    np.testing.assert_array_equal(ours[0], whole[:, :, :4, :4])
    np.testing.assert_array_equal(ours[1], whole[:, :, 4:, :])


def test_random_bits_of_a_window_are_that_window_of_the_bits():
    shape, start, size = (3, 5, 7), (1, 2, 3), (2, 3, 4)
    ours = threefry.random_bits(KEYS["raw"], shape, start, size)
    whole = jax.random.bits(KEYS["raw"], shape, jnp.uint32)
    np.testing.assert_array_equal(ours, whole[1:3, 2:5, 3:7])
