"""Token generation from a trained GPT: a KV cache, one compiled decode loop, streaming.

Generation is a prefill of the prompts followed by one token per step, both through the model's
decode mode (its `cache` collection); with streaming off a whole sample is one device call
(lax.while_loop). Prompts are right-padded to a bucket length (powers of two from 16 up to
block_size), so the program compiles once per (batch, bucket, max_new_tokens, top_k, top_p on or
off): a new prompt length within its bucket, a temperature, a top_p value or a seed reuse it.
Rows of a batch may have prompts of different lengths: each has its own cache index. The cache
starts short and grows (cache_lengths), so that a step's attention reads the positions a row can
have, not the whole block.

Past block_size the window slides: when a row's cache is full, its last `window_keep` tokens
(the newest included; default block_size // 2) are prefilled again from position 0 and decoding
goes on, so the model always sees between window_keep and block_size tokens. window_keep =
block_size reproduces nanoGPT's crop idx[:, -block_size:] exactly, at the cost of one full
forward per token past the window; half a block costs one half-block prefill every
block_size // 2 tokens, which keeps the cache's speed on long samples.
"""

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax.errors import UserError
from gpt_jax.model import GPT, GPTConfig, cache_batch_axis, cache_length, grow_cache, init_cache

PyTree = Any
MIN_BUCKET = 16
MIN_CACHE = 256  # the decode cache's first length (at least the prompt bucket); see cache_lengths
CACHE_GROWTH = 4


def check_options(max_new_tokens: int, temperature: float, top_k: int | None = None,
                  top_p: float | None = None) -> None:
    """Raises UserError for sampling options that cannot work."""
    if max_new_tokens <= 0:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise UserError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be at least 1 (leave it out to sample from all), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1] (1 keeps every token), got {top_p}")


def check_window_keep(config: GPTConfig, window_keep: int | None = None) -> int:
    """Returns the tokens kept when the window slides past block_size (None: half a block)."""
    keep = config.block_size // 2 if window_keep is None else window_keep
    if not 1 <= keep <= config.block_size:
        raise UserError(f"window_keep must be in [1, block_size={config.block_size}], got {keep}")
    return keep


def sample_from_logits(logits_BV: jax.Array, rng: jax.Array, temperature: jax.Array,
                       top_k: int | None = None, top_p: jax.Array | None = None) -> jax.Array:
    """Returns one token id per row: argmax when temperature is 0, else a top-k/top-p sample.

    top-k keeps the k largest logits; top-p then keeps the smallest set of the most likely
    tokens whose probability (after temperature) adds up to at least top_p. Ties at either
    cut-off are all kept.
    """
    def greedy():
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

    def draw():
        return _draw(logits_BV, rng, temperature, top_k, top_p)

    # A greedy row (temperature 0) skips the draw: its random bits are a vocab-wide Threefry.
    return jax.lax.cond(temperature == 0, greedy, draw)


def _draw(logits_BV, rng, temperature, top_k, top_p):
    scaled_BV = logits_BV / jnp.maximum(temperature, 1e-6)
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = jax.lax.top_k(scaled_BV, top_k)[0][:, -1:]
        scaled_BV = jnp.where(scaled_BV < kth_B1, -jnp.inf, scaled_BV)
    if top_p is not None:
        sorted_BV = -jnp.sort(-scaled_BV, axis=-1)
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of the likelier tokens
        cutoff_B1 = jnp.min(jnp.where(before_BV < top_p, sorted_BV, jnp.inf), -1, keepdims=True)
        scaled_BV = jnp.where(scaled_BV < cutoff_B1, -jnp.inf, scaled_BV)
    return jax.random.categorical(rng, scaled_BV, axis=-1).astype(jnp.int32)


class Options(NamedTuple):
    """Sampling options as traced arrays: a new value reuses the compiled program."""

    key: jax.Array
    temperature: jax.Array  # float32, 0 is greedy
    top_p: jax.Array  # float32, used only when the program was built with top_p on
    stop_token: jax.Array  # int32; a row that produced it repeats it; -1 for none


class DecodeState(NamedTuple):
    """Where generation stands between two steps."""

    cache: PyTree  # the model's `cache` collection; cache["index"] is each row's length
    context_BS: jax.Array  # the tokens whose keys and values the cache holds, left-aligned
    token_B: jax.Array  # the newest token, not yet fed to the model
    step: jax.Array  # tokens generated so far
    done_B: jax.Array  # rows that produced stop_token


def _choose(logits_BV, step, opts: Options, done_B, top_k, nucleus):
    """Returns (token_B, done_B): the token of generation step `step` for every row."""
    token_B = sample_from_logits(logits_BV, jax.random.fold_in(opts.key, step),
                                 opts.temperature, top_k, opts.top_p if nucleus else None)
    token_B = jnp.where(done_B, opts.stop_token, token_B)
    return token_B, done_B | (token_B == opts.stop_token)


def _last(logits_BTV, lengths_B):
    return jnp.take_along_axis(logits_BTV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]


def cache_lengths(bucket: int, max_new_tokens: int, block_size: int) -> tuple[int, ...]:
    """Returns the lengths the decode cache takes in turn, while a sample of max_new_tokens
    after a prompt of `bucket` (padded) tokens runs: attention reads the whole cache at every
    step, so the cache starts short and grows as the rows lengthen.

    It starts at the prompt bucket, at least MIN_CACHE (or a quarter block, if less), and grows
    CACHE_GROWTH-fold until it holds the prompt and the new tokens, or reaches block_size (where
    the window slides). Each length is one more compiled copy of the decode step; growing 4-fold
    keeps them few.
    """
    need = min(block_size, bucket + max_new_tokens)
    length = min(block_size, max(bucket, min(MIN_CACHE, block_size // CACHE_GROWTH)))
    lengths = [length]
    while length < need:
        length = min(block_size, length * CACHE_GROWTH)
        lengths.append(length)
    return tuple(lengths)


@functools.cache
def _decoder(config: GPTConfig, top_k: int | None, nucleus: bool, keep: int):
    """Returns the pure functions shared by the compiled loop and streaming:

    prefill(params, prompt_BP, lengths_B, opts, length) -> DecodeState holding the first new
      token, its cache `length` positions long;
    decode(params, state, opts) -> DecodeState: feeds the newest token, samples the next one
      (every row must have room in its cache);
    grow(state, length) -> DecodeState: the same, its cache `length` positions long;
    slide(params, state) -> DecodeState: rows whose cache is full (block_size) keep their last
      keep - 1 tokens, prefilled again from position 0, so that decode then sees keep tokens.
    The slide is a separate function, not a lax.cond inside decode: a cond would copy the whole
    cache on every step instead of updating it in place.
    """
    model, S = GPT(config), config.block_size

    def extend(params, cache, idx_BT, lengths_B=None):
        logits_B1V, mutated = model.apply({"params": params, "cache": cache}, idx_BT,
                                          decode=True, lengths_B=lengths_B, last_only=True,
                                          mutable=["cache"])
        return logits_B1V[:, 0], mutated["cache"]

    def prefill(params, prompt_BP, lengths_B, opts, length):
        B, P = prompt_BP.shape
        logits_BV, cache = extend(params, init_cache(config, B, length), prompt_BP, lengths_B)
        context_BS = jnp.zeros((B, S), jnp.int32).at[:, :P].set(prompt_BP)
        token_B, done_B = _choose(logits_BV, 0, opts, jnp.zeros(B, bool), top_k, nucleus)
        return DecodeState(cache, context_BS, token_B, jnp.int32(1), done_B)

    def decode(params, state, opts):
        B = state.token_B.shape[0]
        index_B = state.cache["index"]
        logits_BV, cache = extend(params, state.cache, state.token_B[:, None])
        context_BS = state.context_BS.at[jnp.arange(B), index_B].set(state.token_B)
        token_B, done_B = _choose(logits_BV, state.step, opts, state.done_B, top_k, nucleus)
        return DecodeState(cache, context_BS, token_B, state.step + 1, done_B)

    def grow(state, length):
        return state._replace(cache=grow_cache(state.cache, length))

    def slide(params, state):
        B = state.token_B.shape[0]
        full_B = state.cache["index"] >= S
        kept_BK = state.context_BS[:, S - keep + 1:]
        context_BS = jnp.zeros((B, S), jnp.int32).at[:, : keep - 1].set(kept_BK)
        cache = {**state.cache, "index": jnp.zeros(B, jnp.int32)}
        if keep > 1:
            cache = extend(params, cache, kept_BK)[1]
        def pick(path, new, old):  # the new rows where full_B, along each array's rows axis
            shape = [1] * new.ndim
            shape[cache_batch_axis(path)] = B
            return jnp.where(full_B.reshape(shape), new, old)

        cache = jax.tree_util.tree_map_with_path(pick, cache, state.cache)
        context_BS = jnp.where(full_B[:, None], context_BS, state.context_BS)
        return state._replace(cache=cache, context_BS=context_BS)

    return prefill, decode, grow, slide


@functools.cache
def compiled_fns(config: GPTConfig, top_k: int | None, nucleus: bool, keep: int):
    """Returns the jitted (generate, prefill, decode, grow, slide) of one program family.

    generate(params, prompt_BP, lengths_B, opts, max_new_tokens) -> (B, max_new_tokens) ids is
    the whole sample in one device call: prefill, then for each of cache_lengths but the last a
    lax.while_loop of decode steps until a row fills the cache, which then grows. At the last
    length, block_size, an outer lax.while_loop slides the full rows and runs an inner one of
    decode steps until a row is full again. It stops early once every row has produced the stop
    token. Streaming calls the other four.
    """
    prefill, decode, grow, slide = _decoder(config, top_k, nucleus, keep)
    S = config.block_size

    def generate(params, prompt_BP, lengths_B, opts, max_new_tokens):
        lengths = cache_lengths(prompt_BP.shape[1], max_new_tokens, S)
        state = prefill(params, prompt_BP, lengths_B, opts, lengths[0])
        fill = jnp.maximum(opts.stop_token, 0)
        out_BN = jnp.full((prompt_BP.shape[0], max_new_tokens), fill, jnp.int32)
        out_BN = out_BN.at[:, 0].set(state.token_B)

        def running(carry):
            state, _ = carry
            return (state.step < max_new_tokens) & ~state.done_B.all()

        def room(carry):
            cache = carry[0].cache
            return running(carry) & (cache["index"] < cache_length(cache)).all()

        def one(carry):
            state, out_BN = carry
            state = decode(params, state, opts)
            return state, out_BN.at[:, state.step - 1].set(state.token_B)

        def segment(carry):
            state, out_BN = carry
            state = jax.lax.cond((state.cache["index"] >= S).any(),
                                 lambda s: slide(params, s), lambda s: s, state)
            return jax.lax.while_loop(room, one, (state, out_BN))

        carry = (state, out_BN)
        for length in lengths:
            carry = (grow(carry[0], length), carry[1])
            if length < S:
                carry = jax.lax.while_loop(room, one, carry)
        if lengths[-1] == S:  # the window slides
            carry = jax.lax.while_loop(running, segment, carry)
        return carry[1]

    return (jax.jit(generate, static_argnames="max_new_tokens"),
            jax.jit(prefill, static_argnames="length"),
            jax.jit(decode, donate_argnames="state"),
            jax.jit(grow, static_argnames="length"),
            jax.jit(slide, donate_argnames="state"))


@functools.cache
def next_token_fn(config: GPTConfig, top_k: int | None, nucleus: bool, keep: int):
    """Returns the jitted full-recompute step, the reference the KV cache is tested against:

    (params, window_BS, lengths_B, step, opts, done_B) -> (window_BS, lengths_B, token_B, done_B).
    Each row's window holds its last tokens, left-aligned and padded on the right; the whole
    window goes through the model for every token (nanoGPT's cost), and slides as the cache does.
    """
    model, S = GPT(config), config.block_size

    def step(params, window_BS, lengths_B, i, opts, done_B):
        B = window_BS.shape[0]
        logits_BV = _last(model.apply({"params": params}, window_BS), lengths_B)
        token_B, done_B = _choose(logits_BV, i, opts, done_B, top_k, nucleus)
        full_B = lengths_B == S
        window_BS = jnp.where(full_B[:, None], jnp.roll(window_BS, keep - 1 - S, axis=1),
                              window_BS)
        lengths_B = jnp.where(full_B, keep - 1, lengths_B)
        window_BS = window_BS.at[jnp.arange(B), lengths_B].set(token_B)
        return window_BS, lengths_B + 1, token_B, done_B

    return jax.jit(step, donate_argnums=1)


def prompt_bucket(length: int, block_size: int) -> int:
    """Returns the padded prompt length: the next power of two (at least 16), at most block_size."""
    return min(block_size, max(MIN_BUCKET, 1 << (length - 1).bit_length()))


def _setup(config, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_token,
           window_keep):
    """Checks the options; returns (padded prompts, lengths, Options, static program key)."""
    check_options(max_new_tokens, temperature, top_k, top_p)
    keep = check_window_keep(config, window_keep)
    if not prompts or not all(len(p) for p in prompts):
        raise UserError("a prompt is empty: give at least one token")
    rows = [list(p)[-config.block_size:] for p in prompts]  # the model sees the last block_size
    lengths_B = np.array([len(r) for r in rows], np.int32)
    bucket = prompt_bucket(int(lengths_B.max()), config.block_size)
    prompt_BP = np.zeros((len(rows), bucket), np.int32)
    for row, tokens in zip(prompt_BP, rows):
        row[: len(tokens)] = tokens
    top_k = None if top_k is None or top_k >= config.vocab_size else top_k
    nucleus = top_p is not None and top_p < 1.0
    opts = Options(jax.random.PRNGKey(seed), jnp.float32(temperature),
                   jnp.float32(1.0 if top_p is None else top_p),
                   jnp.int32(-1 if stop_token is None else stop_token))
    return prompt_BP, lengths_B, opts, (config, top_k, nucleus, keep)


def generate(params, config: GPTConfig, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int = 100, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, stop_token: int | None = None,
             window_keep: int | None = None, use_cache: bool = True) -> np.ndarray:
    """Returns the (len(prompts), max_new_tokens) new token ids, one row per prompt.

    Args:
      prompts: token ids, one list per row (lengths may differ); a prompt longer than
        block_size is cropped to its last block_size tokens.
      temperature: 0 is greedy. top_k / top_p: keep the k most likely tokens / the nucleus
        of probability top_p (None: all).
      seed: rows draw different tokens from one seed; the same seed gives the same tokens.
      stop_token: a row that produces it repeats it to the end (e.g. <|endoftext|>); the loop
        ends early once every row has.
      window_keep: tokens kept when the window slides past block_size (module docstring).
      use_cache: False recomputes the whole window for every token (the slow reference).
    """
    prompt_BP, lengths_B, opts, program = _setup(
        config, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_token,
        window_keep)
    if not use_cache:
        return _generate_by_recompute(params, program, prompt_BP, lengths_B, opts,
                                      max_new_tokens)
    run = compiled_fns(*program)[0]
    return np.asarray(run(params, prompt_BP, lengths_B, opts, max_new_tokens=max_new_tokens))


def stream(params, config: GPTConfig, prompts: Sequence[Sequence[int]], *,
           max_new_tokens: int = 100, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, seed: int = 0, stop_token: int | None = None,
           window_keep: int | None = None) -> Iterator[np.ndarray]:
    """Yields the (len(prompts),) next token of every row as it is produced.

    The tokens are those `generate` returns for the same arguments, one device call per step:
    the prefill compiles once per (batch, bucket, first cache length), decode once per batch
    and cache length (cache_lengths), grow and slide once per batch and length.
    """
    prompt_BP, lengths_B, opts, program = _setup(
        config, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_token,
        window_keep)
    _, prefill, decode, grow, slide = compiled_fns(*program)
    lengths = list(cache_lengths(prompt_BP.shape[1], max_new_tokens, config.block_size))
    state = prefill(params, prompt_BP, lengths_B, opts, length=lengths.pop(0))
    for step in range(1, max_new_tokens + 1):
        token_B, done_B, index_B = jax.device_get((state.token_B, state.done_B,
                                                   state.cache["index"]))
        yield token_B
        if step == max_new_tokens or done_B.all():
            return
        if (index_B >= config.block_size).any():
            state = slide(params, state)
        elif (index_B >= cache_length(state.cache)).any():
            state = grow(state, length=lengths.pop(0))
        state = decode(params, state, opts)


def _generate_by_recompute(params, program, prompt_BP, lengths_B, opts, max_new_tokens):
    config = program[0]
    step = next_token_fn(*program)
    B, P = prompt_BP.shape
    window_BS = jnp.asarray(np.pad(prompt_BP, ((0, 0), (0, config.block_size - P))))
    lengths_B, done_B = jnp.asarray(lengths_B), jnp.zeros(B, bool)
    tokens = []
    for i in range(max_new_tokens):
        window_BS, lengths_B, token_B, done_B = step(params, window_BS, lengths_B, jnp.int32(i),
                                                     opts, done_B)
        tokens.append(token_B)
        if i % 8 == 7 and bool(done_B.all()):  # a sync every 8 steps keeps dispatch async
            break
    out_BN = np.full((B, max_new_tokens), max(int(opts.stop_token), 0), np.int32)
    out_BN[:, : len(tokens)] = np.stack(jax.device_get(tokens), axis=1)
    return out_BN


# --------------------------------------------------------------------------- text


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Returns where the stop string that ends first in `text` begins (None: no stop)."""
    ends = [(p + len(s), p) for s in stops if s and (p := text.find(s)) >= 0]
    return min(ends)[1] if ends else None


def _unsettled(text: str, stops: Sequence[str]) -> int:
    """Returns how many trailing characters of `text` may still change or begin a stop string."""
    settled = text.rstrip("\ufffd")  # an incomplete UTF-8 character may still be completed
    held = max((k for s in stops for k in range(1, len(s)) if settled.endswith(s[:k])), default=0)
    return len(text) - len(settled) + held


def truncate(ids: Sequence[int], decode: Callable[[list[int]], str], stops: Sequence[str] = (),
             stop_token: int | None = None) -> tuple[list[int], str]:
    """Returns (ids, text) of one generated row, cut before stop_token and the first stop string.

    The stop string that is complete first (the one that ends first) wins, as in streaming; the
    ids kept are those whose text lies wholly before the cut.
    """
    ids = [int(i) for i in ids]
    if stop_token is not None and stop_token in ids:
        ids = ids[: ids.index(stop_token)]
    text = decode(ids)
    cut = _first_stop(text, stops)
    if cut is None:
        return ids, text
    text, n = text[:cut], 0
    while n < len(ids) and text.startswith(decode(ids[: n + 1])):
        n += 1
    return ids[:n], text


def stream_text(tokens: Iterator[np.ndarray], decode: Callable[[list[int]], str],
                stops: Sequence[str] = (), stop_token: int | None = None) -> Iterator[str]:
    """Yields the text of row 0 piece by piece as `tokens` (from `stream`) arrive.

    The pieces add up to truncate(...)[1] of the same tokens: text that might still become a
    stop string, or an incomplete UTF-8 character, is held back until it is settled.
    """
    ids, shown, text = [], 0, ""
    for token_B in tokens:
        if int(token_B[0]) == stop_token:
            break
        ids.append(int(token_B[0]))
        text = decode(ids)
        cut = _first_stop(text, stops)
        if cut is not None:
            if cut > shown:
                yield text[shown:cut]
            return
        settled = len(text) - _unsettled(text, stops)
        if settled > shown:
            yield text[shown:settled]
            shown = settled
    if len(text) > shown:
        yield text[shown:]


def records(texts: Sequence[str], prompts: Sequence[list[int]], tokens_BN: np.ndarray,
            decode: Callable[[list[int]], str], stops: Sequence[str] = (),
            stop_token: int | None = None, seconds: float = 0.0) -> list[dict]:
    """Returns one record per row: prompt, prompt_tokens, text and tokens (the generated part,
    cut by truncate) and tokens_per_sec (steps the loop ran per second: rows advance together).
    """
    steps = tokens_BN.shape[1] if stop_token is None else max(  # the loop ends once all stopped
        list(row).index(stop_token) + 1 if stop_token in row else len(row) for row in tokens_BN)
    rate = round(steps / seconds, 2) if seconds > 0 else None
    out = []
    for text, prompt, row in zip(texts, prompts, tokens_BN):
        ids, generated = truncate(row, decode, stops, stop_token)
        out.append({"prompt": text, "prompt_tokens": list(prompt), "text": generated,
                    "tokens": ids, "tokens_per_sec": rate})
    return out


@contextlib.contextmanager
def compile_watch():
    """Yields a record whose .count and .seconds sum JAX's compilations inside the block."""

    class Record:
        count, seconds = 0, 0.0

    record = Record()

    def listener(event: str, duration: float, **_):
        if event.startswith("/jax/core/compile/"):
            record.seconds += duration
            record.count += event == "/jax/core/compile/backend_compile_duration"

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield record
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
