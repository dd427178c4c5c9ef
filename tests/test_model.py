import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax.errors import UserError
from gpt_jax.model import (
    GPT,
    MLP,
    GPTConfig,
    abstract_params,
    count_params,
    init_cache,
    init_params,
    sinusoidal_positions,
    size_report,
)

TINY = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)


def _tokens(shape, vocab=50, seed=0):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, vocab)


@pytest.mark.parametrize("overrides, expected", [
    ({}, 124_439_808),
    ({"qkv_bias": False, "tie_embeddings": False}, 163_009_536),
    ({"qkv_bias": False}, 124_412_160),
])
def test_gpt2_124m_parameter_counts(overrides, expected):
    assert count_params(GPTConfig(**overrides))["total"] == expected


def test_non_embedding_count_leaves_out_positions():
    counts = count_params(GPTConfig())
    assert counts["non_embedding"] == 124_439_808 - 1024 * 768


def test_cpu_recipe_parameter_count_matches_nanogpt():
    # nanoGPT prints "number of parameters: 0.80M" for this shape (its count leaves out wpe).
    cfg = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=False)
    assert count_params(cfg) == {"total": 804_096, "non_embedding": 795_904}


def test_size_report_gives_counts_and_memory():
    report = size_report(GPTConfig())
    assert "124,439,808 total" in report and "123,653,376 without position" in report
    # float32: 16 bytes per parameter (params 4, grads 4, AdamW moments 8).
    assert f"total {124_439_808 * 16 / 2**20:,.1f} MiB" in report
    assert f"total {124_439_808 * 8 / 2**20:,.1f} MiB" in report


def test_logits_shape_and_dtype():
    params = init_params(TINY, jax.random.PRNGKey(0))
    logits = GPT(TINY).apply({"params": params}, _tokens((3, 10)))
    assert logits.shape == (3, 10, 50) and logits.dtype == jnp.float32


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal"])
def test_causal_changing_a_later_token_leaves_earlier_logits(pos_encoding):
    cfg = GPTConfig(**{**TINY.__dict__, "pos_encoding": pos_encoding})
    params = init_params(cfg, jax.random.PRNGKey(0))
    idx = _tokens((2, 16))
    changed = idx.at[:, 9].set((idx[:, 9] + 1) % 50)
    a = GPT(cfg).apply({"params": params}, idx)
    b = GPT(cfg).apply({"params": params}, changed)
    np.testing.assert_array_equal(a[:, :9], b[:, :9])
    assert not np.allclose(a[:, 9:], b[:, 9:])


def test_causal_through_gradients():
    params = init_params(TINY, jax.random.PRNGKey(0))
    emb = jnp.take(params["wte"]["embedding"], _tokens((1, 16)), axis=0)
    # The logits at position 5 depend on the embeddings of positions 0..5 and no later ones.
    grads = jax.grad(lambda e: _loss_at(params, e, 5))(emb)
    per_position = np.abs(np.asarray(grads)).sum(-1)[0]
    assert np.all(per_position[6:] == 0) and np.all(per_position[:6] > 0)


def _loss_at(params, emb_BTD, t):
    """Runs the blocks of TINY on given token embeddings; returns logits summed at position t."""
    from gpt_jax.model import Block, _norm

    x = emb_BTD + params["wpe"][: emb_BTD.shape[1]]
    for i in range(TINY.n_layer):
        x = Block(TINY).apply({"params": params[f"h_{i}"]}, x)
    x = _norm(TINY, "ln_f").apply({"params": params["ln_f"]}, x)
    return (x @ params["wte"]["embedding"].T)[0, t].sum()


def test_initial_loss_is_about_log_vocab():
    cfg = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=False)
    params = init_params(cfg, jax.random.PRNGKey(0))
    idx = _tokens((8, 64), vocab=65)
    logits = GPT(cfg).apply({"params": params}, idx[:, :-1])
    import optax
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, idx[:, 1:]).mean()
    assert abs(float(loss) - math.log(65)) < 0.05


def test_gpt2_initialisation():
    cfg = GPTConfig(vocab_size=512, block_size=64, n_layer=8, n_head=4, n_embd=256)
    p = init_params(cfg, jax.random.PRNGKey(0))
    resid = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert np.std(p["wte"]["embedding"]) == pytest.approx(0.02, rel=0.03)
    assert np.std(p["wpe"]) == pytest.approx(0.02, rel=0.03)
    h = p["h_0"]
    assert np.std(h["attn"]["c_attn"]["kernel"]) == pytest.approx(0.02, rel=0.03)
    assert np.std(h["mlp"]["c_fc"]["kernel"]) == pytest.approx(0.02, rel=0.03)
    assert np.std(h["attn"]["c_proj"]["kernel"]) == pytest.approx(resid, rel=0.03)
    assert np.std(h["mlp"]["c_proj"]["kernel"]) == pytest.approx(resid, rel=0.03)
    for bias in (h["attn"]["c_attn"]["bias"], h["mlp"]["c_fc"]["bias"], h["ln_1"]["bias"]):
        assert not np.any(bias)
    np.testing.assert_array_equal(h["ln_1"]["scale"], 1.0)


def test_bias_switches():
    no_bias = init_params(GPTConfig(**{**TINY.__dict__, "bias": False}), jax.random.PRNGKey(0))
    leaves = jax.tree_util.tree_flatten_with_path(no_bias)[0]
    assert not any("bias" in jax.tree_util.keystr(path) for path, _ in leaves)
    no_qkv = init_params(GPTConfig(**{**TINY.__dict__, "qkv_bias": False}), jax.random.PRNGKey(0))
    assert "bias" not in no_qkv["h_0"]["attn"]["c_attn"]
    assert "bias" in no_qkv["h_0"]["attn"]["c_proj"]


def test_untied_head_and_sinusoidal_positions_change_the_tree():
    untied = init_params(GPTConfig(**{**TINY.__dict__, "tie_embeddings": False}),
                         jax.random.PRNGKey(0))
    assert untied["lm_head"]["kernel"].shape == (32, 50)
    sinus = GPTConfig(**{**TINY.__dict__, "pos_encoding": "sinusoidal"})
    assert "wpe" not in init_params(sinus, jax.random.PRNGKey(0))
    assert count_params(sinus)["total"] == count_params(TINY)["total"] - 16 * 32


def test_sinusoidal_table_values():
    table = sinusoidal_positions(8, 4)
    np.testing.assert_allclose(table[3], [math.sin(3), math.cos(3), math.sin(3 / 100),
                                          math.cos(3 / 100)], rtol=1e-6)


def test_mlp_is_tanh_gelu_of_width_four():
    cfg = GPTConfig(**{**TINY.__dict__, "bias": False})
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 32))
    p = MLP(cfg).init(jax.random.PRNGKey(0), x)["params"]
    assert p["c_fc"]["kernel"].shape == (32, 128)
    h = x @ p["c_fc"]["kernel"]
    gelu = 0.5 * h * (1 + jnp.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    np.testing.assert_allclose(MLP(cfg).apply({"params": p}, x), gelu @ p["c_proj"]["kernel"],
                               atol=1e-6)


def test_dropout_only_with_a_dropout_rng():
    cfg = GPTConfig(**{**TINY.__dict__, "dropout": 0.5})
    params = init_params(cfg, jax.random.PRNGKey(0))
    idx, model = _tokens((2, 16)), GPT(cfg)
    plain = model.apply({"params": params}, idx)
    np.testing.assert_array_equal(plain, model.apply({"params": params}, idx))
    noisy = model.apply({"params": params}, idx, rngs={"dropout": jax.random.PRNGKey(1)})
    assert not np.allclose(plain, noisy)


def test_bad_shapes_are_user_errors():
    with pytest.raises(UserError, match="not divisible by model.n_head"):
        GPTConfig(n_embd=130, n_head=4)
    with pytest.raises(UserError, match="pos_encoding"):
        GPTConfig(pos_encoding="rotary")


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal"])
def test_cached_decode_equals_full_forward(pos_encoding):
    cfg = GPTConfig(**{**TINY.__dict__, "pos_encoding": pos_encoding})
    params = init_params(cfg, jax.random.PRNGKey(0))
    model, idx = GPT(cfg), _tokens((2, 16))
    lengths = jnp.array([5, 9])
    padded = jnp.where(jnp.arange(12) < lengths[:, None], idx[:, :12], 49)  # right padding

    @jax.jit
    def decode(cache, idx_BT, lengths_B=None):
        logits, mutated = model.apply({"params": params, "cache": cache}, idx_BT, decode=True,
                                      lengths_B=lengths_B, mutable=["cache"])
        return logits, mutated["cache"]

    logits, cache = decode(init_cache(cfg, 2), padded, lengths)
    full = jax.jit(model.apply)({"params": params}, idx)
    np.testing.assert_allclose(logits[0, :5], full[0, :5], atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits[1, :9], full[1, :9], atol=1e-5, rtol=0)
    for t in range(7):  # one token per row per step; row 0 ends at position 11, row 1 at 15
        positions = [int(n) + t for n in lengths]
        logits, cache = decode(cache, idx[jnp.arange(2), jnp.array(positions)][:, None])
        # full[:, pos] is the last position of a full forward on idx[:, :pos + 1] (causality).
        expected = full[jnp.arange(2), jnp.array(positions)]
        np.testing.assert_allclose(logits[:, 0], expected, atol=1e-5, rtol=0)
    assert cache["index"].tolist() == [12, 16]


def test_decode_mode_has_the_same_parameters_and_a_cache():
    variables = jax.eval_shape(lambda: GPT(TINY).init(jax.random.PRNGKey(0),
                                                      jnp.zeros((3, 1), jnp.int32), decode=True))
    assert variables["params"] == abstract_params(TINY)
    cache = init_cache(TINY, 3)
    assert cache["h_1"]["attn"]["cached_key"].shape == (3, 2, 16, 16)  # (B, H, block_size, K)
    assert cache["index"].tolist() == [0, 0, 0]


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_last_only_gives_each_rows_last_logits(tie_embeddings):
    cfg = GPTConfig(**{**TINY.__dict__, "tie_embeddings": tie_embeddings})
    params = init_params(cfg, jax.random.PRNGKey(0))
    model, idx = GPT(cfg), _tokens((2, 12))
    apply = jax.jit(model.apply, static_argnames=("decode", "last_only", "mutable"))
    full = apply({"params": params}, idx)
    last = apply({"params": params}, idx, last_only=True)
    assert last.shape == (2, 1, 50)
    np.testing.assert_array_equal(last[:, 0], full[:, -1])
    # In decode mode each row ends at lengths_B - 1 (the rest is right padding).
    lengths = jnp.array([5, 9])
    prefill, _ = apply({"params": params, "cache": init_cache(cfg, 2)}, idx, decode=True,
                       lengths_B=lengths, last_only=True, mutable=("cache",))
    np.testing.assert_allclose(prefill[:, 0], full[jnp.arange(2), lengths - 1], atol=1e-5,
                               rtol=0)
