"""Kernels for XLA:CPU: the reference's numbers (to float32 rounding), faster on a few cores.

Each trick was measured side by side on the train step (2 CPU cores, in-process A/B):
- Dense layers run on the (B*T, D) matrix view of their input. With the 3-D input the weight
  gradient contracts over two dims (B and T) and XLA materialises a transposed copy of the
  incoming gradient, re-fusing the whole GELU backward into that strided copy (~20% of the
  step). Their weight gradient is taken the fast way round (`_matmul`): 2.5-3.3%.
- Causal attention goes in blocks of ATTENTION_BLOCK queries and skips the key blocks above
  the diagonal (a quarter of the attention matmuls at T = 256: baby GPT 1.13x), and runs each
  batched matmul as two over the batch halves (1.03x): XLA:CPU runs a batched matmul on one
  thread, and smaller batches run faster per FLOP.
- Dropout masks come from the unrolled Threefry of threefry.py, bit for bit jax.random's.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax.kernels import reference
from gpt_jax.kernels.threefry import random_bits

ATTENTION_BLOCK = 128  # query/key block of causal attention (see causal_attention)


@jax.custom_vjp
def _matmul(x_ND: jax.Array, w_DF: jax.Array) -> jax.Array:
    """Returns x @ w; its backward takes the weight gradient the fast way round on XLA:CPU.

    The weight gradient is x^T @ dy. XLA:CPU has no library kernel for a transposed left
    operand, so it runs Eigen's, which is markedly slower when the result has fewer columns
    than rows: on 2 cores, 1.11 ms for the (512, 128) gradient of the MLP's c_proj at the CPU
    recipe's 768 rows against 0.80 ms for its (128, 512) transpose, dy^T @ x, plus a 256 KiB
    copy. So a kernel taller than wide gets dy^T @ x, transposed; an optimization barrier keeps
    XLA from folding the transpose back into the dot.
    """
    return x_ND @ w_DF


def _matmul_fwd(x_ND, w_DF):
    return x_ND @ w_DF, (x_ND, w_DF)


def _matmul_bwd(residuals, dy_NF):
    x_ND, w_DF = residuals
    dx_ND = dy_NF @ w_DF.T
    D, F = w_DF.shape
    if D > F:  # the (F, D) product is the faster one; transpose it afterwards
        dw_DF = jax.lax.optimization_barrier(dy_NF.T @ x_ND).T
    else:
        dw_DF = x_ND.T @ dy_NF
    return dx_ND, dw_DF


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _on_rows(f, x_BTD: jax.Array, *args) -> jax.Array:
    """Returns f(x, *args) computed on the (B*T, D) matrix view of x_BTD."""
    y_ND = f(x_BTD.reshape(-1, x_BTD.shape[-1]), *args)
    return y_ND.reshape(*x_BTD.shape[:-1], y_ND.shape[-1])


def _dense_rows(x_ND, kernel_DF, bias_F):
    if x_ND.dtype == kernel_DF.dtype:
        y_NF = _matmul(x_ND, kernel_DF)
    else:
        y_NF = jax.lax.dot_general(x_ND, kernel_DF, (((1,), (0,)), ((), ())))
    return y_NF if bias_F is None else y_NF + jnp.reshape(bias_F, (1, -1))


def dense(x_BTD: jax.Array, kernel_DF: jax.Array, bias_F: jax.Array | None) -> jax.Array:
    """Returns x @ kernel (+ bias), on rows, with the fast weight gradient."""
    return _on_rows(_dense_rows, x_BTD, kernel_DF, bias_F)


def logits(x_BTD: jax.Array, embedding_VD: jax.Array) -> jax.Array:
    """Returns x @ embedding.T (the tied LM head), on rows."""
    return _on_rows(reference.logits, x_BTD, embedding_VD)


def dropout_windows(xs: list[jax.Array], shape: tuple[int, ...], starts: list[tuple[int, ...]],
                    rate: float, rng: jax.Array) -> list[jax.Array]:
    """Returns dropout of an array of `shape` of which the xs are windows (xs[i] starting at
    starts[i]): each window's mask is that array's reference mask, sliced."""
    if rate == 1.0:  # as the reference: no x / 0
        return [jnp.zeros_like(x) for x in xs]
    keep_prob = 1.0 - rate
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


def dropout(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Returns inverted dropout of x with the reference's mask."""
    return dropout_windows([x], x.shape, [(0,) * x.ndim], rate, rng)[0]


def batch_halves_einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """Returns jnp.einsum(spec, a, b) batched over the leading axis of both, as two einsums over
    the batch halves (four pieces were slower than two). Rows never mix: the same values."""
    if a.shape[0] % 2:
        return jnp.einsum(spec, a, b)
    halves = zip(jnp.split(a, 2), jnp.split(b, 2), strict=True)
    return jnp.concatenate([jnp.einsum(spec, x, y) for x, y in halves])


def query_blocks(T: int) -> int:
    """Returns how many blocks of queries attention over T positions goes in: blocks of
    ATTENTION_BLOCK when T is a multiple of it and at least twice it, else one. Measured at
    T = 256; blocks of 64 were slower (0.91x against blocks of 128)."""
    if T % ATTENTION_BLOCK or T < 2 * ATTENTION_BLOCK:
        return 1
    return T // ATTENTION_BLOCK


def causal_attention(q_BTHK: jax.Array, k_BTHK: jax.Array, v_BTHK: jax.Array, *,
                     dropout_rate: float, rng: jax.Array | None, dtype,
                     segments_BT: jax.Array | None = None) -> jax.Array:
    """Returns causal softmax attention, (B, T, H, K), in blocks of queries.

    Query block i scores only the key blocks 0..i: the blocks above the diagonal are masked
    whole. Each row's softmax spans the same keys as the whole (T, T) matrix would, and
    dropout draws that matrix's masks, sliced. segments_BT: the reference's document mask.
    """
    B, T, H, K = q_BTHK.shape
    n = query_blocks(T)
    Tb = T // n
    qs, ks, vs = (jnp.split(a, n, axis=1) for a in (q_BTHK, k_BTHK, v_BTHK))
    probs = []
    for i in range(n):
        scores_BHTS = jnp.concatenate([batch_halves_einsum("bthk,bshk->bhts", qs[i], k)
                                       for k in ks[:i + 1]], axis=-1) / math.sqrt(K)
        visible = jnp.arange((i + 1) * Tb)[None, :] <= (i * Tb + jnp.arange(Tb))[:, None]
        if segments_BT is not None:
            visible = visible & reference.same_document(
                segments_BT, slice(i * Tb, (i + 1) * Tb), slice(0, (i + 1) * Tb))
        probs.append(reference.masked_softmax(scores_BHTS, visible, dtype))
    if rng is not None:
        probs = dropout_windows(probs, (B, H, T, T), [(0, 0, i * Tb, 0) for i in range(n)],
                                dropout_rate, rng)
    ys = []
    for i, probs_BHTS in enumerate(probs):
        parts = jnp.split(probs_BHTS, i + 1, axis=-1)
        y_BTHK = batch_halves_einsum("bhts,bshk->bthk", parts[0], vs[0])
        for p_BHTS, v_BTHK in zip(parts[1:], vs[1:i + 1], strict=True):
            y_BTHK = y_BTHK + batch_halves_einsum("bhts,bshk->bthk", p_BHTS, v_BTHK)
        ys.append(y_BTHK)
    return ys[0] if n == 1 else jnp.concatenate(ys, axis=1)
