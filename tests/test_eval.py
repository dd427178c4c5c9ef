"""The validation measure: fixed windows, exact means, bits per byte, any device count."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import REPO

from gpt_jax import config as config_lib
from gpt_jax import data, tokenization, trainer
from gpt_jax.errors import UserError
from gpt_jax.metrics import token_losses
from gpt_jax.model import GPT, init_params


def test_fixed_windows_tile_the_split_or_spread_evenly_over_it():
    np.testing.assert_array_equal(data.eval_starts(1001, 10, 10**6), np.arange(100) * 10)
    np.testing.assert_array_equal(data.eval_starts(1000, 10, 10**6), np.arange(99) * 10)
    starts = data.eval_starts(100_001, 10, 300)  # 30 of the 10,000 windows
    assert len(starts) == 30 and starts[0] == 0
    assert np.all(starts % 10 == 0) and np.all(np.diff(starts) >= 10)
    assert starts[-1] + 10 + 1 <= 100_001
    assert np.ptp(np.diff(starts)) <= 10  # evenly spread


def _scored_rows(dataset, config, split="val"):
    """Returns the target rows an evaluation scores (weight 1), in order."""
    rows = []
    for (_, targets_BT, weights_BT, _), _, _ in data.eval_batches(dataset, config, split, 0):
        rows += [t for t, w in zip(targets_BT, weights_BT[:, 0], strict=True) if w]
    return np.stack(rows)


def test_fixed_windows_do_not_depend_on_seed_step_or_batch_size(tiny_config):
    dataset = data.load_dataset(tiny_config.data)
    reference = _scored_rows(dataset, tiny_config)
    assert len(reference) == tiny_config.eval_tokens // tiny_config.model.block_size
    for changes in ({"seed": 7}, {"batch_size": 3}, {"batch_size": 8, "grad_accum_steps": 2}):
        config = tiny_config.copy_and_resolve_references()
        config.update(changes)
        np.testing.assert_array_equal(_scored_rows(dataset, config), reference)
    later = [b for b, _, _ in data.eval_batches(dataset, tiny_config, "val", step=250)]
    first = [b for b, _, _ in data.eval_batches(dataset, tiny_config, "val", step=0)]
    jax.tree.map(np.testing.assert_array_equal, later, first)


def _model_and_params(config, vocab):
    model_cfg = config_lib.model_config(config, vocab)
    return GPT(model_cfg), init_params(model_cfg, jax.random.PRNGKey(0))


def test_fixed_loss_is_the_exact_mean_over_the_windows_and_char_bpb_is_loss_over_ln2(
        tiny_config):
    tiny_config.batch_size = 3  # 8 windows: the last batch is padded with 1 row
    dataset = data.load_dataset(tiny_config.data)
    model, params = _model_and_params(tiny_config, dataset.tokenizer.vocab_size)
    losses = trainer.estimate_loss(trainer.make_eval_step(model), params, dataset, tiny_config, 0)
    for split in ("train", "val"):
        starts = data.eval_starts(len(getattr(dataset, split)), 16, tiny_config.eval_tokens)
        inputs_BT, targets_BT = data._crops(getattr(dataset, split), starts, 16)
        logits_BTV = model.apply({"params": params}, inputs_BT)
        expected = np.asarray(token_losses(logits_BTV, targets_BT), np.float64).mean()
        assert losses[split] == pytest.approx(expected, rel=1e-6)
    assert set(dataset.tokenizer.chars.encode("utf-8")) and dataset.tokenizer.chars.isascii()
    assert losses["val_bpb"] == pytest.approx(losses["val"] / math.log(2), rel=1e-12)


def test_char_bpb_counts_the_bytes_of_non_ascii_characters():
    tokenizer = tokenization.CharTokenizer.from_text("aé€😀")
    np.testing.assert_array_equal(tokenizer.token_bytes(), [1, 2, 3, 4])


def test_bpe_bytes_are_those_of_the_decoded_text(tiny_config):
    tiny_config.data.tokenizer = "gpt2"
    tiny_config.eval_tokens = 64 * 16
    dataset = data.load_dataset(tiny_config.data)
    n_bytes, rows = 0, []
    for (_, targets_BT, weights_BT, bytes_BT), _, batch_bytes in data.eval_batches(
            dataset, tiny_config, "val", 0):
        assert batch_bytes == bytes_BT.sum()
        n_bytes += batch_bytes
        rows += [t for t, w in zip(targets_BT, weights_BT[:, 0], strict=True) if w]
    text = "".join(dataset.tokenizer.decode(row) for row in rows)
    assert n_bytes == len(text.encode("utf-8")) > 0
    token_bytes = dataset.tokenizer.token_bytes()
    assert token_bytes[50256] == 0  # <|endoftext|> stands for no text
    assert token_bytes[dataset.tokenizer.encode(" the")[0]] == 4


def test_random_mode_is_nanogpts_estimate(tiny_config):
    tiny_config.eval_mode = "random"
    dataset = data.load_dataset(tiny_config.data)
    model, params = _model_and_params(tiny_config, dataset.tokenizer.vocab_size)
    losses = trainer.estimate_loss(trainer.make_eval_step(model), params, dataset, tiny_config, 3)
    batch_means = []
    for i in range(tiny_config.eval_iters):  # the crops nanoGPT's estimate_loss would draw
        inputs_BT, targets_BT = data.get_batch(dataset.val, batch_size=4, block_size=16,
                                               seed=tiny_config.seed, stream=3,
                                               step=3 * tiny_config.eval_iters + i)
        logits_BTV = model.apply({"params": params}, inputs_BT)
        batch_means.append(float(token_losses(logits_BTV, targets_BT).mean()))
    assert losses["val"] == pytest.approx(np.mean(batch_means), rel=1e-6)


_DEVICES_SCRIPT = """
import json, sys
import jax, ml_collections
from gpt_jax import checkpoint, data, sharding, trainer
from gpt_jax.model import GPT
manager = checkpoint.open_for_reading(sys.argv[1])
config = ml_collections.ConfigDict(checkpoint.read_metadata(manager, manager.latest_step())[0])
_, model_cfg, params, _ = checkpoint.load_model(sys.argv[1])
dataset = data.load_dataset(config.data)
out = {}
for shape in [(1, 1), (4, 1), (2, 2)]:
    mesh = sharding.mesh_of(shape, jax.devices()[:shape[0] * shape[1]])
    step = trainer.make_eval_step(GPT(model_cfg), mesh)
    out[str(shape)] = trainer.estimate_loss(step, params, dataset, config, 0, mesh)
print(json.dumps(out))
"""


def test_the_same_checkpoint_scores_the_same_on_one_and_four_devices(tiny_config):
    tiny_config.max_steps = tiny_config.checkpoint_interval = 10
    tiny_config.eval_tokens = 16 * 40  # 40 windows: 10 batches of 4, split 4 or 2x2 ways
    last = trainer.run(tiny_config)
    result = subprocess.run(
        [sys.executable, "-c", _DEVICES_SCRIPT, tiny_config.out_dir], cwd=REPO,
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO),
             "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout.splitlines()[-1])
    one = scores["(1, 1)"]
    assert one["val"] == pytest.approx(last["val_loss"], abs=1e-6)
    assert one["val_bpb"] == pytest.approx(last["val_bpb"], abs=1e-6)
    for shape in ("(4, 1)", "(2, 2)"):
        for key in ("train", "val", "val_bpb"):
            assert abs(scores[shape][key] - one[key]) < 1e-6, (shape, key)


def test_records_carry_val_bpb_beside_val_loss(tiny_config):
    trainer.run(tiny_config)
    records = [json.loads(line) for line in
               (Path(tiny_config.out_dir) / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 10, 20]
    for r in evals:
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2), rel=1e-12)


@pytest.mark.parametrize("changes, message", [
    ({"eval_mode": "sometimes"}, "eval_mode='sometimes' is unknown"),
    ({"eval_tokens": 8}, "eval_tokens=8 holds no block_size=16 window"),
])
def test_bad_eval_settings_are_user_errors(tiny_config, changes, message):
    tiny_config.update(changes)
    with pytest.raises(UserError, match=message):
        config_lib.validate(tiny_config)
