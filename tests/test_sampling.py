import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import sampling, tokenization
from gpt_jax.errors import UserError
from gpt_jax.model import GPT, GPTConfig, init_params

CHAR = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32)
BPE = GPTConfig(vocab_size=50257, block_size=16, n_layer=2, n_head=2, n_embd=32)
LONG = GPTConfig(vocab_size=65, block_size=64, n_layer=1, n_head=2, n_embd=32)


@functools.cache
def _params(config: GPTConfig, seed: int = 0):
    """Random parameters, scaled up so that greedy choices are far from ties."""
    return jax.tree.map(lambda p: 5 * p, init_params(config, jax.random.PRNGKey(seed)))


@functools.cache
def _window_forward(config: GPTConfig):
    return jax.jit(lambda params, window: GPT(config).apply({"params": params}, window))


def _reference_greedy(config, prompt, n, keep):
    """nanoGPT's generate, greedy: a full forward on the whole context for every new token.

    The context is the prompt's last block_size tokens; once a new token makes it longer than
    block_size it is cut to its last `keep` (keep = block_size is nanoGPT's idx[:, -block_size:]).
    The context is right-padded to block_size, which causality makes invisible at its last token.
    """
    S, forward = config.block_size, _window_forward(config)
    context, out = list(prompt)[-S:], []
    for _ in range(n):
        window = np.zeros((1, S), np.int32)
        window[0, : len(context)] = context
        out.append(int(np.argmax(forward(_params(config), window)[0, len(context) - 1])))
        context.append(out[-1])
        if len(context) > S:
            context = context[-keep:]
    return out


@pytest.mark.parametrize("config", [CHAR, BPE], ids=["char", "bpe"])
@pytest.mark.parametrize("keep", [16, None], ids=["nanogpt_crop", "half_window"])
def test_greedy_with_cache_equals_full_recompute_across_block_size(config, keep):
    prompt = [3, 1, 4, 1, 5]
    expected = _reference_greedy(config, prompt, 40, keep or 8)  # 45 tokens: 3 block_sizes
    options = {"max_new_tokens": 40, "temperature": 0.0, "window_keep": keep}
    cached = sampling.generate(_params(config), config, [prompt], **options)
    recomputed = sampling.generate(_params(config), config, [prompt], use_cache=False, **options)
    assert cached.shape == (1, 40)
    assert cached[0].tolist() == expected == recomputed[0].tolist()
    assert len(set(expected)) > 5  # a real continuation, not one repeated token


def test_batched_prompts_of_different_lengths_equal_each_alone():
    prompts = [[7], [1, 2, 3, 4, 5, 6, 7, 8, 9], list(range(40, 60))]  # the last is cropped
    batch = sampling.generate(_params(CHAR), CHAR, prompts, max_new_tokens=30, temperature=0.0)
    for prompt, row in zip(prompts, batch):
        alone = sampling.generate(_params(CHAR), CHAR, [prompt], max_new_tokens=30,
                                  temperature=0.0)
        assert row.tolist() == alone[0].tolist() == _reference_greedy(CHAR, prompt, 30, 8)


@pytest.mark.parametrize("config", [CHAR, BPE], ids=["char", "bpe"])
def test_stream_yields_what_generate_returns(config):
    options = {"max_new_tokens": 30, "temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": 7}
    prompts = [[5, 6, 7], [8] * 12]
    tokens = sampling.generate(_params(config), config, prompts, **options)
    streamed = list(sampling.stream(_params(config), config, prompts, **options))
    assert len(streamed) == 30 and all(t.shape == (2,) for t in streamed)
    np.testing.assert_array_equal(np.stack(streamed, axis=1), tokens)
    by_recompute = sampling.generate(_params(config), config, prompts, use_cache=False, **options)
    np.testing.assert_array_equal(by_recompute, tokens)


def test_the_cache_grows_then_the_window_slides_as_full_recompute_does():
    # block 64: the cache is 16 positions, then 64 (cache_lengths), then slides; rows of
    # different lengths fill each length at different steps.
    assert sampling.cache_lengths(16, 100, 64) == (16, 64)
    assert sampling.cache_lengths(16, 8, 64) == (16, 64)  # 16 + 8 new does not fit in 16
    assert sampling.cache_lengths(16, 200, 1024) == (256,)
    assert sampling.cache_lengths(16, 300, 1024) == (256, 1024)
    assert sampling.cache_lengths(512, 10, 1024) == (512, 1024)
    assert sampling.cache_lengths(16, 10, 16) == (16,)
    prompts, options = [[3, 1, 4], [1, 5, 9, 2, 6, 5, 3, 5, 8, 9]], {"max_new_tokens": 80}
    greedy = sampling.generate(_params(LONG), LONG, prompts, temperature=0.0, **options)
    for prompt, row in zip(prompts, greedy):
        assert row.tolist() == _reference_greedy(LONG, prompt, 80, 32)
    sampled = {"temperature": 0.8, "top_k": 10, "seed": 3, **options}
    tokens = sampling.generate(_params(LONG), LONG, prompts, **sampled)
    np.testing.assert_array_equal(
        np.stack(list(sampling.stream(_params(LONG), LONG, prompts, **sampled)), axis=1), tokens)
    by_recompute = sampling.generate(_params(LONG), LONG, prompts, use_cache=False, **sampled)
    np.testing.assert_array_equal(by_recompute, tokens)


def test_no_recompilation_within_a_prompt_bucket():
    params, options = _params(LONG), {"max_new_tokens": 8, "top_k": 5, "top_p": 0.9}
    sampling.generate(params, LONG, [[1, 2, 3]], **options)
    run = sampling.compiled_fns(LONG, 5, True, 32)[0]
    assert run._cache_size() == 1
    with sampling.compile_watch() as compiling:  # lengths 5 and 16 share bucket 16
        sampling.generate(params, LONG, [[1] * 5], **options, temperature=0.5, seed=1)
        sampling.generate(params, LONG, [[2] * 16], **{**options, "top_p": 0.5}, seed=2)
    assert compiling.count == 0 and run._cache_size() == 1
    with sampling.compile_watch() as compiling:  # 17 tokens: bucket 32, a new program
        sampling.generate(params, LONG, [[1] * 17], **options)
    assert compiling.count >= 1 and run._cache_size() == 2
    assert [sampling.prompt_bucket(n, 64) for n in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]


def test_top_k_one_is_greedy():
    greedy = sampling.generate(_params(CHAR), CHAR, [[4]], max_new_tokens=10, temperature=0.0)
    top1 = sampling.generate(_params(CHAR), CHAR, [[4]], max_new_tokens=10, temperature=1.5,
                             top_k=1)
    np.testing.assert_array_equal(greedy, top1)


def test_top_k_never_leaves_the_k_best():
    logits = jnp.log(jnp.array([[0.1, 0.5, 0.05, 0.3, 0.05]]))
    draws = {int(sampling.sample_from_logits(logits, jax.random.PRNGKey(i), jnp.float32(1.0),
                                             2)[0]) for i in range(200)}
    assert draws == {1, 3}


@pytest.mark.parametrize("top_p, nucleus", [
    (0.3, [1]), (0.7, [1, 4]), (0.85, [1, 4, 3]), (0.95, [1, 4, 3, 0]), (1.0, [1, 4, 3, 0, 2]),
])
def test_top_p_never_samples_outside_the_nucleus(top_p, nucleus):
    probs = np.array([0.06, 0.5, 0.04, 0.1, 0.3])  # by probability: tokens 1, 4, 3, 0, 2
    logits = jnp.log(jnp.tile(probs, (4000, 1)))  # 4000 rows: 4000 independent draws
    draws = np.asarray(sampling.sample_from_logits(logits, jax.random.PRNGKey(0),
                                                   jnp.float32(1.0), None, jnp.float32(top_p)))
    assert set(draws.tolist()) == set(nucleus)
    expected = probs[nucleus] / probs[nucleus].sum()  # renormalised inside the nucleus
    observed = np.array([(draws == t).mean() for t in nucleus])
    np.testing.assert_allclose(observed, expected, atol=0.03)


def test_seeds_change_samples_and_batch_rows_differ():
    a = sampling.generate(_params(CHAR), CHAR, [[1]] * 4, max_new_tokens=20, seed=0)
    b = sampling.generate(_params(CHAR), CHAR, [[1]] * 4, max_new_tokens=20, seed=1)
    assert not np.array_equal(a, b) and len({tuple(r) for r in a}) > 1


def test_stop_token_repeats_to_the_end_of_its_row():
    prompts = [[3, 1, 4], [2, 7]]
    free = sampling.generate(_params(CHAR), CHAR, prompts, max_new_tokens=20, temperature=0.0)
    at = next(i for i in range(3, 20) if free[0, i] not in free[0, :i])  # a fresh token
    stop = int(free[0, at])
    for use_cache in (True, False):
        out = sampling.generate(_params(CHAR), CHAR, prompts, max_new_tokens=20,
                                temperature=0.0, stop_token=stop, use_cache=use_cache)
        assert out[0].tolist() == free[0, :at].tolist() + [stop] * (20 - at)
        row_1 = free[1].tolist()
        stopped = row_1.index(stop) if stop in row_1 else 20
        assert out[1, :stopped].tolist() == row_1[:stopped]


def _char_decode(ids):
    return "".join("ab\ncdeé"[i] for i in ids)


def test_truncate_at_stop_token_and_stop_strings():
    # ids: a b \n \n c d e é  -> "ab\n\ncdeé"
    ids = [0, 1, 2, 2, 3, 4, 5, 6]
    assert sampling.truncate(ids, _char_decode) == (ids, "ab\n\ncdeé")
    assert sampling.truncate(ids, _char_decode, stop_token=3) == ([0, 1, 2, 2], "ab\n\n")
    assert sampling.truncate(ids, _char_decode, ["\n\n"]) == ([0, 1], "ab")
    # "cd" ends before "\n\nc" does: the stop string completed first wins.
    assert sampling.truncate(ids, _char_decode, ["\n\ncde", "cd"]) == ([0, 1, 2, 2], "ab\n\n")
    assert sampling.truncate(ids, _char_decode, ["x", ""]) == (ids, "ab\n\ncdeé")


def test_records_cut_each_row_and_rate_the_steps_run():
    from gpt_jax.tokenization import CharTokenizer, TiktokenTokenizer

    tokens = np.array([[0, 7, 7, 7, 7], [1, 2, 0, 7, 7]])  # 7 stops row 0 at step 2, row 1 at 4
    out = sampling.records(["P", "Q"], [[5], [5, 6]], tokens, _char_decode, ["\n"], 7, 2.0)
    assert out == [
        {"prompt": "P", "prompt_tokens": [5], "text": "a", "tokens": [0], "tokens_per_sec": 2.0},
        {"prompt": "Q", "prompt_tokens": [5, 6], "text": "b", "tokens": [1],
         "tokens_per_sec": 2.0},  # 4 steps in 2 s: the loop ran until the last row stopped
    ]
    assert tokenization.end_of_text(TiktokenTokenizer("gpt2")) == 50256
    assert tokenization.end_of_text(CharTokenizer("ab<|>")) is None


@pytest.mark.parametrize("stops", [[], ["\n\n"], ["🦜"], ["wörld 🦜"], ["ld 🦜 en", "x"]])
def test_stream_text_adds_up_to_truncate(stops):
    from gpt_jax.tokenization import TiktokenTokenizer

    tok = TiktokenTokenizer("gpt2")
    ids = tok.encode("Hello wörld 🦜 end\n\nmore 🦜<|endoftext|> after")
    assert "\ufffd" in tok.decode(ids[:5])  # the parrot takes three tokens
    rows = (np.array([i, 0]) for i in ids)  # row 0 is the one printed
    pieces = list(sampling.stream_text(rows, tok.decode, stops, stop_token=50256))
    assert "".join(pieces) == sampling.truncate(ids, tok.decode, stops, 50256)[1]
    assert all(pieces) and not any("\ufffd" in p for p in pieces) and len(pieces) > 1


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": -5}, "max_new_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"window_keep": 0}, "window_keep"),
    ({"window_keep": 17}, "window_keep"),
    ({"prompts": [[1], []]}, "a prompt is empty"),
])
def test_bad_options(kwargs, message):
    kwargs = {"prompts": [[1]], "max_new_tokens": 3, **kwargs}
    with pytest.raises(UserError, match=message):
        sampling.generate(_params(CHAR), CHAR, **kwargs)
