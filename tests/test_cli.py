"""train.py, sample.py and bench.py as a user runs them, in fresh processes."""

import os
import signal
import subprocess
import sys

import pytest
from conftest import REPO, run_cli, tiny_flags

CPU = "configs/shakespeare_cpu.py"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny checkpoint trained by train.py (20 steps), shared by the sampling tests."""
    out = tmp_path_factory.mktemp("cli") / "run"
    result = run_cli("train.py", "--config", CPU, *tiny_flags(out))
    assert result.returncode == 0, result.stderr
    assert "step 20 |" in result.stdout
    return out


def test_sample_prints_only_text_on_stdout(trained):
    result = run_cli("sample.py", "--checkpoint", trained, "--prompt", "ROMEO:",
                     "--num_samples", "3", "--max_new_tokens", "40", "--seed", "1")
    assert result.returncode == 0, result.stderr
    samples = result.stdout.split("\n" + "-" * 40 + "\n")
    assert len(samples) == 3
    assert all(s.startswith("ROMEO:") and len(s.rstrip("\n")) >= 6 for s in samples)
    assert "loaded" in result.stderr and "loaded" not in result.stdout


def test_greedy_sampling_is_reproducible(trained):
    args = ("sample.py", "--checkpoint", trained, "--temperature", "0", "--max_new_tokens", "30")
    first, second = run_cli(*args, "--seed", "1"), run_cli(*args, "--seed", "2")
    assert first.returncode == 0 and first.stdout == second.stdout


def _corpus(tmp_path, content: bytes):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    return f"--config.data.path={path}"


BAD_TRAIN = {
    "empty corpus": (lambda t: [_corpus(t, b"")], "is empty"),
    "short corpus": (lambda t: [_corpus(t, b"abcdefghij" * 5)], "lower --config.model.block_size"),
    "not utf-8": (lambda t: [_corpus(t, b"caf\xe9" * 100)], "is not UTF-8 text"),
    "unknown key": (lambda t: ["--config.model.n_lyer=2"], "did you mean 'n_layer'"),
    "wrong type": (lambda t: ["--config.model.n_layer=two"], "invalid literal for int"),
    "heads": (lambda t: ["--config.model.n_head=3"], "not divisible by model.n_head=3"),
    "missing path": (lambda t: [f"--config.data.path={t}/nope.txt"], "does not exist"),
    "no such config": (lambda t: ["--config=configs/nope.py"], "configs/nope.py does not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD_TRAIN))
def test_bad_train_input_is_one_line(case, tmp_path):
    make_args, message = BAD_TRAIN[case]
    args = make_args(tmp_path)
    config = [a for a in args if a.startswith("--config=")] or ["--config", CPU]
    overrides = [a for a in args if not a.startswith("--config=")]
    result = run_cli("train.py", *config, *tiny_flags(tmp_path / "run"), *overrides)
    _assert_one_line_error(result, message)
    assert not (tmp_path / "run" / "checkpoints").exists()


BAD_SAMPLE = {
    "missing checkpoint": (["--checkpoint", "{tmp}/nope"], "does not exist"),
    "empty out_dir": (["--checkpoint", "{tmp}"], "holds no checkpoint"),
    "prompt outside vocab": (["--checkpoint", "{run}", "--prompt", "日本"], "outside the model's"),
    "zero new tokens": (["--checkpoint", "{run}", "--max_new_tokens", "0"], "max_new_tokens"),
    "negative temperature": (["--checkpoint", "{run}", "--temperature", "-1"], "temperature"),
    "top_k zero": (["--checkpoint", "{run}", "--top_k", "0"], "top_k must be at least 1"),
    "not a number": (["--checkpoint", "{run}", "--num_samples", "x"], "invalid int value"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAMPLE))
def test_bad_sample_input_is_one_line(case, trained, tmp_path):
    args, message = BAD_SAMPLE[case]
    args = [a.format(tmp=tmp_path, run=trained) for a in args]
    _assert_one_line_error(run_cli("sample.py", *args), message)


def _assert_one_line_error(result, message):
    assert result.returncode != 0
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]


def test_sigint_saves_a_checkpoint_and_the_rerun_resumes(tmp_path):
    out = tmp_path / "run"
    flags = [*tiny_flags(out), "--config.max_steps=100000", "--config.decay_steps=100000",
             "--config.log_interval=1", "--config.eval_interval=1000"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "train.py", "--config", CPU, *flags], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("step 3 |"):
            break
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "stopped by SIGINT at step" in stderr and "Traceback" not in stderr
    stopped_at = int(stderr.split("at step ")[1].split(";")[0])
    again = run_cli("train.py", "--config", CPU, *flags, f"--config.max_steps={stopped_at + 2}")
    assert again.returncode == 0, again.stderr
    assert f"resuming from step {stopped_at}" in again.stdout


def test_bench_prints_the_closing_line():
    result = run_cli("bench.py", "--config", CPU, "--steps", "3", "--warmup", "1",
                     "--config.model.n_layer=1", "--config.model.n_embd=32",
                     "--config.model.n_head=2")
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("tokens_per_sec=") and " ms_per_step=" in last
    assert "compile_s=" in result.stdout
