"""Each ablation switch changes the computation the way its name says (defaults stay GPT-2)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import hf
from gpt_jax.errors import UserError
from gpt_jax.model import (
    GPT,
    MLP,
    Block,
    GPTConfig,
    count_params,
    init_params,
    saved_model_fields,
    sinusoidal_positions,
)

TINY = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32)


def _logits(cfg, idx):
    params = init_params(cfg, jax.random.PRNGKey(0))
    return np.asarray(GPT(cfg).apply({"params": params}, idx)), params


def test_defaults_are_gpt2():
    assert (TINY.pos_encoding, TINY.norm_position, TINY.activation, TINY.tie_embeddings,
            TINY.qkv_bias, TINY.dropout) == ("learned", "pre", "gelu", True, True, 0.0)


@pytest.mark.parametrize("pos_encoding, position_blind", [
    ("learned", False), ("sinusoidal", False), ("none", True)])
def test_pos_encoding_none_leaves_only_the_causal_mask(pos_encoding, position_blind):
    cfg = dataclasses.replace(TINY, pos_encoding=pos_encoding)
    logits, params = _logits(cfg, jnp.full((1, 8), 7, jnp.int32))
    # The same token at every position: without a position signal every position attends to
    # identical keys and values, so every position predicts the same thing.
    same = np.allclose(logits[0], logits[0, :1], atol=1e-5)
    assert same == position_blind
    assert ("wpe" in params) == (pos_encoding == "learned")


def test_post_norm_normalises_each_block_output_and_pre_norm_does_not():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 32)) * 3.0 + 1.0
    for position, normalised in (("pre", False), ("post", True)):
        block = Block(dataclasses.replace(TINY, norm_position=position))
        params = block.init(jax.random.PRNGKey(0), x)
        y = np.asarray(block.apply(params, x))
        rows_normalised = np.allclose(y.mean(-1), 0, atol=1e-4) and np.allclose(
            y.std(-1), 1, atol=1e-2)
        assert rows_normalised == normalised, position
    # Post-norm is ln_2(h + mlp(h)) with h = ln_1(x + attn(x)), the same parameters as pre-norm.
    post = Block(dataclasses.replace(TINY, norm_position="post"))
    assert jax.tree.structure(post.init(jax.random.PRNGKey(0), x)) == jax.tree.structure(params)


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_activation_switch_is_the_mlp_nonlinearity(activation):
    cfg = dataclasses.replace(TINY, activation=activation)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 32))
    mlp = MLP(cfg)
    params = mlp.init(jax.random.PRNGKey(0), x)["params"]
    h = np.asarray(x) @ np.asarray(params["c_fc"]["kernel"]) + np.asarray(params["c_fc"]["bias"])
    if activation == "relu":
        h = np.maximum(h, 0)
    else:  # GPT-2's tanh approximation
        h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
    expected = h @ np.asarray(params["c_proj"]["kernel"]) + np.asarray(params["c_proj"]["bias"])
    np.testing.assert_allclose(np.asarray(mlp.apply({"params": params}, x)), expected, atol=1e-5)


def test_untied_head_has_its_own_matrix():
    cfg = dataclasses.replace(TINY, tie_embeddings=False)
    idx = jnp.arange(8)[None] % 32
    logits, params = _logits(cfg, idx)
    assert params["lm_head"]["kernel"].shape == (32, 32)
    tied_logits, _ = _logits(TINY, idx)
    assert not np.allclose(logits, tied_logits)


def test_unknown_switch_values_and_export_refusals():
    with pytest.raises(UserError, match="model.norm_position='middle' is unknown"):
        dataclasses.replace(TINY, norm_position="middle")
    with pytest.raises(UserError, match="model.activation='swish' is unknown"):
        dataclasses.replace(TINY, activation="swish")
    odd = dataclasses.replace(TINY, norm_position="post", activation="relu")
    assert [r.split("=")[0] for r in hf.export_blockers(odd)] == [
        "norm_position", "activation", "final_norm"]


def test_fused_attention_equals_the_written_out_one():
    idx = jax.random.randint(jax.random.PRNGKey(3), (2, 16), 0, 32)
    fused, params = _logits(dataclasses.replace(TINY, attention="fused"), idx)
    einsum = np.asarray(GPT(dataclasses.replace(TINY, attention="einsum")).apply(
        {"params": params}, idx))
    np.testing.assert_allclose(fused, einsum, atol=1e-5)


def test_sinusoidal_positions_scale_the_token_embeddings_as_the_paper_does():
    # "Attention is all you need", 3.4: embeddings times sqrt(d_model), plus the sine table.
    idx = jax.random.randint(jax.random.PRNGKey(3), (2, 16), 0, 32)
    cfg = dataclasses.replace(TINY, pos_encoding="sinusoidal", n_layer=1)
    assert cfg.token_scale == np.sqrt(32) and TINY.token_scale == 1.0
    assert dataclasses.replace(cfg, embed_scale=1.0).token_scale == 1.0
    params = init_params(cfg, jax.random.PRNGKey(0))
    block_input = {}

    def first_block(next_fun, args, kwargs, context):
        if context.module.name == "h_0" and context.method_name == "__call__":
            block_input["x"] = args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(first_block):
        GPT(cfg).apply({"params": params}, idx)
    wte = np.asarray(params["wte"]["embedding"])
    expected = wte[np.asarray(idx)] * np.sqrt(32) + sinusoidal_positions(16, 32)
    np.testing.assert_allclose(block_input["x"], expected, rtol=1e-6, atol=1e-6)


def test_post_norm_has_no_final_layer_norm():
    post = dataclasses.replace(TINY, norm_position="post")
    params = init_params(post, jax.random.PRNGKey(0))
    assert "ln_f" not in params and "ln_f" in init_params(TINY, jax.random.PRNGKey(0))
    assert count_params(post)["total"] == count_params(TINY)["total"] - 2 * 32
    # The logits are the head applied to the last block's (normalised) output.
    idx = jax.random.randint(jax.random.PRNGKey(4), (2, 16), 0, 32)
    outputs = {}

    def last_block(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        if context.module.name == "h_1" and context.method_name == "__call__":
            outputs["y"] = y
        return y

    with nn.intercept_methods(last_block):
        logits = GPT(post).apply({"params": params}, idx)
    y = np.asarray(outputs["y"])
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-4)
    np.testing.assert_allclose(logits, y @ np.asarray(params["wte"]["embedding"]).T, atol=1e-5)
    # final_norm=True keeps GPT-2's ln_f on top (how post-LN checkpoints were trained before).
    assert "ln_f" in init_params(dataclasses.replace(post, final_norm=True),
                                 jax.random.PRNGKey(0))


def test_checkpoints_from_before_the_fix_read_as_they_were_trained():
    # A saved config without the new fields predates them: no scale, and an ln_f on top.
    old = saved_model_fields({"pos_encoding": "sinusoidal", "norm_position": "post"})
    cfg = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32, **old)
    assert (cfg.token_scale, cfg.has_final_norm) == (1.0, True)
    new = GPTConfig(**{**TINY.__dict__, "pos_encoding": "sinusoidal", "norm_position": "post"})
    assert (new.token_scale, new.has_final_norm) == (np.sqrt(32), False)
    assert "final_norm" not in " ".join(hf.export_blockers(cfg))
    assert "final_norm=False" in " ".join(hf.export_blockers(new))
    assert "embed_scale=5.65685" in " ".join(hf.export_blockers(new))
