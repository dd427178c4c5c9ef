"""The nanoGPT baseline of `benchmarks/bench.py --mode nanogpt` computes what gpt-jax does.

Same parameters in both: the same loss, the same gradients and the same first AdamW update
(clipping, weight decay on matrices only), so the side-by-side timing compares equal work.
"""

import jax
import numpy as np
import pytest

from gpt_jax import config as config_lib
from gpt_jax import hf, optim, trainer
from gpt_jax.errors import UserError
from gpt_jax.model import GPT


def _config(bias: bool):
    c = config_lib.base_config()
    c.batch_size, c.learning_rate, c.weight_decay, c.beta2 = 4, 1e-2, 0.1, 0.99
    c.lr_schedule, c.warmup_steps, c.grad_clip = "constant", 0, 0.5  # the clip is active
    c.model.update(block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=bias)
    return c


def _by_name(tree, model_cfg):
    return hf.tensors_from_params(jax.tree.map(np.asarray, tree), model_cfg)


@pytest.mark.parametrize("bias", [False, True])
def test_nanogpt_baseline_matches_gpt_jax_loss_gradients_and_first_update(bias):
    from conftest import require_parity_libs

    require_parity_libs()
    import torch

    from benchmarks import torch_nanogpt

    config = _config(bias)
    model_cfg = config_lib.model_config(config, 65)
    tx = optim.make_optimizer(config)
    state = trainer.init_train_state(model_cfg, tx, seed=0)
    params_before = _by_name(state.params, model_cfg)
    tokens = np.random.default_rng(0).integers(0, 65, (4, 17), dtype=np.int32)
    batch = (tokens[:, :-1], tokens[:, 1:])

    model = torch_nanogpt.build(model_cfg, gelu="tanh")
    torch_nanogpt.load_params(model, state.params, model_cfg)
    x, y = (torch.from_numpy(a.astype(np.int64)) for a in batch)

    loss, grads = jax.value_and_grad(trainer.loss_fn)(state.params, GPT(model_cfg), batch)
    torch_loss = model(x, y)
    torch_loss.backward()
    assert abs(float(loss) - torch_loss.item()) < 1e-5
    torch_params = dict(model.named_parameters())
    transposed = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
    compared = 0
    for name, grad in _by_name(grads, model_cfg).items():
        if name not in torch_params:
            continue  # biases of a bias=False model
        torch_grad = torch_params[name].grad.numpy()
        torch_grad = torch_grad.T if name.endswith(transposed) else torch_grad
        np.testing.assert_allclose(grad, torch_grad, atol=2e-6, err_msg=name)
        compared += 1
    assert compared == len(torch_params)  # every nanoGPT parameter (lm_head is wte)

    optimizer = torch_nanogpt.make_optimizer(model, config)
    model.zero_grad(set_to_none=True)
    torch_nanogpt.train_step(model, optimizer, x, y, config.grad_clip)
    step = trainer.make_train_step(GPT(model_cfg), tx, grad_clip=config.grad_clip)
    state, _ = step(state, batch)
    moved = 0
    for name, value in _by_name(state.params, model_cfg).items():
        if name not in torch_params:
            continue
        torch_value = torch_params[name].detach().numpy()
        torch_value = torch_value.T if name.endswith(transposed) else torch_value
        # 1e-5 is 0.1% of the step: Adam's m / sqrt(v) magnifies rounding where |g| ~ eps
        np.testing.assert_allclose(value, torch_value, atol=1e-5, err_msg=name)
        moved += not np.allclose(value, params_before[name], atol=1e-4)
    assert moved == compared  # every tensor took a visible step (lr 1e-2)


def test_nanogpt_baseline_refuses_a_model_nanogpt_cannot_express():
    model_cfg = config_lib.model_config(_config(False), 65)
    from dataclasses import replace

    from benchmarks import torch_nanogpt

    with pytest.raises(UserError, match="nanoGPT has no equivalent of this model: "
                                        "activation='relu'"):
        torch_nanogpt.build(replace(model_cfg, activation="relu"))
