"""The dense layers' matmul: lax.dot_general's values and gradients, a faster weight gradient."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax.matmul import dense_dot_general

DIMS = (((1,), (0,)), ((), ()))


def _value_and_grads(dot_general, x, w, dy):
    y, vjp = jax.vjp(lambda x, w: dot_general(x, w, DIMS), x, w)
    return (y, *vjp(dy))


@pytest.mark.parametrize("shape", [(96, 64, 16), (96, 16, 64), (96, 32, 32), (7, 33, 5)],
                         ids=["tall kernel", "wide kernel", "square", "odd sizes"])
def test_values_and_gradients_equal_lax_dot_general(shape):
    n, d, f = shape
    kx, kw, ky = jax.random.split(jax.random.PRNGKey(0), 3)
    x, w = jax.random.normal(kx, (n, d)), jax.random.normal(kw, (d, f))
    dy = jax.random.normal(ky, (n, f))
    ours = jax.jit(lambda *a: _value_and_grads(dense_dot_general, *a))(x, w, dy)
    ref = jax.jit(lambda *a: _value_and_grads(jax.lax.dot_general, *a))(x, w, dy)
    np.testing.assert_array_equal(ours[0], ref[0])  # the forward is the same dot
    for a, b in zip(ours[1:], ref[1:], strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _backward_jaxpr(d, f):
    x, w, dy = jnp.ones((8, d)), jnp.ones((d, f)), jnp.ones((8, f))
    return str(jax.make_jaxpr(lambda *a: _value_and_grads(dense_dot_general, *a))(x, w, dy))


def test_a_tall_kernels_gradient_is_the_transpose_of_the_wide_product():
    # (D, F) = (64, 16): dy^T @ x gives (16, 64), kept apart from its transpose by a barrier.
    assert "optimization_barrier" in _backward_jaxpr(64, 16)
    assert "optimization_barrier" not in _backward_jaxpr(16, 64)
    assert "optimization_barrier" not in _backward_jaxpr(32, 32)


def test_other_contractions_and_mixed_dtypes_fall_back_to_lax():
    x3, w = jnp.ones((2, 3, 4)), jnp.ones((4, 5))
    dims3 = (((2,), (0,)), ((), ()))
    np.testing.assert_array_equal(dense_dot_general(x3, w, dims3),
                                  jax.lax.dot_general(x3, w, dims3))
    assert "custom_vjp" not in str(jax.make_jaxpr(
        lambda a, b: dense_dot_general(a, b, dims3))(x3, w))
    x_bf16 = jnp.ones((3, 4), jnp.bfloat16)
    assert "custom_vjp" not in str(jax.make_jaxpr(
        lambda a, b: dense_dot_general(a, b, DIMS))(x_bf16, w))


def test_dense_layer_gradients_in_bfloat16_and_under_vmap():
    layer = nn.Dense(8, dtype=jnp.bfloat16, dot_general=dense_dot_general)
    plain = nn.Dense(8, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 6, 32))
    params = plain.init(jax.random.PRNGKey(2), x[0])

    def grads(module):
        def loss(p, xi):
            return jnp.sum(module.apply(p, xi).astype(jnp.float32) ** 2)
        return jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(params, x)

    ours, ref = grads(layer), grads(plain)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        assert a.dtype == b.dtype == jnp.float32 and a.shape[0] == 4
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2)  # bfloat16 products
