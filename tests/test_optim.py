import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.shakespeare_cpu import get_config
from gpt_jax import optim


def test_schedule_warmup_start_peak_and_end():
    config = get_config()  # lr 1e-3 -> 1e-4, 100 warmup steps, decay over 2000
    s = optim.lr_schedule(config)
    assert float(s(0)) == 0.0
    assert float(s(1)) == pytest.approx(1e-5, rel=1e-5)  # the first update already moves the weights
    assert float(s(50)) == pytest.approx(5e-4, rel=1e-6)
    assert float(s(100)) == pytest.approx(1e-3)
    midway = 1e-4 + 0.5 * (1e-3 - 1e-4)  # cosine at half of the decay phase
    assert float(s(1050)) == pytest.approx(midway, rel=1e-5)
    assert float(s(2000)) == pytest.approx(1e-4)
    assert float(s(5000)) == pytest.approx(1e-4)


def test_decay_steps_ends_the_cosine_early():
    config = get_config()
    config.decay_steps = 1000
    assert float(optim.lr_schedule(config)(1000)) == pytest.approx(1e-4)


def test_decay_mask_covers_matrices_and_embeddings_only():
    params = {"wte": {"embedding": jnp.ones((5, 4))}, "dense": {"kernel": jnp.ones((4, 4)),
              "bias": jnp.ones(4)}, "ln": {"scale": jnp.ones(4)}}
    assert optim.decay_mask(params) == {"wte": {"embedding": True}, "dense": {
        "kernel": True, "bias": False}, "ln": {"scale": False}}


def test_weight_decay_skips_biases_and_norms():
    config = get_config()
    config.warmup_steps, config.weight_decay = 0, 0.5
    tx = optim.make_optimizer(config)
    params = {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)}
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    lr = float(optim.lr_schedule(config)(1))
    np.testing.assert_allclose(updates["kernel"], -lr * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(updates["bias"], 0.0)


def test_gradients_are_clipped_to_global_norm():
    config = get_config()
    config.grad_clip, config.weight_decay = 1.0, 0.0
    tx = optim.make_optimizer(config)
    params = {"w": jnp.zeros((3,))}
    clipped_state = optax.clip_by_global_norm(1.0)
    grads = {"w": jnp.array([30.0, 40.0, 0.0])}
    clipped, _ = clipped_state.update(grads, clipped_state.init(params))
    np.testing.assert_allclose(clipped["w"], [0.6, 0.8, 0.0], rtol=1e-6)
    # Adam's first step is lr * sign(g) whatever the scale, so check the chained state instead.
    _, state = tx.update(grads, tx.init(params), params)
    mu = state[1][0].mu["w"]
    np.testing.assert_allclose(mu, (1 - config.beta1) * np.array([0.6, 0.8, 0.0]), rtol=1e-5)


@pytest.mark.parametrize("kind, at_400", [("inverse_sqrt", 1e-3 * 0.5), ("constant", 1e-3)])
def test_other_schedules_warm_up_then_follow_their_rule(kind, at_400):
    config = get_config()  # lr 1e-3, 100 warmup steps
    config.lr_schedule = kind
    s = optim.lr_schedule(config)
    assert float(s(0)) == 0.0 and float(s(50)) == pytest.approx(5e-4, rel=1e-6)
    assert float(s(100)) == pytest.approx(1e-3)
    assert float(s(400)) == pytest.approx(at_400, rel=1e-6)  # sqrt(100 / 400) = 0.5


@pytest.mark.parametrize("max_steps, warmup", [(1, 0), (5, 2), (60, 30), (100, 50), (101, 100),
                                               (2000, 100)])
def test_a_warmup_longer_than_the_run_takes_half_of_it(max_steps, warmup):
    config = get_config()  # 100 warmup steps
    config.max_steps = max_steps
    assert optim.warmup_steps(config) == warmup
    s = optim.lr_schedule(config)
    assert float(s(max_steps)) == pytest.approx(1e-4)  # it still anneals to min_lr
    lrs = [float(s(k)) for k in range(1, max_steps + 1)]
    assert max(lrs) <= 1e-3 * (1 + 1e-6) and all(lr > 0 for lr in lrs)


def test_other_schedules_keep_a_long_warmup():
    config = get_config()
    config.lr_schedule, config.max_steps = "constant", 60
    assert optim.warmup_steps(config) == 100


def _wsd(shape="linear", **fields):
    config = get_config()  # lr 1e-3 -> 1e-4, 100 warmup steps, 2000 steps
    config.lr_schedule, config.decay_shape = "wsd", shape
    config.update(fields)
    return optim.lr_schedule(config)


def test_wsd_warms_up_holds_then_cools_down_linearly_over_its_fraction():
    s = _wsd(decay_fraction=0.25)  # cool-down over steps 1500..2000
    assert float(s(0)) == 0.0 and float(s(50)) == pytest.approx(5e-4, rel=1e-6)
    for step in (100, 800, 1500):
        assert float(s(step)) == pytest.approx(1e-3, rel=1e-6)
    assert float(s(1750)) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-6)
    assert float(s(2000)) == pytest.approx(1e-4, rel=1e-6)
    assert float(s(3000)) == pytest.approx(1e-4, rel=1e-6)


def test_wsd_one_minus_sqrt_cooldown():
    s = _wsd("1-sqrt", decay_fraction=0.25)
    # a quarter of the way down: 1 - sqrt(0.25) = half of (peak - min_lr) left
    assert float(s(1625)) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-5)
    assert float(s(2000)) == pytest.approx(1e-4, rel=1e-6)


def test_wsd_short_run_still_warms_up_and_anneals():
    s = _wsd(max_steps=60, decay_fraction=0.2)  # warmup 100 -> 30; cool-down over 48..60
    assert float(s(30)) == pytest.approx(1e-3) and float(s(48)) == pytest.approx(1e-3)
    assert float(s(60)) == pytest.approx(1e-4, rel=1e-6)


def _gpt_params(**fields):
    from gpt_jax.model import GPTConfig, init_params

    cfg = GPTConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=16, **fields)
    return init_params(cfg, jax.random.PRNGKey(0))


def test_muon_mask_takes_the_blocks_matrices_only():
    params = _gpt_params(tie_embeddings=False)
    flat = {"/".join(k.key for k in path): m for path, m in
            jax.tree_util.tree_flatten_with_path(optim.muon_mask(params))[0]}
    assert sorted(k for k, m in flat.items() if m) == sorted(
        f"h_{i}/{sub}/{layer}/kernel" for i in range(2)
        for sub, layer in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"),
                           ("mlp", "c_proj")))
    for name in ("wte/embedding", "wpe", "lm_head/kernel", "ln_f/scale", "h_0/ln_1/bias",
                 "h_0/attn/c_attn/bias"):
        assert not flat[name], name


def _muon_config(**fields):
    config = get_config()
    config.update({**dict(optimizer="muon", warmup_steps=0, weight_decay=0.0, grad_clip=0.0,
                          learning_rate=1e-3, muon_lr=0.02), **fields})
    return config


def test_muon_orthogonalises_matrices_and_adamw_moves_the_rest():
    params = _gpt_params(tie_embeddings=False)
    config = _muon_config()
    tx = optim.make_optimizer(config)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(p.size), p.shape), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    lr = float(optim.lr_schedule(config)(1))
    for sub, layer in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj")):
        update = np.asarray(updates["h_1"][sub][layer]["kernel"], np.float64)
        fan_in, fan_out = update.shape
        shape_scale = max(1.0, fan_out / fan_in) ** 0.5  # optax's scale_by_shape
        sv = np.linalg.svd(update / (-0.02 / 1e-3 * lr * shape_scale), compute_uv=False)
        # Five quintic Newton-Schulz steps put every singular value near 1 (Muon's
        # coefficients trade exactness for speed: they land within about [0.7, 1.2]).
        assert 0.6 < sv.min() and sv.max() < 1.25 and abs(sv.mean() - 1) < 0.15, (layer, sv)
    # AdamW's first step is lr * g / |g| (bias-corrected), i.e. -lr * sign(g), on the rest.
    for path in (("wte", "embedding"), ("lm_head", "kernel"), ("wpe",), ("ln_f", "scale"),
                 ("h_0", "attn", "c_attn", "bias")):
        u, g = updates, grads
        for key in path:
            u, g = u[key], g[key]
        np.testing.assert_allclose(u, -lr * np.sign(g), rtol=1e-3, err_msg="/".join(path))


def test_muon_updates_matrices_at_muon_lr_on_the_schedule():
    params = {"h_0": {"mlp": {"kernel": jnp.eye(4)}}, "wte": {"embedding": jnp.ones((3, 4))}}
    grads = {"h_0": {"mlp": {"kernel": 3.0 * jnp.eye(4)}},
             "wte": {"embedding": jnp.ones((3, 4))}}
    config = _muon_config(warmup_steps=10)
    tx = optim.make_optimizer(config)
    updates, _ = tx.update(grads, tx.init(params), params)
    # An orthogonal gradient stays about itself, scaled to 1; step 1 of a 10-step warmup.
    np.testing.assert_allclose(np.diag(updates["h_0"]["mlp"]["kernel"]), -0.02 / 10, rtol=0.3)
    np.testing.assert_allclose(updates["wte"]["embedding"], -1e-3 / 10, rtol=1e-4)


MUON_LAYOUTS = """
import jax, jax.numpy as jnp, ml_collections, numpy as np
from gpt_jax import optim, sharding, trainer
from gpt_jax.model import GPT, GPTConfig
from configs.shakespeare_cpu import get_config
cfg = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
config = get_config()
config.optimizer, config.warmup_steps = "muon", 2
tx = optim.make_optimizer(config)
batches = [tuple(jax.random.randint(jax.random.PRNGKey(10 * s + i), (8, 16), 0, 65)
                 for i in range(2)) for s in range(3)]

def train(data, fsdp, accum):
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": data, "fsdp": fsdp}),
                              jax.devices()[:data * fsdp])
    init, shardings = trainer.sharded_init(cfg, tx, 0, mesh)
    state = jax.jit(init, out_shardings=shardings)()
    step = trainer.make_train_step(GPT(cfg), tx, accum, mesh, shardings)
    losses = []
    for batch in batches:
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    kernel = state.params["h_0"]["mlp"]["c_fc"]["kernel"]
    shards = {s.data.shape for s in kernel.addressable_shards}
    return losses, jax.device_get(state.params), shards

ref_losses, ref, _ = train(1, 1, 1)
for data, fsdp, accum in ((2, 4, 1), (1, 1, 2), (2, 2, 2)):
    losses, params, shards = train(data, fsdp, accum)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5)
    diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params, ref)))
    assert diff < 1e-5, (data, fsdp, accum, diff)
    print(data, fsdp, accum, shards, f"{diff:.1e}")
"""


def test_muon_trains_alike_sharded_and_accumulated():
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = dict(os.environ, PYTHONPATH=str(REPO),
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run([sys.executable, "-c", MUON_LAYOUTS], cwd=REPO, env=env,
                            capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split("\n")
    # fsdp=4 splits the (32, 128) kernel four ways, fsdp=2 two ways; each layout matches.
    assert lines[0].startswith("2 4 1 {(32, 32)}") and lines[2].startswith("2 2 2 {(32, 64)}")
