"""Whether the fused attention kernel agrees with the reference kernel on this device.

Both run causal attention on the same random (B, T, H, K) queries, keys and values in the
compute dtype, forward and backward (a random cotangent); the check compares the outputs and
the three gradients. A tensor's difference is measured against its own scale:
max |fused - reference| / max |reference|. Different summation orders, the reference's scores
rounded to the compute dtype before its float32 softmax, and each result's rounding make
honest kernels differ by an epsilon or two of that dtype (about 0.6% in bfloat16 on XLA:CPU);
a wrong mask or scale differs by tens of percent.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax.kernels import sets as kernels

# Four epsilons of the mantissa the matmuls keep: bfloat16's 2^-7, float16's 2^-10, and
# TF32's 2^-10 for float32 (GPU matmuls in float32 may run in TF32 at default precision).
TOLERANCE = {"bfloat16": 2**-5, "float16": 2**-8, "float32": 2**-8}
TENSORS = ("output", "grad_q", "grad_k", "grad_v")


class AttentionCheck(NamedTuple):
    """The fused kernel's differences from the reference, each relative to its tensor's scale."""

    diffs: dict[str, float]  # TENSORS -> max |fused - reference| / max |reference|
    tolerance: float
    implementation: str  # what the fused kernel compiled to: "cuDNN" or "XLA"

    @property
    def max_diff(self) -> float:
        return max(self.diffs.values())

    @property
    def passed(self) -> bool:
        return self.max_diff <= self.tolerance


class AttentionMismatch(Exception):
    """The fused attention kernel disagrees with the reference: the benchmark exits 1."""

    exit_code = 1


def compare(shape_BTHK: tuple[int, int, int, int], dtype: str,
            fused: Callable | None = None, reference: Callable | None = None,
            seed: int = 0) -> AttentionCheck:
    """Returns how far the fused kernel's causal attention lies from the reference's.

    Args:
      shape_BTHK: batch, sequence length, heads, head size of the queries, keys and values.
      dtype: the compute dtype ("bfloat16", "float16", "float32").
      fused, reference: causal_attention functions of kernel sets (default: the fused and
        reference sets'); a test passes a broken one.
      seed: of the random inputs (standard normal) and cotangent.

    Returns:
      The relative differences of the output and of the gradients with respect to q, k, v,
      the dtype's tolerance, and whether the fused kernel compiled to a cuDNN call.
    """
    fused = fused or kernels.SETS["fused"].causal_attention
    reference = reference or kernels.SETS["reference"].causal_attention
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q_BTHK, k_BTHK, v_BTHK, cotangent_BTHK = (
        jax.random.normal(key, shape_BTHK, jnp.float32).astype(dtype) for key in keys)
    ours, hlo = _value_and_grads(fused, dtype, q_BTHK, k_BTHK, v_BTHK, cotangent_BTHK)
    theirs, _ = _value_and_grads(reference, dtype, q_BTHK, k_BTHK, v_BTHK, cotangent_BTHK)
    diffs = {}
    for name, a, b in zip(TENSORS, ours, theirs, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        diffs[name] = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
    implementation = "cuDNN" if "__cudnn$fmha" in hlo else "XLA"
    return AttentionCheck(diffs, TOLERANCE[dtype], implementation)


def _value_and_grads(attention: Callable, dtype: str, q_BTHK, k_BTHK, v_BTHK, cotangent_BTHK
                     ) -> tuple[tuple[jax.Array, ...], str]:
    """Returns ((y, dq, dk, dv), the lowered program's text) of one kernel on this device."""
    def forward(q, k, v):
        return attention(q, k, v, dropout_rate=0.0, rng=None, dtype=jnp.dtype(dtype))

    def value_and_grads(q, k, v, cotangent):
        y, vjp = jax.vjp(forward, q, k, v)
        return (y, *vjp(cotangent))

    lowered = jax.jit(value_and_grads).lower(q_BTHK, k_BTHK, v_BTHK, cotangent_BTHK)
    # A cuDNN attention would be named in the lowered program (jax 0.10 picks XLA's unless
    # asked for implementation="cudnn").
    return lowered.compile()(q_BTHK, k_BTHK, v_BTHK, cotangent_BTHK), lowered.as_text()


def report(check: AttentionCheck, shape_BTHK: tuple[int, ...], dtype: str) -> str:
    """Returns the check's lines: each tensor's difference, then PASS or FAIL."""
    lines = [f"attention check: fused ({check.implementation}) vs reference, {dtype}, "
             f"(B, T, H, K) = {tuple(shape_BTHK)}, forward and backward"]
    lines += [f"  {name:<7} max |fused - reference| = {100 * diff:.3f}% of its largest value"
              for name, diff in check.diffs.items()]
    verdict = "PASS" if check.passed else "FAIL"
    lines.append(f"attention check {verdict}: max difference {100 * check.max_diff:.3f}% "
                 f"{'<=' if check.passed else '>'} tolerance {100 * check.tolerance:.3f}% "
                 f"({dtype})")
    return "\n".join(lines)
