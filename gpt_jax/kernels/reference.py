"""The textbook kernels: plain jax, one (T, T) score matrix, jax.random dropout masks.

Every other kernel set is tested against these (tests/test_kernels.py).
"""

import math

import jax
import jax.numpy as jnp


def dense(x_BTD: jax.Array, kernel_DF: jax.Array, bias_F: jax.Array | None) -> jax.Array:
    """Returns x @ kernel (+ bias), contracting x's last axis."""
    y = jax.lax.dot_general(x_BTD, kernel_DF, (((x_BTD.ndim - 1,), (0,)), ((), ())))
    return y if bias_F is None else y + bias_F


def logits(x_BTD: jax.Array, embedding_VD: jax.Array) -> jax.Array:
    """Returns x @ embedding.T: the tied LM head's logits."""
    return jnp.dot(x_BTD, embedding_VD.T)


def dropout(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Returns inverted dropout of x (flax's nn.Dropout, mask for mask)."""
    if rate == 1.0:  # no x / 0, whose gradient would be NaN
        return jnp.zeros_like(x)
    keep = jax.random.bernoulli(rng, p=1.0 - rate, shape=x.shape)
    return jax.lax.select(keep, x / (1.0 - rate), jnp.zeros_like(x))


def masked_softmax(scores: jax.Array, visible, dtype) -> jax.Array:
    """Returns the softmax over the last axis of the visible scores, in float32, cast to dtype."""
    scores = jnp.where(visible, scores.astype(jnp.float32), -jnp.inf)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


def same_document(segments_BT: jax.Array, queries: slice, keys: slice) -> jax.Array:
    """Returns (B, 1, Tq, Tk): whether each query of `queries` and key of `keys` lie in one
    document (segments_BT: each position's document number)."""
    return (segments_BT[:, None, queries, None] == segments_BT[:, None, None, keys])


def causal_attention(q_BTHK: jax.Array, k_BTHK: jax.Array, v_BTHK: jax.Array, *,
                     dropout_rate: float, rng: jax.Array | None, dtype,
                     segments_BT: jax.Array | None = None) -> jax.Array:
    """Returns softmax(q k^T / sqrt(K) + causal mask) v, (B, T, H, K), dropout on the weights.

    With segments_BT (each position's document number) the mask is block-diagonal: a query
    sees only the earlier keys of its own document."""
    T, K = q_BTHK.shape[1], q_BTHK.shape[-1]
    scores_BHTS = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BTHK) / math.sqrt(K)
    visible = jnp.tril(jnp.ones((T, T), bool))
    if segments_BT is not None:
        visible = visible & same_document(segments_BT, slice(None), slice(None))
    probs_BHTS = masked_softmax(scores_BHTS, visible, dtype)
    if rng is not None:
        probs_BHTS = dropout(probs_BHTS, dropout_rate, rng)
    return jnp.einsum("bhts,bshk->bthk", probs_BHTS, v_BTHK)


def cached_attention(q_BTHK: jax.Array, k_BNSK: jax.Array, v_BNSK: jax.Array,
                     positions_BT: jax.Array, *, dropout_rate: float, rng: jax.Array | None,
                     dtype, segments: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Returns attention of queries at positions_BT over a KV cache, (B, T, H, K): each query
    sees the cached positions up to its own. The cache may hold fewer heads N than the queries
    (grouped-query attention): query head h reads cache head h // (H / N), without a copy.

    segments = (the queries' document numbers (B, T), the cached positions' (B, S)) limits
    each query to the cached positions of its own document."""
    B, T, H, K = q_BTHK.shape
    N, S = k_BNSK.shape[1], k_BNSK.shape[2]
    q_BTNGK = q_BTHK.reshape(B, T, N, H // N, K)
    visible_BHTS = (jnp.arange(S) <= positions_BT[:, :, None])[:, None]
    if segments is not None:
        visible_BHTS = visible_BHTS & (segments[0][:, None, :, None]
                                       == segments[1][:, None, None, :])
    scores_BHTS = jnp.einsum("btngk,bnsk->bngts", q_BTNGK, k_BNSK).reshape(B, H, T, S)
    probs_BHTS = masked_softmax(scores_BHTS / math.sqrt(K), visible_BHTS, dtype)
    if rng is not None:
        probs_BHTS = dropout(probs_BHTS, dropout_rate, rng)
    probs_BNGTS = probs_BHTS.reshape(B, N, H // N, T, S)
    return jnp.einsum("bngts,bnsk->btngk", probs_BNGTS, v_BNSK).reshape(B, T, H, K)
