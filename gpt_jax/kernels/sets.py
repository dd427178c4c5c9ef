"""The one room for backend-specific implementations: the model calls these, never a backend.

A kernel set is a handful of functions with plain signatures (see `Kernels`). Three exist:

  reference  the textbook versions (lax.dot_general, one masked softmax over the whole (T, T)
             scores, jax.random dropout): the oracle every other set is tested against.
  cpu        the same numbers, faster on XLA:CPU (see cpu.py): a Dense weight gradient taken the
             fast way round, matmuls on the (B*T, D) matrix view, blocked causal attention in
             batch halves, dropout masks from a fused Threefry (bit for bit jax.random's).
  fused      jax.nn.dot_product_attention (XLA's attention; see fused.py); the rest reference.

`model.kernels` picks one; a run resolves `auto` once, with the compute dtype, in
config.resolve_backend_fields: cpu on XLA:CPU, fused on GPUs and TPUs. (A GPTConfig built
directly, e.g. by sampling from a checkpoint, resolves it in `select`, on the default backend.)
"""

import dataclasses
from collections.abc import Callable

import jax

from gpt_jax.kernels import cpu, fused, reference

KERNEL_SETS = ("auto", "reference", "cpu", "fused")
ATTENTIONS = ("auto", "fused", "einsum")  # model.attention, the older switch (see select)


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The functions the model calls; each set's module documents its own."""

    name: str
    dense: Callable  # (x_BTD, kernel_DF, bias_F | None) -> x @ kernel + bias
    logits: Callable  # (x_BTD, embedding_VD) -> x @ embedding.T (the tied LM head)
    dropout: Callable  # (x, rate, rng) -> inverted dropout of x
    # (q_BTHK, k_BTHK, v_BTHK, *, dropout_rate, rng (None: no dropout), dtype,
    # segments_BT=None (each position's document: a block-diagonal causal mask)) -> y_BTHK
    causal_attention: Callable
    # (q_BTHK, k_BNSK, v_BNSK, positions_BT, *, dropout_rate, rng, dtype, segments=None)
    # -> y_BTHK: queries at positions_BT over a KV cache of S positions and N heads (N divides
    # H: grouped-query attention) (decode); the same in every set
    cached_attention: Callable = reference.cached_attention


def _of(module, name: str) -> Kernels:
    return Kernels(name, dense=module.dense, logits=module.logits, dropout=module.dropout,
                   causal_attention=module.causal_attention)


SETS = {"reference": _of(reference, "reference"), "cpu": _of(cpu, "cpu"),
        "fused": _of(fused, "fused")}


def resolve(name: str, backend: str) -> str:
    """Returns the kernel set `model.kernels` names on `backend` (resolving "auto")."""
    if name != "auto":
        return name
    return "cpu" if backend == "cpu" else "fused"


def select(name: str = "auto", attention: str = "auto") -> Kernels:
    """Returns the kernel set `name`; "auto" is resolved for the default backend.

    `attention` is model.attention, the switch that came before `kernels`: "fused" swaps in
    the fused attention, "einsum" the set's written-out one (reference in the fused set),
    "auto" keeps the set's own.
    """
    chosen = SETS[resolve(name, jax.default_backend()) if name == "auto" else name]
    if attention == "fused":
        return dataclasses.replace(chosen, causal_attention=fused.causal_attention)
    if attention == "einsum" and chosen.name == "fused":
        return dataclasses.replace(chosen, causal_attention=reference.causal_attention)
    return chosen
