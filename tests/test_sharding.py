"""Sharded training on simulated CPU devices: layouts agree, FSDP shards, checkpoints move
between device counts, two processes train together, and the step compiles once."""

import json
import logging
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, run_cli, tiny_flags

from gpt_jax import checkpoint, trainer
from gpt_jax import config as config_lib

CPU = "configs/shakespeare_cpu.py"
# 8 rows split over up to 8 devices; a loss record at every step.
FLAGS = ["--config.batch_size=8", "--config.log_interval=1", "--config.eval_iters=1"]


def _devices(n: int) -> dict:
    return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}


def _train(out, devices: int, *extra, steps: int = 10) -> subprocess.CompletedProcess:
    result = run_cli("train.py", "--config", CPU, *tiny_flags(out), *FLAGS,
                     f"--config.max_steps={steps}", *extra, env=_devices(devices))
    assert result.returncode == 0, result.stderr + result.stdout
    return result


def _losses(out) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), "duplicate records"
    return {r["step"]: r["train_loss"] for r in records if r["step"] > 0}


def _assert_same_run(losses, reference, params=None, reference_params=None):
    for step, loss in losses.items():
        assert loss == pytest.approx(reference[step], abs=1e-5), step
    if params is not None:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params,
                     reference_params)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A 14-step run on one device: the losses and step-10 params every layout must match."""
    out = tmp_path_factory.mktemp("sharding") / "one_device"
    _train(out, 1, "--config.checkpoint_interval=10", "--config.keep_checkpoints=5", steps=14)
    return out


def _params_at(out, step):
    return checkpoint.load_model(out, step)[2]


@pytest.mark.parametrize("data, fsdp", [(8, 1), (2, 4)])
def test_layouts_train_like_one_device(reference, tmp_path, data, fsdp):
    out = tmp_path / f"d{data}f{fsdp}"
    result = _train(out, 8, f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}")
    assert f"mesh: data={data} x fsdp={fsdp}" in result.stdout
    _assert_same_run(_losses(out), _losses(reference), _params_at(out, 10),
                     _params_at(reference, 10))
    if fsdp > 1:  # the 2 x 4 checkpoint resumes on 4 devices and restores on 1 for sampling
        _train(out, 4, "--config.mesh.fsdp=4", steps=14)
        _assert_same_run(_losses(out), _losses(reference))
        sample = run_cli("sample.py", "--checkpoint", out, "--max_new_tokens", "5")
        assert sample.returncode == 0, sample.stderr


def test_fsdp_shards_parameters_and_adam_state():
    script = """
import jax, ml_collections
from gpt_jax import optim, sharding, trainer
from gpt_jax.model import GPTConfig
from configs.shakespeare_cpu import get_config
cfg = GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=32)
tx = optim.make_optimizer(get_config())
mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": -1}))
init = lambda: trainer.init_train_state(cfg, tx, 0)
state = jax.jit(init, out_shardings=sharding.tree_shardings(jax.eval_shape(init), mesh))()
kernel = state.params["h_0"]["mlp"]["c_fc"]["kernel"]
moment = state.opt_state[1][0].mu["h_0"]["mlp"]["c_fc"]["kernel"]
print(dict(mesh.shape), kernel.shape, {s.data.shape for s in kernel.addressable_shards},
      {s.data.shape for s in moment.addressable_shards},
      state.params["ln_f"]["scale"].addressable_shards[0].data.shape)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, env={**_env(), **_devices(8)}, check=False)
    assert result.returncode == 0, result.stderr
    # fsdp=4: the (32, 128) matrix and its AdamW moment are split 4 ways along 128; the
    # LayerNorm scale (32,) stays whole.
    expected = "{'data': 2, 'fsdp': 4} (32, 128) {(32, 32)} {(32, 32)} (32,)"
    assert result.stdout.strip() == expected


def _env() -> dict:
    import os

    return dict(os.environ, PYTHONPATH=str(REPO))


def test_two_processes_train_and_checkpoint_like_one(reference, tmp_path):
    out = tmp_path / "two_processes"
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "train.py", "--config", CPU, *tiny_flags(out), *FLAGS,
            "--config.max_steps=10", f"--coordinator_address=localhost:{port}",
            "--num_processes=2"]
    procs = [subprocess.Popen([*args, f"--process_id={i}"], cwd=REPO, text=True,
                              env={**_env(), **_devices(2)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for i in range(2)]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, stderr + stdout
    assert "mesh: data=4 x fsdp=1" in outputs[0][0]
    # Only process 0 logs (gloo's own connection lines aside).
    assert "step" not in outputs[1][0] and "step 10 |" in outputs[0][0]
    assert checkpoint.has_checkpoint(out) and (out / "checkpoints" / "10").is_dir()
    _assert_same_run(_losses(out), _losses(reference), _params_at(out, 10),
                     _params_at(reference, 10))


def test_batch_that_does_not_split_is_one_line(tmp_path):
    result = run_cli("train.py", "--config", CPU, *tiny_flags(tmp_path / "run"),
                     "--config.batch_size=12", env=_devices(8))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "error: batch_size=12 does not split evenly over 8 device(s) × 1 micro-batch(es): "
        "make it a multiple of 8")
    assert not (tmp_path / "run").exists()


def test_one_device_step_has_no_collectives(tiny_config):
    # A pmean over a one-device mesh is a no-op that XLA:CPU would still run as an all-reduce.
    from gpt_jax import optim
    from gpt_jax.model import GPT

    model_cfg = config_lib.model_config(tiny_config, 65)
    tx = optim.make_optimizer(tiny_config)
    state = trainer.init_train_state(model_cfg, tx, 0)
    batch = (np.zeros((8, model_cfg.block_size), np.int32),) * 2
    hlo = trainer.make_train_step(GPT(model_cfg), tx).lower(state, batch).as_text()
    assert "all-reduce" not in hlo and "all_reduce" not in hlo


def test_train_step_compiles_once_over_a_run(tiny_config, caplog):
    tiny_config.max_steps, tiny_config.eval_interval = 12, 5  # evals, logs and saves between
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING, logger="jax"):
            trainer.run(tiny_config)
    finally:
        jax.config.update("jax_log_compiles", False)
    compiles = [r.getMessage() for r in caplog.records
                if r.getMessage().startswith("Compiling jit(")]
    assert sum(m.startswith("Compiling jit(train_step)") for m in compiles) == 1
    assert sum(m.startswith("Compiling jit(eval_step)") for m in compiles) == 1


def test_second_run_reads_the_persistent_compilation_cache(tmp_path):
    cache = {"GPT_JAX_CACHE": str(tmp_path / "cache")}
    first = run_cli("train.py", "--config", CPU, *tiny_flags(tmp_path / "a"), env=cache)
    second = run_cli("train.py", "--config", CPU, *tiny_flags(tmp_path / "b"), env=cache)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "from the persistent compilation cache" not in first.stdout
    assert "from the persistent compilation cache" in second.stdout
