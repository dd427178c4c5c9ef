"""The switches of today's ablations (issue 20): RoPE, RMSNorm, ReLU², SwiGLU, QK-norm,
grouped-query attention, logit soft-capping, zero-initialised projections. Each against its
formula or its reference implementation, and a "modern" model of all of them, trained by Muon on
the wsd schedule, through the KV-cache sampler, resume, vmap_seeds and sharding."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_OVERRIDES, require_parity_libs, run_cli, tiny_flags

from gpt_jax import checkpoint, hf, sampling, trainer
from gpt_jax import config as config_lib
from gpt_jax.errors import UserError
from gpt_jax.model import (
    GPT,
    MLP,
    GPTConfig,
    RMSNorm,
    count_params,
    init_cache,
    init_params,
    rotary,
    saved_model_fields,
)

TINY = GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=4, n_embd=32)
MODERN_FIELDS = dict(pos_encoding="rope", norm="rmsnorm", activation="swiglu", qk_norm=True,
                     n_kv_head=1, logit_softcap=15.0, zero_init_proj=True, bias=False,
                     tie_embeddings=False)
MODERN = dataclasses.replace(TINY, **MODERN_FIELDS)


def _logits(cfg, params, idx):
    # jitted: one compile, where an eager apply compiles each of its many small ops
    return np.asarray(jax.jit(GPT(cfg).apply)({"params": params}, idx))


def _randn(seed, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.PRNGKey(seed), shape)


# --------------------------------------------------------------------------- RoPE


def test_rope_scores_depend_only_on_the_offset():
    q_BTHK, k_BTHK = _randn(0, (2, 8, 2, 16)), _randn(1, (2, 8, 2, 16))

    def scores(shift):
        at_BT = jnp.broadcast_to(jnp.arange(8) + shift, (2, 8))
        return np.asarray(jnp.einsum("bthk,bshk->bhts", rotary(q_BTHK, at_BT, 10000.0),
                                     rotary(k_BTHK, at_BT, 10000.0)))

    np.testing.assert_allclose(scores(0), scores(37), atol=1e-4)
    plain = np.asarray(jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BTHK))
    np.testing.assert_allclose(np.diagonal(scores(0), axis1=2, axis2=3),  # offset 0: no turn
                               np.diagonal(plain, axis1=2, axis2=3), atol=1e-4)
    assert not np.allclose(scores(0), plain, atol=1e-2)


def test_rope_equals_transformers_llama_rotary_embedding():
    require_parity_libs()
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    B, T, H, K, theta = 2, 12, 3, 16, 500.0
    hf_config = LlamaConfig(hidden_size=H * K, num_attention_heads=H, head_dim=K,
                            max_position_embeddings=64, rope_theta=theta)
    positions_BT = np.stack([np.arange(T), np.arange(T) + 29])  # the second row: decode-like
    q_BTHK, k_BTHK = np.asarray(_randn(2, (B, T, H, K))), np.asarray(_randn(3, (B, T, H, K)))
    to_torch = lambda x: torch.from_numpy(x.transpose(0, 2, 1, 3).copy())  # noqa: E731 (B,H,T,K)
    cos, sin = LlamaRotaryEmbedding(hf_config)(to_torch(q_BTHK), torch.from_numpy(positions_BT))
    hf_q, hf_k = apply_rotary_pos_emb(to_torch(q_BTHK), to_torch(k_BTHK), cos, sin)
    for ours, theirs in ((rotary(q_BTHK, positions_BT, theta), hf_q),
                         (rotary(k_BTHK, positions_BT, theta), hf_k)):
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy().transpose(0, 2, 1, 3),
                                   atol=1e-5)


# --------------------------------------------------------------------------- GQA


def test_gqa_with_every_head_is_todays_attention():
    idx = jax.random.randint(jax.random.PRNGKey(4), (2, 16), 0, 65)
    params = init_params(TINY, jax.random.PRNGKey(0))
    full = dataclasses.replace(TINY, n_kv_head=TINY.n_head)
    assert jax.tree.map(jnp.shape, init_params(full, jax.random.PRNGKey(0))) == \
        jax.tree.map(jnp.shape, params)
    np.testing.assert_array_equal(_logits(full, params, idx), _logits(TINY, params, idx))


def test_gqa_is_attention_with_each_key_value_head_shared_by_its_group():
    # n_kv_head = 2 of 4 heads: query heads 0, 1 read kv head 0 and heads 2, 3 kv head 1, so it
    # equals full attention whose key and value weights repeat each kv head for its group.
    gqa = dataclasses.replace(TINY, n_kv_head=2)
    idx = jax.random.randint(jax.random.PRNGKey(5), (2, 16), 0, 65)
    params = init_params(gqa, jax.random.PRNGKey(0))
    D, K = 32, 8
    full_params = jax.tree.map(lambda x: x, params)
    for i in range(gqa.n_layer):
        for name in ("kernel", "bias"):
            w = np.asarray(params[f"h_{i}"]["attn"]["c_attn"][name])
            q, k, v = np.split(w, [D, D + 2 * K], axis=-1)
            k, v = (np.repeat(a.reshape(*a.shape[:-1], 2, K), 2, axis=-2).reshape(*a.shape[:-1], D)
                    for a in (k, v))
            full_params[f"h_{i}"]["attn"]["c_attn"][name] = np.concatenate([q, k, v], axis=-1)
    np.testing.assert_allclose(_logits(gqa, params, idx), _logits(TINY, full_params, idx),
                               atol=1e-5)


def test_multi_query_cache_is_n_head_times_smaller():
    mha, mqa = init_cache(TINY, 3), init_cache(dataclasses.replace(TINY, n_kv_head=1), 3)
    for layer in ("h_0",):
        for name in ("cached_key", "cached_value"):
            assert mha[layer]["attn"][name].size == TINY.n_head * mqa[layer]["attn"][name].size
            assert mqa[layer]["attn"][name].shape == (3, 1, 16, 8)


# --------------------------------------------------------------------------- formulas


def test_rmsnorm_against_its_formula():
    x = np.asarray(_randn(6, (3, 5, 32), 3.0)) + 1.0
    scale = np.asarray(_randn(7, (32,))) + 1.0
    y = RMSNorm(1e-5).apply({"params": {"scale": scale}}, x)
    expected = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-5) * scale
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-6)
    # rmsnorm has a scale and no bias wherever layernorm had both
    params = init_params(dataclasses.replace(TINY, norm="rmsnorm"), jax.random.PRNGKey(0))
    assert set(params["h_0"]["ln_1"]) == set(params["ln_f"]) == {"scale"}


@pytest.mark.parametrize("activation", ["relu2", "swiglu"])
def test_mlp_activations_against_their_formulas(activation):
    cfg = dataclasses.replace(TINY, activation=activation)
    x = _randn(8, (2, 4, 32))
    params = MLP(cfg).init(jax.random.PRNGKey(0), x)["params"]
    fc, proj = (np.asarray(params[n]["kernel"]) for n in ("c_fc", "c_proj"))
    h = np.asarray(x) @ fc + np.asarray(params["c_fc"]["bias"])
    if activation == "relu2":
        h = np.maximum(h, 0) ** 2
    else:  # silu(x W_gate) * x W_up, gate first in c_fc
        gate, up = np.split(h, 2, axis=-1)
        h = gate / (1 + np.exp(-gate)) * up
    expected = h @ proj + np.asarray(params["c_proj"]["bias"])
    np.testing.assert_allclose(np.asarray(jax.jit(MLP(cfg).apply)({"params": params}, x)), expected,
                               atol=1e-5)


def test_softcap_is_c_tanh_of_logits_over_c():
    idx = jax.random.randint(jax.random.PRNGKey(9), (2, 16), 0, 65)
    params = jax.tree.map(lambda p: 3 * p, init_params(TINY, jax.random.PRNGKey(0)))
    raw = _logits(TINY, params, idx)
    capped = _logits(dataclasses.replace(TINY, logit_softcap=3.0), params, idx)
    assert np.abs(raw).max() > 3.0 > np.abs(capped).max()
    np.testing.assert_allclose(capped, 3.0 * np.tanh(raw / 3.0), atol=1e-5)


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    cfg = dataclasses.replace(TINY, qk_norm=True, bias=False)
    idx = jax.random.randint(jax.random.PRNGKey(10), (2, 16), 0, 65)
    params = init_params(cfg, jax.random.PRNGKey(0))
    assert params["h_0"]["attn"]["q_norm"]["scale"].shape == (8,)  # per head dim
    scaled = jax.tree.map(lambda x: x, params)
    for i in range(cfg.n_layer):  # queries x 7, keys x 0.5: qk-norm undoes both
        w = np.asarray(params[f"h_{i}"]["attn"]["c_attn"]["kernel"]).copy()
        w[:, :32] *= 7.0
        w[:, 32:64] *= 0.5
        scaled[f"h_{i}"]["attn"]["c_attn"]["kernel"] = w
    np.testing.assert_allclose(_logits(cfg, scaled, idx), _logits(cfg, params, idx), atol=1e-4)
    # Without qk-norm the same weights do see the scale.
    plain = dataclasses.replace(cfg, qk_norm=False)
    unnormed = lambda p: {**p, **{f"h_{i}": {**p[f"h_{i}"], "attn": {  # noqa: E731
        k: v for k, v in p[f"h_{i}"]["attn"].items() if not k.endswith("_norm")}}
        for i in range(cfg.n_layer)}}
    assert not np.allclose(_logits(plain, unnormed(scaled), idx),
                           _logits(plain, unnormed(params), idx), atol=1e-3)


def test_swiglu_width_follows_llamas_rule_and_parameter_counts_are_exact():
    # 2/3 of 4 * n_embd, rounded up to a multiple of 64: 341.3 -> 384, 170.7 -> 192, 2048.
    widths = {n: dataclasses.replace(TINY, n_embd=n, activation="swiglu").mlp_width
              for n in (128, 64, 768)}
    assert widths == {128: 384, 64: 192, 768: 2048}
    assert dataclasses.replace(TINY, activation="relu2").mlp_width == 4 * 32
    assert dataclasses.replace(TINY, activation="swiglu", mlp_hidden=100).mlp_width == 100
    V, D, L, S = 65, 32, 1, 16
    gpt2_layer = (2 * 2 * D + (D * 3 * D + 3 * D) + (D * D + D) + (D * 4 * D + 4 * D)
                  + (4 * D * D + D))
    assert count_params(TINY)["total"] == V * D + S * D + L * gpt2_layer + 2 * D
    # modern: no biases, one kv head of 8 dims, qk-norm scales, swiglu of 128, untied head
    modern_layer = 2 * D + D * (D + 2 * 8) + D * D + 2 * 8 + D * 2 * 128 + 128 * D
    assert count_params(MODERN)["total"] == V * D + L * modern_layer + D + D * V
    gqa = dataclasses.replace(TINY, n_kv_head=2)
    assert count_params(TINY)["total"] - count_params(gqa)["total"] == L * 2 * (D + 1) * (D - 16)


def test_zero_init_proj_starts_every_block_as_the_identity():
    cfg = dataclasses.replace(TINY, zero_init_proj=True, tie_embeddings=False)
    params = init_params(cfg, jax.random.PRNGKey(0))
    idx = jax.random.randint(jax.random.PRNGKey(11), (4, 16), 0, 65)
    logits, state = jax.jit(lambda p, i: GPT(cfg).apply(
        {"params": p}, i, capture_intermediates=True, mutable=["intermediates"]))(params, idx)
    embeddings = params["wte"]["embedding"][idx] + params["wpe"][:16]
    for i in range(cfg.n_layer):  # the residual stream after each block is the embeddings
        np.testing.assert_array_equal(state["intermediates"][f"h_{i}"]["__call__"][0],
                                      embeddings)
        assert not np.any(params[f"h_{i}"]["attn"]["c_proj"]["kernel"])
        assert not np.any(params[f"h_{i}"]["mlp"]["c_proj"]["kernel"])
    # The issue asks for an initial loss of ln(vocab) ± 0.01. What is true: the head sees
    # ln_f(embeddings), of unit RMS, so each logit is N(0, 0.02² n_embd) and the loss is about
    # ln(vocab) + 0.02² n_embd / 2: within 0.01 up to n_embd ~ 50 (here 32: +0.006), not at
    # the CPU recipe's 128 (+0.026). A tied head adds more: the input token's own logit is
    # ~0.02² n_embd, and its embedding also predicts the next token.
    targets = jnp.roll(idx, -1, axis=1)
    loss = -np.mean(np.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))
    assert abs(loss - math.log(65)) < 0.01


# --------------------------------------------------------------------------- checks


@pytest.mark.parametrize("fields, message", [
    ({"n_head": 4, "n_kv_head": 3}, r"model.n_head=4 is not divisible by model.n_kv_head=3: choose "
                       r"n_kv_head among \[1, 2, 4\]"),
    ({"pos_encoding": "rope", "n_embd": 10}, "head size n_embd / n_head = 5 is odd"),
    ({"norm": "batchnorm"}, "model.norm='batchnorm' is unknown: use one of layernorm, rmsnorm"),
    ({"activation": "geglu"}, "model.activation='geglu' is unknown"),
    ({"mlp_hidden": 0}, "model.mlp_hidden must be a positive integer"),
    ({"logit_softcap": -1.0}, "model.logit_softcap must be >= 0"),
    ({"norm_eps": 0.0}, "model.norm_eps must be positive"),
])
def test_bad_switches_are_one_line_errors(fields, message, tiny_config):
    tiny_config.model.update(fields)
    with pytest.raises(UserError, match=message):
        config_lib.validate(tiny_config)


def test_export_to_gpt2_refuses_each_switch_and_old_checkpoints_read_as_trained():
    refused = [r.split("=")[0] for r in hf.export_blockers(MODERN)]
    assert refused == ["pos_encoding", "tie_embeddings", "activation", "norm", "qk_norm",
                       "n_kv_head", "logit_softcap"]  # swiglu at n_embd 32 is 128 = 4 * 32 wide
    assert hf.export_blockers(dataclasses.replace(TINY, zero_init_proj=True)) == []
    assert hf.export_blockers(dataclasses.replace(TINY, mlp_hidden=100, norm_eps=1e-6)) == [
        "norm_eps=1e-06 (GPT-2's LayerNorm epsilon is 1e-5)",
        "mlp_hidden=100 (GPT-2's MLP is 4 * n_embd wide)"]
    # A config saved before these fields existed is the GPT-2 model it was trained as.
    old = {k: v for k, v in config_lib.base_config().model.to_dict().items()
           if k not in MODERN_FIELDS and k not in ("rope_theta", "norm_eps", "mlp_hidden")}
    assert GPTConfig(vocab_size=65, **saved_model_fields(old)) == GPTConfig(
        vocab_size=65, **config_lib.base_config().model)


# --------------------------------------------------------------------------- the modern model


def test_cached_decode_equals_full_recompute():
    # Every switch, with 2 key/value heads for 4 query heads (each shared by a group of two).
    cfg = dataclasses.replace(MODERN, n_kv_head=2)
    # Scaled-up weights keep greedy choices away from ties; the zero-initialised projections
    # get weights too (as after training). Rows of different lengths sit at different positions,
    # and 30 new tokens cross block_size, so the window slides (rope restarts at 0).
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 100))
    params = jax.tree.map(lambda p: p + 0.5 * jax.random.normal(next(keys), p.shape),
                          init_params(cfg, jax.random.PRNGKey(0)))
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3]]
    options = dict(max_new_tokens=30, temperature=0.0)
    cached = sampling.generate(params, cfg, prompts, **options)
    recomputed = sampling.generate(params, cfg, prompts, use_cache=False, **options)
    assert cached.tolist() == recomputed.tolist()
    assert len(set(cached[0].tolist())) > 5


# The tiny trainer config (2 heads) with every switch on, trained by Muon on the wsd schedule;
# 8 rows to split over 8 devices.
MODERN_OVERRIDES = {**{f"model.{k}": v for k, v in MODERN_FIELDS.items()}, "batch_size": 8,
                    "log_interval": 1, "optimizer": "muon", "lr_schedule": "wsd"}


def _modern_config(out_dir, **extra):
    from configs.shakespeare_cpu import get_config

    config = get_config()
    for key, value in {**TINY_OVERRIDES, **MODERN_OVERRIDES, **extra}.items():
        holder = config
        *parents, leaf = key.split(".")
        for p in parents:
            holder = holder[p]
        holder[leaf] = value
    config.out_dir = str(out_dir)
    return config


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A 20-step run of the modern model (seed 1337) on one device."""
    out = tmp_path_factory.mktemp("modern") / "straight"
    trainer.run(_modern_config(out))
    return out


def _losses(out) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def test_modern_model_resumes_bit_identically_and_samples(straight, tmp_path):
    stopped = _modern_config(tmp_path / "stopped", max_steps=10)
    trainer.run(stopped)
    stopped.max_steps = 20
    trainer.run(stopped)
    for step in (10, 20):
        a = checkpoint.load_model(straight, step)[2]
        b = checkpoint.load_model(tmp_path / "stopped", step)[2]
        jax.tree.map(np.testing.assert_array_equal, a, b)
    assert (tmp_path / "stopped" / "metrics.jsonl").read_bytes() == (
        straight / "metrics.jsonl").read_bytes()
    _, cfg, params, _ = checkpoint.load_model(straight)
    assert {k: getattr(cfg, k) for k in MODERN_FIELDS} == MODERN_FIELDS
    saved = checkpoint.latest_metadata(straight)[1][0]
    assert (saved["optimizer"], saved["lr_schedule"]) == ("muon", "wsd")
    assert sampling.generate(params, cfg, [[1, 2, 3]], max_new_tokens=5).shape == (1, 5)


def test_modern_model_trains_in_vmap_seeds_like_alone(straight, tmp_path):
    trainer.run(_modern_config(tmp_path / "vmap", vmap_seeds=2))
    lanes = {seed: _losses(tmp_path / "vmap" / f"seed_{seed}") for seed in (1337, 1338)}
    alone = _losses(straight)
    assert lanes[1337].keys() == alone.keys()
    for step, loss in alone.items():
        assert lanes[1337][step] == pytest.approx(loss, abs=1e-5), step
    assert lanes[1338][20] != lanes[1337][20]
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5),
                 checkpoint.load_model(tmp_path / "vmap" / "seed_1337", 20)[2],
                 checkpoint.load_model(straight, 20)[2])


def test_modern_model_trains_sharded_like_one_device(straight, tmp_path):
    out = tmp_path / "sharded"
    flags = [f"--config.{k}={v}" for k, v in MODERN_OVERRIDES.items()]
    result = run_cli("train.py", "--config", "configs/shakespeare_cpu.py", *tiny_flags(out),
                     *flags, "--config.mesh.data=2", "--config.mesh.fsdp=4",
                     env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert result.returncode == 0, result.stderr + result.stdout
    assert "mesh: data=2 x fsdp=4" in result.stdout
    alone = _losses(straight)
    sharded = _losses(out)
    assert sharded.keys() == alone.keys()
    for step, loss in alone.items():
        assert sharded[step] == pytest.approx(loss, abs=1e-5), step
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5),
                 checkpoint.load_model(out, 20)[2], checkpoint.load_model(straight, 20)[2])
