"""Token generation from a trained GPT with one compiled next-token step (fixed shapes)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax.errors import UserError
from gpt_jax.model import GPT, GPTConfig


def check_options(max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    """Raises UserError for sampling options that cannot work."""
    if max_new_tokens <= 0:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be at least 1 (leave it out to sample from all), got {top_k}")


def sample_from_logits(logits_BV: jax.Array, rng: jax.Array, temperature: jax.Array,
                       top_k: int | None) -> jax.Array:
    """Returns one token id per row: argmax when temperature is 0, else a top-k sample."""
    greedy_B = jnp.argmax(logits_BV, axis=-1)
    scaled_BV = logits_BV / jnp.maximum(temperature, 1e-6)
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = jax.lax.top_k(scaled_BV, top_k)[0][:, -1:]
        scaled_BV = jnp.where(scaled_BV < kth_B1, -jnp.inf, scaled_BV)
    sampled_B = jax.random.categorical(rng, scaled_BV, axis=-1)
    return jnp.where(temperature == 0, greedy_B, sampled_B).astype(jnp.int32)


@functools.cache
def next_token_fn(config: GPTConfig, top_k: int | None):
    """Returns the jitted step (params, window, length, rng, temperature) -> (window, length, token).

    The window holds the last block_size tokens, left-aligned and padded on the right; the
    causal mask keeps the padding from touching the logits at length - 1. When the window is
    full it slides left by one, so generation goes on past block_size as nanoGPT's crop does.
    Every argument is an array of fixed shape, so the step compiles once per (config, top_k).
    """
    model = GPT(config)

    def step(params, window_BT, length, rng, temperature):
        logits_BTV = model.apply({"params": params}, window_BT)
        last_BV = jax.lax.dynamic_index_in_dim(logits_BTV, length - 1, axis=1, keepdims=False)
        token_B = sample_from_logits(last_BV, rng, temperature, top_k)
        full = length == window_BT.shape[1]
        window_BT = jnp.where(full, jnp.roll(window_BT, -1, axis=1), window_BT)
        pos = jnp.where(full, length - 1, length)
        window_BT = jax.lax.dynamic_update_index_in_dim(window_BT, token_B, pos, axis=1)
        return window_BT, jnp.minimum(length + 1, window_BT.shape[1]), token_B

    return jax.jit(step, donate_argnums=1)


def generate(params, config: GPTConfig, prompt: list[int], *, num_samples: int = 1,
             max_new_tokens: int = 100, temperature: float = 1.0, top_k: int | None = None,
             seed: int = 0) -> np.ndarray:
    """Returns (num_samples, len(prompt) + max_new_tokens) token ids, the prompt included.

    The model sees at most the last block_size tokens (a longer prompt is cropped).
    """
    check_options(max_new_tokens, temperature, top_k)
    if not prompt:
        raise UserError("the prompt is empty: give at least one token")
    step = next_token_fn(config, top_k)
    context = prompt[-config.block_size:]
    window = np.zeros((num_samples, config.block_size), dtype=np.int32)
    window[:, : len(context)] = context
    window, length = jnp.asarray(window), jnp.asarray(len(context), jnp.int32)
    temperature = jnp.asarray(temperature, jnp.float32)
    key = jax.random.PRNGKey(seed)
    new_tokens = []
    for i in range(max_new_tokens):
        window, length, token = step(params, window, length, jax.random.fold_in(key, i),
                                     temperature)
        new_tokens.append(token)
    new = np.stack(jax.device_get(new_tokens), axis=1)
    return np.concatenate([np.tile(np.asarray(prompt, np.int32), (num_samples, 1)), new], axis=1)
