"""How the block stack is laid out and differentiated: model.scan_layers and model.remat.

Neither switch changes what the model computes; these tests hold each to the unrolled model
with every activation kept (the reference).
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_cli, tiny_flags

from gpt_jax import checkpoint, hf, optim, sampling, trainer
from gpt_jax.model import GPT, GPTConfig, abstract_params, count_params, init_params, to_layout

BASE = GPTConfig(vocab_size=64, block_size=16, n_layer=3, n_head=4, n_embd=32)
# Switches that reach inside the block: rope, grouped-query attention, qk_norm, swiglu, RMSNorm,
# post-LN, document masking.
MODERN = dataclasses.replace(BASE, pos_encoding="rope", n_kv_head=2, qk_norm=True,
                             activation="swiglu", norm="rmsnorm", bias=False)
POST = dataclasses.replace(BASE, norm_position="post", doc_sep=0)
CPU = "configs/shakespeare_cpu.py"


def _batch(config, seed=1, B=2):
    idx = jax.random.randint(jax.random.PRNGKey(seed), (B, config.block_size + 1), 0,
                             config.vocab_size)
    return idx[:, :-1], idx[:, 1:]


def _loss_and_grads(config, params, batch):
    return jax.jit(jax.value_and_grad(trainer.loss_fn), static_argnums=1)(
        params, GPT(config), batch)


def _max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.parametrize("config", [BASE, MODERN, POST], ids=["gpt2", "modern", "post_ln_docs"])
def test_scanned_stack_gives_the_unrolled_losses_and_gradients(config):
    params, batch = init_params(config, jax.random.PRNGKey(0)), _batch(config)
    loss, grads = _loss_and_grads(config, params, batch)
    scanned = dataclasses.replace(config, scan_layers=True)
    stacked = init_params(scanned, jax.random.PRNGKey(0))
    assert jax.tree.map(jnp.shape, stacked["h"]["attn"]["c_attn"]["kernel"]) == (
        3, 32, jax.tree.leaves(params["h_0"]["attn"]["c_attn"])[-1].shape[-1])
    assert _max_diff(to_layout(stacked, config), params) == 0.0  # the same draws per layer
    scan_loss, scan_grads = _loss_and_grads(scanned, stacked, batch)
    assert abs(float(scan_loss) - float(loss)) < 1e-5
    assert _max_diff(to_layout(scan_grads, config), grads) < 1e-5


@pytest.mark.parametrize("remat", ["block", "dots"])
@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_remat_gives_the_same_losses_and_gradients(remat, scan_layers):
    config = dataclasses.replace(MODERN, scan_layers=scan_layers)
    params, batch = init_params(config, jax.random.PRNGKey(0)), _batch(config)
    loss, grads = _loss_and_grads(config, params, batch)
    remat_loss, remat_grads = _loss_and_grads(dataclasses.replace(config, remat=remat), params,
                                              batch)
    assert abs(float(remat_loss) - float(loss)) < 1e-6
    assert _max_diff(remat_grads, grads) < 1e-6


def _step_temp_bytes(config, B=8) -> int:
    params, batch = init_params(config, jax.random.PRNGKey(0)), _batch(config, B=B)
    grad = jax.jit(jax.grad(trainer.loss_fn), static_argnums=1)
    return grad.lower(params, GPT(config), batch).compile().memory_analysis().temp_size_in_bytes


def test_remat_keeps_fewer_activations_for_the_backward_pass():
    """What a block keeps for the backward pass, in bytes: jax's own account of the residuals
    (XLA:CPU's scheduler may overlap buffers either way, so its temp figure is for the
    benchmark, not a test)."""
    config = dataclasses.replace(BASE, n_layer=4, n_embd=64, block_size=64)
    params, batch = init_params(config, jax.random.PRNGKey(0)), _batch(config, B=8)

    def residual_bytes(remat):
        model = GPT(dataclasses.replace(config, remat=remat))
        _, residuals = jax.linearize(lambda p: trainer.loss_fn(p, model, batch), params)
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(residuals))

    none, dots, block = (residual_bytes(r) for r in ("none", "dots", "block"))
    assert block * 3 < dots < none


def test_layouts_convert_both_ways_for_params_and_optimizer_state():
    config = dataclasses.replace(MODERN, scan_layers=True)
    unrolled = dataclasses.replace(config, scan_layers=False)
    params = init_params(unrolled, jax.random.PRNGKey(0))
    stacked = to_layout(params, config)
    assert jax.tree.structure(stacked) == jax.tree.structure(abstract_params(config))
    assert _max_diff(to_layout(stacked, unrolled), params) == 0.0
    assert to_layout(params, unrolled) is params  # already in that layout
    assert count_params(config) == count_params(unrolled)
    tx = optim.make_optimizer(_optimizer_config("adamw"))
    state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=stacked,
                               opt_state=tx.init(stacked), rng=jax.random.PRNGKey(0))
    back = to_layout(state, unrolled)
    assert jax.tree.structure(back.opt_state) == jax.tree.structure(tx.init(params))


def _optimizer_config(name):
    from gpt_jax import config as config_lib

    c = config_lib.base_config()
    c.optimizer, c.warmup_steps = name, 0
    return c


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_optimizers_update_stacked_layers_as_they_update_each_layer(optimizer):
    """Weight decay skips a stacked block's biases and norms; Muon orthogonalises each layer's
    matrix alone (the layer axis is a batch axis)."""
    config = dataclasses.replace(BASE, scan_layers=True)
    unrolled = dataclasses.replace(config, scan_layers=False)
    params = init_params(unrolled, jax.random.PRNGKey(0))
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(p.size), p.shape),
                         params)
    tx = optim.make_optimizer(_optimizer_config(optimizer))
    updates, _ = tx.update(grads, tx.init(params), params)
    stacked = to_layout(params, config)
    stacked_updates, _ = tx.update(to_layout(grads, config), tx.init(stacked), stacked)
    assert _max_diff(to_layout(stacked_updates, unrolled), updates) < 1e-6
    masks = optim.decay_mask(stacked)["h"]
    assert masks["attn"]["c_attn"] == {"kernel": True, "bias": False}
    assert masks["ln_1"] == {"scale": False, "bias": False}


def test_cached_samples_are_the_same_scanned():
    config = dataclasses.replace(MODERN, block_size=32)
    params = jax.tree.map(lambda p: 5 * p, init_params(config, jax.random.PRNGKey(0)))
    scanned = dataclasses.replace(config, scan_layers=True)
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    # 60 new tokens: the cache grows and then slides past block_size.
    options = {"max_new_tokens": 60, "temperature": 0.0, "window_keep": 16}
    expected = sampling.generate(params, config, prompts, **options)
    got = sampling.generate(to_layout(params, scanned), scanned, prompts, **options)
    np.testing.assert_array_equal(got, expected)
    assert len(set(expected[0].tolist())) > 5


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train(out, *extra, devices=1, steps=6):
    flags = [*tiny_flags(out), "--config.model.n_layer=2", "--config.batch_size=8",
             "--config.log_interval=1", "--config.eval_interval=3",
             "--config.checkpoint_interval=3", f"--config.max_steps={steps}", *extra]
    result = run_cli("train.py", "--config", CPU, *flags,
                     env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"})
    assert result.returncode == 0, result.stderr + result.stdout
    return result


def _assert_same_records(records, reference):
    assert [r["step"] for r in records] == [r["step"] for r in reference]
    for got, want in zip(records, reference, strict=True):
        for key in ("train_loss", "val_loss", "grad_norm", "grad_norm/h_1", "param_norm/h_0"):
            if key in want:
                assert got[key] == pytest.approx(want[key], abs=1e-5), (got["step"], key)


def test_scanned_remat_runs_train_resume_across_layouts_and_fsdp_like_the_reference(tmp_path):
    """One device unrolled is the reference; the scanned, rematerialised model on a 2 x 4
    data x fsdp mesh trains alike, its checkpoint resumes unrolled on one device, and it
    exports as the same GPT-2 tensors."""
    reference = tmp_path / "reference"
    _train(reference)
    out = tmp_path / "scanned"
    _train(out, "--config.model.scan_layers=True", "--config.model.remat=block",
           "--config.mesh.data=2", "--config.mesh.fsdp=4", devices=8, steps=3)
    _, config, params, _ = checkpoint.load_model(out, 3)
    assert config.scan_layers and "h" in params and "h_0" not in params
    resumed = _train(out)  # from the stacked checkpoint, unrolled, on one device
    assert "resuming from step 3" in resumed.stdout + resumed.stderr
    _assert_same_records(_records(out), _records(reference))
    _, unrolled, saved, _ = checkpoint.load_model(out, 6)
    _, _, want, _ = checkpoint.load_model(reference, 6)
    assert not unrolled.scan_layers and _max_diff(saved, want) < 1e-5
    _, _, stacked, _ = checkpoint.load_model(out, 3)
    tensors = hf.tensors_from_params(to_layout(stacked, unrolled), unrolled)
    hf.write(tmp_path / "hf", stacked, config)  # the scanned config's params, stacked
    from safetensors.numpy import load_file

    written = load_file(tmp_path / "hf" / "model.safetensors")
    assert set(written) == set(tensors)
    assert all(np.array_equal(written[k], tensors[k]) for k in tensors)
