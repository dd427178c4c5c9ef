import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from gpt_jax import checkpoint, data, loop, optim, tokenization, trainer
from gpt_jax import config as config_lib
from gpt_jax import metrics as metrics_lib
from gpt_jax.errors import UserError
from gpt_jax.model import GPT, GPTConfig


def _params(out_dir, step):
    manager = checkpoint.open_for_reading(out_dir)
    cfg, tok = checkpoint.read_metadata(manager, step)
    vocab_size = tokenization.tokenizer_from_json(tok).vocab_size
    model_cfg = GPTConfig(vocab_size=vocab_size, **cfg["model"])
    from gpt_jax.model import abstract_params
    return checkpoint.restore_params(manager, step, abstract_params(model_cfg))


def _records(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_overfits_one_batch():
    cfg = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=64)
    from configs.shakespeare_cpu import get_config
    config = get_config()
    config.learning_rate, config.min_lr, config.warmup_steps, config.max_steps = 3e-3, 3e-3, 0, 300
    config.weight_decay = 0.0
    tx = optim.make_optimizer(config)
    state = trainer.init_train_state(cfg, tx, seed=0)
    tokens = np.random.default_rng(0).integers(0, 32, size=(4, 17)).astype(np.int32)
    batch = (tokens[:, :-1], tokens[:, 1:])
    step = trainer.make_train_step(GPT(cfg), tx)
    for _ in range(300):
        state, metrics = step(state, batch)
    assert float(metrics["loss"]) < 0.05
    assert int(state.step) == 300


# The first three losses of a fixed-seed tiny model with dropout, on the default kernels. They
# change only when the numerics do (init, kernels, dropout masks, AdamW, the schedule): if a
# change is meant to alter them, say so in its commit and store the new numbers here.
GOLDEN_LOSSES = [4.188041687011719, 4.126450061798096, 4.0711259841918945]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the numbers of XLA:CPU's kernels")
def test_golden_first_three_losses():
    jax.config.update("jax_threefry_partitionable", True)  # as trainer.run sets it
    from configs.shakespeare_cpu import get_config

    config = get_config()
    config.warmup_steps = 1
    cfg = GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.1)
    tx = optim.make_optimizer(config)
    state = trainer.init_train_state(cfg, tx, seed=1337)
    tokens = np.random.default_rng(0).integers(0, 65, size=(4, 33)).astype(np.int32)
    step = trainer.make_train_step(GPT(cfg), tx)
    losses = []
    for _ in range(3):
        state, step_metrics = step(state, (tokens[:, :-1], tokens[:, 1:]))
        losses.append(float(step_metrics["loss"]))
    np.testing.assert_allclose(losses, GOLDEN_LOSSES, rtol=0, atol=1e-6)


def test_run_logs_evals_and_checkpoints(tiny_config, capsys):
    trainer.run(tiny_config)
    out = capsys.readouterr().out
    assert "parameters: " in out and "memory in float32" in out and "compiled in" in out
    records = _records(Path(tiny_config.out_dir))
    assert [r["step"] for r in records] == [0, 5, 10, 15, 20]
    assert all({"step", "train_loss", "lr"} <= r.keys() for r in records)
    timed = metrics_lib.read_records(tiny_config.out_dir)
    assert all({"tokens_per_sec", "mfu", "elapsed_s"} <= r.keys() for r in timed[1:])
    assert [("val_loss" in r) for r in records] == [True, False, True, False, True]
    assert records[0]["lr"] == 0.0 and records[-1]["lr"] == pytest.approx(1e-4)
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    manager = checkpoint.open_for_reading(tiny_config.out_dir)
    assert sorted(manager.all_steps()) == [10, 20]
    saved_config, tokenizer = checkpoint.read_metadata(manager, 20)
    assert saved_config["model"]["n_embd"] == 32 and tokenizer["kind"] == "char"
    assert len(tokenizer["chars"]) == 65


def test_resume_is_bit_identical(tiny_config, tmp_path, capsys):
    tiny_config.model.dropout = 0.1  # dropout masks must be reproduced too
    straight = tiny_config.copy_and_resolve_references()
    straight.out_dir = str(tmp_path / "straight")
    trainer.run(straight)

    tiny_config.out_dir = str(tmp_path / "stopped")
    tiny_config.max_steps = 10
    trainer.run(tiny_config)
    tiny_config.max_steps = 20
    capsys.readouterr()
    trainer.run(tiny_config)
    assert "resuming from step 10" in capsys.readouterr().out

    for step in (10, 20):  # step 10 was saved mid-run while later steps donated the state
        a, b = _params(straight.out_dir, step), _params(tiny_config.out_dir, step)
        jax.tree.map(np.testing.assert_array_equal, a, b)
    metrics_file = "metrics.jsonl"  # the records, byte for byte (wall-clock figures aside)
    assert (tmp_path / "stopped" / metrics_file).read_bytes() == (
        tmp_path / "straight" / metrics_file).read_bytes()


def test_save_restore_gives_identical_params_and_next_step(tiny_config, tmp_path):
    model_cfg = config_lib.model_config(tiny_config, 65)
    tx = optim.make_optimizer(tiny_config)
    step = trainer.make_train_step(GPT(model_cfg), tx)
    batch = data.train_batch(data.load_dataset(tiny_config.data), tiny_config, 0)
    state = trainer.init_train_state(model_cfg, tx, seed=0)
    for _ in range(3):
        state, _ = step(state, batch)
    manager = checkpoint.make_manager(tmp_path / "ckpt")
    checkpoint.save(manager, 3, state, tiny_config.to_dict(), {"kind": "char", "chars": "ab"})
    manager.wait_until_finished()
    template = trainer.init_train_state(model_cfg, tx, seed=1)
    restored = checkpoint.restore_state(manager, 3, template)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(restored))
    _, m1 = step(state, batch)
    _, m2 = step(restored, batch)
    assert float(m1["loss"]) == float(m2["loss"])


def test_resume_with_another_model_is_refused(tiny_config):
    tiny_config.max_steps = 10
    trainer.run(tiny_config)
    tiny_config.model.n_embd = 64
    with pytest.raises(UserError, match="different model .*n_embd 32 vs 64"):
        trainer.run(tiny_config)


def test_nothing_to_do_when_max_steps_reached(tiny_config, capsys):
    tiny_config.max_steps = 10
    trainer.run(tiny_config)
    trainer.run(tiny_config)
    assert "nothing to do" in capsys.readouterr().out


def test_gradient_accumulation_equals_one_large_batch():
    from configs.shakespeare_cpu import get_config

    cfg = GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=32)
    tx = optim.make_optimizer(get_config())
    tokens = np.random.default_rng(0).integers(0, 32, size=(8, 17)).astype(np.int32)
    batch = (tokens[:, :-1], tokens[:, 1:])
    results = {}
    for accum in (1, 4):
        state = trainer.init_train_state(cfg, tx, seed=0)
        step = trainer.make_train_step(GPT(cfg), tx, grad_accum_steps=accum)
        for _ in range(2):
            state, metrics = step(state, batch)
        results[accum] = (state.params, float(metrics["loss"]), float(metrics["grad_norm"]))
    assert results[4][1] == pytest.approx(results[1][1], abs=1e-6)
    assert results[4][2] == pytest.approx(results[1][2], rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), results[4][0],
                 results[1][0])


def test_grad_accum_must_divide_the_batch(tiny_config):
    tiny_config.grad_accum_steps = 3
    with pytest.raises(UserError, match="batch_size=4 is not divisible by grad_accum_steps=3"):
        trainer.run(tiny_config)


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32_loss():
    from configs.shakespeare_cpu import get_config

    tx = optim.make_optimizer(get_config())
    tokens = np.random.default_rng(0).integers(0, 32, size=(8, 17)).astype(np.int32)
    batch = (tokens[:, :-1], tokens[:, 1:])
    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=32, dtype=dtype)
        state = trainer.init_train_state(cfg, tx, seed=0)
        step = trainer.make_train_step(GPT(cfg), tx)
        losses[dtype] = []
        for _ in range(3):
            state, metrics = step(state, batch)
            losses[dtype].append(float(metrics["loss"]))
        assert {x.dtype for x in jax.tree.leaves(state.params)} == {np.dtype("float32")}
        logits = GPT(cfg).apply({"params": state.params}, batch[0])
        assert logits.dtype == np.float32  # the loss and softmax statistics stay float32
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], atol=0.03)
    assert losses["bfloat16"] != losses["float32"]  # the matmuls really ran in bfloat16


def test_auto_dtype_is_float32_on_cpu_and_saved_resolved(tiny_config):
    assert tiny_config.model.dtype == "auto"
    tiny_config.max_steps = 1
    trainer.run(tiny_config)
    saved = checkpoint.read_metadata(checkpoint.open_for_reading(tiny_config.out_dir), 1)[0]
    assert saved["model"]["dtype"] == "float32"
    assert tiny_config.model.dtype == "auto"  # the caller's config is not changed


def test_same_config_and_seed_give_an_identical_metrics_file(tiny_config, tmp_path):
    tiny_config.model.dropout = 0.1
    for name in ("a", "b"):
        tiny_config.out_dir = str(tmp_path / name)
        trainer.run(tiny_config)
    a, b = ((tmp_path / n / "metrics.jsonl").read_bytes() for n in "ab")
    assert a == b and len(a.splitlines()) == 5  # steps 0, 5, 10, 15, 20


def _tensorboard_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """Returns {tag: [(step, value), ...]} read from TensorBoard event files (TFRecords)."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in sorted(Path(directory).glob("events.out.tfevents.*")):
        payload = path.read_bytes()
        offset = 0
        while offset < len(payload):
            (length,) = struct.unpack("<Q", payload[offset:offset + 8])
            event = event_pb2.Event.FromString(payload[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_stability_signals_and_tensorboard(tiny_config):
    tiny_config.grad_clip = 1e-3  # every step clips
    trainer.run(tiny_config)
    records = metrics_lib.read_records(tiny_config.out_dir)
    last = records[-1]
    assert last["clip_fraction"] == 1.0
    for kind in ("grad_norm", "param_norm", "update_norm"):
        layers = {k.split("/")[1] for k in last if k.startswith(kind + "/")}
        assert layers == {"wte", "wpe", "h_0", "ln_f"}
        per_layer = np.sqrt(sum(last[f"{kind}/{layer}"] ** 2 for layer in layers))
        assert per_layer == pytest.approx(last[kind], rel=1e-5)  # the layers make up the total
    assert last["tokens_per_sec"] > 0 and "tokens_per_sec" not in _records(
        Path(tiny_config.out_dir))[-1]  # wall-clock figures live in timing.jsonl
    scalars = _tensorboard_scalars(Path(tiny_config.out_dir) / "tensorboard")
    assert [step for step, _ in scalars["train_loss"]] == [0, 5, 10, 15, 20]
    assert scalars["val_loss"][-1][1] == pytest.approx(last["val_loss"], rel=1e-6)


def test_vmap_seeds_train_like_separate_runs_and_resume(tiny_config, tmp_path):
    tiny_config.model.dropout = 0.1
    separate = {}
    for seed in (1337, 1338):
        c = tiny_config.copy_and_resolve_references()
        c.seed, c.out_dir = seed, str(tmp_path / f"alone_{seed}")
        trainer.run(c)
        separate[seed] = _records(Path(c.out_dir))
    tiny_config.vmap_seeds, tiny_config.out_dir = 2, str(tmp_path / "vmap")
    tiny_config.max_steps = 10
    trainer.run(tiny_config)
    tiny_config.max_steps = 20  # and resume the pair from step 10
    trainer.run(tiny_config)
    for seed in (1337, 1338):
        lane = _records(tmp_path / "vmap" / f"seed_{seed}")
        assert [r["step"] for r in lane] == [r["step"] for r in separate[seed]]
        for a, b in zip(lane, separate[seed], strict=True):
            assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
            assert a.get("val_loss") == pytest.approx(b.get("val_loss"), abs=1e-5)
        step, _, params, _ = checkpoint.load_model(tmp_path / "vmap" / f"seed_{seed}")
        alone = _params(tmp_path / f"alone_{seed}", 20)
        assert step == 20
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), params, alone)
    assert separate[1337][-1]["train_loss"] != separate[1338][-1]["train_loss"]


def _recipe(name: str, out_dir, max_steps: int):
    """Returns a recipe as a user runs it for a quick try: only max_steps changed, with the
    model shrunk so that the test stays fast (the schedule, 100 warmup steps, is the recipe's)."""
    import importlib

    config = importlib.import_module(f"configs.{name}").get_config()
    config.max_steps, config.out_dir = max_steps, str(out_dir)
    config.model.update(n_layer=1, n_head=2, n_embd=32, block_size=16)
    config.update(batch_size=4, eval_iters=2, checkpoint_interval=max(1, max_steps // 2))
    return config


@pytest.mark.parametrize("recipe", ["shakespeare_cpu", "shakespeare"])
@pytest.mark.parametrize("max_steps", [1, 5, 60])
def test_runs_shorter_than_the_warmup_train_checkpoint_and_resume(recipe, max_steps, tmp_path,
                                                                  capsys):
    straight = _recipe(recipe, tmp_path / "straight", max_steps)
    last = trainer.run(straight)
    err = capsys.readouterr().err
    note = f"warming up over {max_steps // 2} steps" if max_steps > 1 else "no warmup instead"
    assert note in err and err.count("\n") == 1
    assert last["step"] == max_steps and np.isfinite(last["val_loss"])
    manager = checkpoint.open_for_reading(straight.out_dir)
    assert manager.latest_step() == max_steps
    # Resume: drop the newest checkpoint, as if the run had died after the one before it.
    resumed = _recipe(recipe, tmp_path / "resumed", max_steps)
    import shutil
    shutil.copytree(straight.out_dir, resumed.out_dir)
    shutil.rmtree(checkpoint.checkpoint_dir(resumed.out_dir) / str(max_steps))
    trainer.run(resumed)
    kept = (max_steps - 1) // straight.checkpoint_interval * straight.checkpoint_interval
    if kept:
        assert f"resuming from step {kept}" in capsys.readouterr().out
    jax.tree.map(np.testing.assert_array_equal, _params(straight.out_dir, max_steps),
                 _params(resumed.out_dir, max_steps))
    assert (tmp_path / "resumed" / "metrics.jsonl").read_bytes() == (
        tmp_path / "straight" / "metrics.jsonl").read_bytes()


@pytest.mark.parametrize("log, save, evals, logged, saved, evaluated", [
    (1, 5, 10, list(range(21)), [5, 10, 15, 20], [0, 10, 20]),
    # Saves between log lines are reported at the next one; eval steps are log lines too.
    (3, 5, 7, [0, 3, 6, 7, 9, 12, 14, 15, 18, 20], [6, 12, 15, 20], [0, 7, 14, 20]),
])
def test_logged_intervals_evals_and_saves_add_up_to_the_loop_time(
        tiny_config, capsys, log, save, evals, logged, saved, evaluated):
    tiny_config.update(log_interval=log, checkpoint_interval=save, eval_interval=evals)
    trainer.run(tiny_config)
    out = capsys.readouterr().out
    loop_s = float(re.search(r"trained 20 steps in ([\d.]+) s", out)[1])
    records = metrics_lib.read_records(tiny_config.out_dir)
    assert [r["step"] for r in records] == logged
    assert [r["step"] for r in records if "save_s" in r] == saved
    assert [r["step"] for r in records if "eval_s" in r] == evaluated
    stepping = sum(r["ms_per_step"] / 1000 * (r["step"] - before["step"])
                   for before, r in zip(records, records[1:]))
    aside = sum(r.get("eval_s", 0.0) + r.get("save_s", 0.0) for r in records)
    assert abs(stepping + aside - loop_s) <= 0.02 * loop_s, (stepping, aside, loop_s)
    assert records[-1]["eta_s"] == 0.0 and records[1]["eta_s"] > 0
    assert "evaluating up to 128 tokens of train and val..." in out
    assert re.search(r"step 20 \| .* \| eval [\d.]+ s \| save [\d.]+ s \| eta 0s", out)


def test_a_cpu_run_of_hours_points_at_the_cpu_recipe(tiny_config, capsys, monkeypatch):
    monkeypatch.setattr(loop, "SLOW_RUN_S", 0.0)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")  # the hint is for CPUs only
    trainer.run(tiny_config)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "configs/shakespeare_cpu.py" in err[0]
