import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import sampling
from gpt_jax.errors import UserError
from gpt_jax.model import GPT, GPTConfig, init_params

CFG = GPTConfig(vocab_size=20, block_size=8, n_layer=2, n_head=2, n_embd=32)


def _reference_greedy(params, prompt, n):
    """nanoGPT's generate: full forward on the cropped context for every new token."""
    tokens, forward = list(prompt), jax.jit(GPT(CFG).apply)
    for _ in range(n):
        context = jnp.asarray([tokens[-CFG.block_size:]])
        tokens.append(int(jnp.argmax(forward({"params": params}, context)[0, -1])))
    return tokens


def test_greedy_equals_full_recompute_past_block_size():
    params = init_params(CFG, jax.random.PRNGKey(0))
    prompt = [1, 2, 3]
    out = sampling.generate(params, CFG, prompt, max_new_tokens=15, temperature=0.0)
    assert out.shape == (1, 18)
    assert out[0].tolist() == _reference_greedy(params, prompt, 15)


def test_step_compiles_once_for_any_prompt_length():
    params = init_params(CFG, jax.random.PRNGKey(1))
    step = sampling.next_token_fn(CFG, 5)
    before = step._cache_size()
    for prompt in ([1], [1, 2, 3, 4], list(range(12))):
        sampling.generate(params, CFG, prompt, num_samples=2, max_new_tokens=10, top_k=5,
                          temperature=0.7, seed=3)
    assert step._cache_size() - before <= 1


def test_top_k_one_is_greedy():
    params = init_params(CFG, jax.random.PRNGKey(2))
    greedy = sampling.generate(params, CFG, [4], max_new_tokens=10, temperature=0.0)
    top1 = sampling.generate(params, CFG, [4], max_new_tokens=10, temperature=1.5, top_k=1)
    np.testing.assert_array_equal(greedy, top1)


def test_top_k_never_leaves_the_k_best():
    logits = jnp.log(jnp.array([[0.1, 0.5, 0.05, 0.3, 0.05]]))
    draws = {int(sampling.sample_from_logits(logits, jax.random.PRNGKey(i), jnp.float32(1.0),
                                             2)[0]) for i in range(200)}
    assert draws == {1, 3}


def test_seeds_change_samples_and_batch_rows_differ():
    params = init_params(CFG, jax.random.PRNGKey(3))
    a = sampling.generate(params, CFG, [1], num_samples=4, max_new_tokens=20, seed=0)
    b = sampling.generate(params, CFG, [1], num_samples=4, max_new_tokens=20, seed=1)
    assert not np.array_equal(a, b) and len({tuple(r) for r in a}) > 1


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_k": 0}, "top_k"),
])
def test_bad_options(kwargs, message):
    params = init_params(CFG, jax.random.PRNGKey(0))
    with pytest.raises(UserError, match=message):
        sampling.generate(params, CFG, [1], **{"max_new_tokens": 3, **kwargs})
