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
