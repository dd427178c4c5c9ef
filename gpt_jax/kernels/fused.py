"""Kernels for GPUs and TPUs: jax.nn.dot_product_attention; the rest is the reference's.

The op is XLA's attention (jax 0.10 runs cuDNN's flash attention only when asked with
implementation="cudnn", which this set does not do yet; benchmarks/attention_check.py reports
which one a device compiled to). It has no attention dropout, so with
dropout on, attention falls back to the written-out reference.
"""

import jax

from gpt_jax.kernels import reference

dense = reference.dense
logits = reference.logits
dropout = reference.dropout


def causal_attention(q_BTHK: jax.Array, k_BTHK: jax.Array, v_BTHK: jax.Array, *,
                     dropout_rate: float, rng: jax.Array | None, dtype,
                     segments_BT: jax.Array | None = None) -> jax.Array:
    """Returns causal softmax attention, (B, T, H, K), by one fused op (dropout: reference);
    segments_BT (documents) becomes the op's mask."""
    if rng is not None:  # None: dropout off (deterministic, or a rate of 0)
        return reference.causal_attention(q_BTHK, k_BTHK, v_BTHK, dropout_rate=dropout_rate,
                                          rng=rng, dtype=dtype, segments_BT=segments_BT)
    mask = None if segments_BT is None else reference.same_document(
        segments_BT, slice(None), slice(None))
    return jax.nn.dot_product_attention(q_BTHK, k_BTHK, v_BTHK, mask=mask, is_causal=True)
