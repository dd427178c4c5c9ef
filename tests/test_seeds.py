"""Seed lanes: vmap_seeds seeds as runs of their own, stacked along one leading axis."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import config as config_lib
from gpt_jax import data, seeds, sharding
from gpt_jax.errors import UserError


def _config(vmap_seeds: int):
    config = config_lib.base_config()
    config.vmap_seeds, config.seed, config.out_dir = vmap_seeds, 7, "out/x"
    config.model.block_size, config.batch_size = 8, 2
    return config


def test_one_seed_is_the_run_itself():
    config = _config(1)
    lanes = seeds.Lanes(seeds.lane_configs(config))
    assert lanes.configs == [config] and not lanes.vmapped and len(lanes) == 1
    tree = {"w": jnp.arange(3)}
    assert lanes.part(tree, 0) is tree


def test_several_seeds_are_runs_of_their_own():
    configs = seeds.lane_configs(_config(3))
    assert [(c.seed, c.vmap_seeds, Path(c.out_dir)) for c in configs] == [
        (s, 1, Path("out/x") / f"seed_{s}") for s in (7, 8, 9)]
    lanes = seeds.Lanes(configs)
    assert lanes.vmapped
    stacked = {"w": jnp.arange(6).reshape(3, 2)}
    np.testing.assert_array_equal(lanes.part(stacked, 2)["w"], [4, 5])


def test_stacked_batches_are_each_seeds_own():
    lanes = seeds.Lanes(seeds.lane_configs(_config(2)))
    dataset = data.Dataset(train=np.arange(100, dtype=np.uint16), val=np.arange(50,
                           dtype=np.uint16), tokenizer=None, directory=Path("."))
    inputs, targets = lanes.batch(dataset, step=3, mesh=None)
    assert inputs.shape == targets.shape == (2, 2, 8)
    for k, c in enumerate(lanes.configs):
        np.testing.assert_array_equal(inputs[k], data.train_batch(dataset, c, 3)[0])


def test_refusals():
    config = _config(2)
    config.init_from = "hf:gpt2"
    with pytest.raises(UserError, match="vmap_seeds > 1 cannot start from init_from"):
        seeds.lane_configs(config)
    lanes = seeds.Lanes(seeds.lane_configs(_config(2)))

    class TwoDevices:
        size = 2
    with pytest.raises(UserError, match="trains the seeds on one device"):
        lanes.check_mesh(TwoDevices())
    lanes.check_mesh(sharding.mesh_of((1, 1), jax.devices()[:1]))
