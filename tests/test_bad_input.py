"""Bad training input: the first error names the real problem, in one line, touching nothing.

Each row is (arguments after the recipe, words the message must contain). The rows run the
real command-line parser and trainer.run in this process; one subprocess test checks what a
user sees from train.py itself (exit code 2, a single `error:` line, no traceback).
"""

import numpy as np
import pytest
from conftest import REPO, run_cli

from gpt_jax import cli, trainer
from gpt_jax.errors import UserError

CPU = str(REPO / "configs" / "shakespeare_cpu.py")
BABY = str(REPO / "configs" / "shakespeare.py")

# The recipes as a user types them for a quick try: 5 steps, far shorter than their 100-step
# warmup (which once hid every error below behind a schedule complaint).
SHORT = ["--config.max_steps=5"]

ROWS = {
    "empty corpus": (["--config.data.path={tmp}/empty.txt"], ["corpus", "is empty"]),
    "random bytes": (["--config.data.path={tmp}/random.bin"], ["corpus", "binary"]),
    "not utf-8": (["--config.data.path={tmp}/latin1.txt"], ["corpus", "is not UTF-8 text"]),
    "short corpus": (["--config.data.path={tmp}/short.txt"],
                     ["lower --config.model.block_size"]),
    "corpus is a directory": (["--config.data.path={tmp}/dir"], ["is not a prepared corpus"]),
    "missing corpus": (["--config.data.path={tmp}/nope.txt"], ["does not exist"]),
    "n_head does not divide n_embd": (["--config.model.n_head=5"],
                                      ["model.n_embd=128", "model.n_head=5", "not divisible"]),
    "the model before the corpus": (["--config.data.path={tmp}/empty.txt",
                                     "--config.model.n_head=5"], ["model.n_head=5"]),
    "zero layers": (["--config.model.n_layer=0"], ["model.n_layer must be a positive integer"]),
    "negative batch": (["--config.batch_size=-4"], ["batch_size must be at least 1"]),
    "negative warmup": (["--config.warmup_steps=-1"], ["warmup_steps must be >= 0"]),
    "min_lr above lr": (["--config.min_lr=0.1"], ["min_lr <= learning_rate"]),
    "unknown dtype": (["--config.model.dtype=float8"], ["model.dtype='float8' is unknown"]),
    "unknown optimizer": (["--config.optimizer=sgd"], ["optimizer='sgd' is unknown",
                                                        "adamw, muon"]),
    "muon momentum of 1": (["--config.optimizer=muon", "--config.muon_momentum=1.0"],
                           ["0 <= muon_momentum < 1"]),
    "wsd without cool-down": (["--config.lr_schedule=wsd", "--config.decay_fraction=0"],
                              ["decay_fraction must be in (0, 1]"]),
    "unknown wsd shape": (["--config.lr_schedule=wsd", "--config.decay_shape=cubic"],
                          ["decay_shape='cubic' is unknown", "linear, 1-sqrt"]),
    "unknown kernels": (["--config.model.kernels=triton"],
                        ["model.kernels='triton' is unknown", "reference, cpu, fused"]),
    "mesh": (["--config.mesh.data=3"], ["must equal the 1 device(s)"]),
    "accumulation": (["--config.grad_accum_steps=5"], ["not divisible by grad_accum_steps=5"]),
    "out_dir under a file": (["--config.out_dir={tmp}/random.bin/run"], ["cannot be written"]),
    "unknown key": (["--config.model.n_lyer=2"], ["did you mean 'n_layer'"]),
    "wrong type": (["--config.model.n_layer=two"], ["invalid literal for int"]),
    "no such config": (["--config={tmp}/nope.py"], ["nope.py does not exist"]),
}


@pytest.fixture
def inputs(tmp_path):
    """Writes the bad corpora the rows name into tmp_path."""
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "random.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 " * 100)
    (tmp_path / "short.txt").write_bytes(b"abcdefghij" * 5)
    (tmp_path / "dir").mkdir()
    return tmp_path


def _argv(recipe: str, args: list[str], tmp) -> list[str]:
    args = [a.format(tmp=tmp) for a in args]
    config = [a for a in args if a.startswith("--config=")] or [f"--config={recipe}"]
    return ["train.py", *config, *SHORT, f"--config.out_dir={tmp}/run",
            *[a for a in args if not a.startswith("--config=")]]


@pytest.mark.parametrize("recipe", [CPU, BABY], ids=["cpu", "baby"])
@pytest.mark.parametrize("case", sorted(ROWS))
def test_the_first_error_names_the_real_problem(case, recipe, inputs, capsys):
    args, words = ROWS[case]
    if recipe == BABY and "model.n_embd=128" in words:
        words = ["model.n_embd=384", "model.n_head=5", "not divisible"]
    with pytest.raises(UserError) as err:
        trainer.run(cli.parse_config(_argv(recipe, args, inputs)))
    message = str(err.value)
    assert all(w in message for w in words), message
    assert "warmup" not in message or "warmup" in case, message
    assert "\n" not in message.strip()
    assert capsys.readouterr().err == ""  # no notice before the error
    assert not (inputs / "run").exists()  # nothing written


def test_train_py_prints_one_error_line_and_exits_2(inputs):
    result = run_cli("train.py", *_argv(CPU, ROWS["empty corpus"][0], inputs)[1:])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: corpus ") and "empty" in lines[0]
    assert not (inputs / "run").exists()
