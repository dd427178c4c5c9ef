"""The largest micro-batch whose train step fits in device memory, and the gradient
accumulation that makes one optimizer step a given number of tokens."""

from collections.abc import Callable
from typing import TypeVar

import jax

from gpt_jax.errors import UserError

T = TypeVar("T")

# nanoGPT's and llm.c's GPT-2 recipe: about half a million tokens per optimizer step.
TOKENS_PER_STEP = 2**19


def grad_accum_steps(micro_batch: int, block_size: int, tokens_per_step: int) -> int:
    """Returns the micro-batches per optimizer step nearest tokens_per_step tokens (>= 1)."""
    return max(1, round(tokens_per_step / (micro_batch * block_size)))


def candidates(max_batch: int, block_size: int, tokens_per_step: int, shards: int = 1
               ) -> list[int]:
    """Returns the micro-batch sizes to try, largest first.

    Args:
      max_batch: the largest micro-batch per device to try.
      block_size: tokens per sequence.
      tokens_per_step: tokens of one optimizer step; no micro-batch holds more.
      shards: devices the batch is split over (sharding.n_batch_shards).

    Returns:
      shards x each power of two up to max_batch, largest first, none holding more than
      tokens_per_step tokens.
    """
    most = min(max_batch, tokens_per_step // (block_size * shards))
    if most < 1:
        raise UserError(f"tokens_per_step={tokens_per_step} is less than one sequence of "
                        f"block_size={block_size} per device ({shards} device(s)): raise "
                        "--tokens_per_step or lower block_size")
    return [shards * 2**k for k in range(most.bit_length() - 1, -1, -1)]


def largest_fitting(try_batch: Callable[[int, int], T | None], sizes: list[int],
                    block_size: int, tokens_per_step: int) -> tuple[int, int, T]:
    """Returns the first micro-batch of `sizes` whose train step fits, with its accumulation.

    Args:
      try_batch: (micro_batch, grad_accum_steps) -> whatever the caller keeps of a train
        step that compiled and ran, or None when it ran out of memory.
      sizes: micro-batch sizes, largest first (see candidates).
      block_size: tokens per sequence.
      tokens_per_step: the tokens one optimizer step should see.

    Returns:
      (micro_batch, grad_accum_steps, try_batch's result) of the first size that fits.
    """
    for micro_batch in sizes:
        accum = grad_accum_steps(micro_batch, block_size, tokens_per_step)
        result = try_batch(micro_batch, accum)
        if result is not None:
            return micro_batch, accum, result
    raise UserError(f"not even a micro-batch of {sizes[-1]} sequence(s) of block_size="
                    f"{block_size} fits in device memory: lower block_size or the model's size")


def is_out_of_memory(err: BaseException) -> bool:
    """Returns whether err is XLA running out of device memory (at compile or run time)."""
    text = str(err)
    return isinstance(err, jax.errors.JaxRuntimeError) and (
        "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower())
