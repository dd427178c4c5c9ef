"""Killed runs resume to the same bits; damaged checkpoints, NaNs and bad input cost no work."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import REPO, run_cli, tiny_flags

from gpt_jax import checkpoint, loop, trainer
from gpt_jax.errors import UserError

CPU = "configs/shakespeare_cpu.py"
# 200 steps with dropout, a checkpoint every 10 steps (2 kept), a record every 5.
CHAOS_STEPS = 200
CHAOS = [f"--config.max_steps={CHAOS_STEPS}", f"--config.decay_steps={CHAOS_STEPS}",
         "--config.model.dropout=0.1", "--config.checkpoint_interval=10",
         "--config.keep_checkpoints=2", "--config.log_interval=5", "--config.eval_interval=100"]


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _deterministic(records):
    timing = ("ms_per_step", "tokens_per_sec", "mfu")
    return [{k: v for k, v in r.items() if k not in timing} for r in records]


def _start(out, *extra):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "train.py", "--config", CPU, *tiny_flags(out),
                             *CHAOS, *extra], cwd=REPO, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_during_save(proc, out, timeout=60.0) -> bool:
    """SIGKILLs proc as soon as an orbax save is in flight; returns whether one was caught."""
    deadline = time.monotonic() + timeout
    directory = out / "checkpoints"
    while time.monotonic() < deadline and proc.poll() is None:
        if directory.is_dir() and any("tmp" in p.name for p in directory.iterdir()):
            proc.kill()
            return True
        time.sleep(0.0005)
    proc.kill()
    return False


def _progress(out) -> int:
    """Returns the newest step in metrics.jsonl (0 if none yet)."""
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass  # a line being written
    return max(steps)


def _kill_at_step(proc, out, target: int, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and _progress(out) < target:
        time.sleep(0.002)
    proc.kill()


def test_sigkill_at_random_moments_resumes_to_identical_bits(tmp_path):
    reference = tmp_path / "uninterrupted"
    assert _start(reference).wait(timeout=300) == 0

    out, rng, mid_save = tmp_path / "chaos", random.Random(0), 0
    for kill in range(5):
        proc = _start(out)
        if kill % 2:  # these land while a checkpoint is being written
            mid_save += _kill_during_save(proc, out)
        else:  # these at a random step still ahead
            _kill_at_step(proc, out, rng.randint(_progress(out) + 1, CHAOS_STEPS - 60))
        assert proc.wait(timeout=60) == -signal.SIGKILL
    final = _start(out)
    _, stderr = final.communicate(timeout=300)
    assert final.returncode == 0, stderr
    print(f"chaos: 5 SIGKILLs, {mid_save} during a checkpoint save")
    assert mid_save >= 1

    last = checkpoint.load_model(reference)[2], checkpoint.load_model(out)[2]
    jax.tree.map(np.testing.assert_array_equal, *last)  # identical bits
    assert _deterministic(_records(out)) == _deterministic(_records(reference))


def _env_devices(n):
    return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}


def test_resume_on_fewer_devices_continues_the_same_run(tmp_path):
    flags = ["--config.batch_size=8", "--config.log_interval=1", "--config.eval_iters=1"]

    def train(out, devices, steps):
        result = run_cli("train.py", "--config", CPU, *tiny_flags(out), *flags,
                         f"--config.max_steps={steps}", env=_env_devices(devices))
        assert result.returncode == 0, result.stderr
        return result

    train(tmp_path / "four", 4, 20)
    train(tmp_path / "elastic", 4, 10)
    resumed = train(tmp_path / "elastic", 2, 20)
    assert "resuming from step 10" in resumed.stdout and "data=2 x fsdp=1" in resumed.stdout
    four, elastic = _records(tmp_path / "four"), _records(tmp_path / "elastic")
    assert [r["step"] for r in four] == [r["step"] for r in elastic]
    for a, b in zip(four, elastic, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-5), a["step"]


def test_sigterm_saves_then_exits_143_and_the_rerun_resumes(tmp_path):
    out = tmp_path / "run"
    long_run = ["--config.max_steps=100000", "--config.decay_steps=100000",
                "--config.log_interval=1", "--config.eval_interval=1000"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "train.py", "--config", CPU, *tiny_flags(out),
                             *long_run], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step 3 |"):
            break
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    *notes, last = stderr.strip().splitlines()
    assert "stopped by SIGTERM at step" in last and all(n.startswith("note: ") for n in notes)
    stopped_at = int(last.split("at step ")[1].split(";")[0])
    assert checkpoint.open_for_reading(out).latest_step() == stopped_at
    again = run_cli("train.py", "--config", CPU, *tiny_flags(out), *long_run,
                    f"--config.max_steps={stopped_at + 1}")
    assert again.returncode == 0 and f"resuming from step {stopped_at}" in again.stdout


def test_a_second_signal_stops_at_once():
    with loop.StopRequests() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT  # the first one only asks the loop to stop
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def _largest_file(directory):
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["truncate state", "remove metadata"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(tiny_config, tmp_path, capsys,
                                                               damage):
    reference = tiny_config.copy_and_resolve_references()
    reference.out_dir, reference.max_steps = str(tmp_path / "reference"), 20
    trainer.run(reference)

    tiny_config.max_steps = 20
    trainer.run(tiny_config)  # checkpoints at 10 and 20
    step_20 = checkpoint.checkpoint_dir(tiny_config.out_dir) / "20"
    if damage == "truncate state":
        victim = _largest_file(step_20 / "state")
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    else:
        (step_20 / "config" / "metadata").unlink(missing_ok=True)
        for p in (step_20 / "config").iterdir():
            p.unlink()
    capsys.readouterr()
    trainer.run(tiny_config)
    out = capsys.readouterr().out
    warning = [line for line in out.splitlines() if "checkpoint 20 is damaged" in line]
    assert len(warning) == 1 and "moved it to" in warning[0]
    assert "resuming from step 10" in out
    moved = list((tmp_path / "run" / "damaged").iterdir())
    assert [p.name.split("-")[0] for p in moved] == ["20"]  # set aside, not deleted
    a, b = checkpoint.load_model(reference.out_dir), checkpoint.load_model(tiny_config.out_dir)
    assert a[0] == b[0] == 20
    jax.tree.map(np.testing.assert_array_equal, a[2], b[2])


def test_nan_names_its_step_and_never_reaches_a_checkpoint(tiny_config):
    tiny_config.learning_rate, tiny_config.min_lr, tiny_config.grad_clip = 1e12, 1e12, 0.0
    tiny_config.checkpoint_interval = 1
    with pytest.raises(UserError, match=r"became NaN/Inf at step (\d+)") as err:
        trainer.run(tiny_config)
    first_bad = int(err.value.args[0].split("at step ")[1].split(":")[0])
    manager = checkpoint.open_for_reading(tiny_config.out_dir)
    assert max(manager.all_steps()) < first_bad  # nothing saved from that step on
    params = checkpoint.load_model(tiny_config.out_dir)[2]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_skip_nonfinite_skips_and_counts(tiny_config):
    tiny_config.learning_rate, tiny_config.min_lr, tiny_config.grad_clip = 1e12, 1e12, 0.0
    tiny_config.skip_nonfinite = True
    trainer.run(tiny_config)
    records = _records(Path(tiny_config.out_dir))
    assert records[-1]["step"] == 20 and records[-1]["skipped_steps"] > 0
    params = checkpoint.load_model(tiny_config.out_dir)[2]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def _file_state(directory):
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_other_corpus_or_model_in_the_same_out_dir_touches_nothing(tmp_path):
    out = tmp_path / "run"
    assert run_cli("train.py", "--config", CPU, *tiny_flags(out),
                   "--config.max_steps=10").returncode == 0
    before = _file_state(out)
    corpus = tmp_path / "other.txt"
    corpus.write_text("a different vocabulary entirely! " * 200)
    for args, message in (([f"--config.data.path={corpus}"], "another tokenizer"),
                          (["--config.model.n_layer=2"], "model.n_layer 1 vs 2")):
        result = run_cli("train.py", "--config", CPU, *tiny_flags(out), "--config.max_steps=20",
                         *args)
        assert result.returncode == 2 and message in result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert _file_state(out) == before  # checkpoints and metrics.jsonl untouched
