"""Command-line plumbing of train.py and benchmarks/bench.py: the --config flag and its errors."""

import os
import re
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags

from gpt_jax.errors import UserError

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path of a config file (configs/*.py) with get_config().", lock_config=True)
# Multi-process runs: either name the coordinator explicitly (every process gets the same
# address and count, and its own id), or let JAX detect the cluster (SLURM, TPU pods, ...).
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 in a multi-process run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0-based.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() and let JAX detect the cluster.")


def parse_config(argv: list[str]) -> ml_collections.ConfigDict:
    """Returns the config that `--config FILE --config.FIELD=VALUE ...` describes.

    Raises UserError with one line for a missing file, an unknown field or a wrong type.
    """
    # ml_collections reads the --config.FIELD overrides from sys.argv, not from FLAGS(argv):
    # parse `argv` as if it were the command line, so that a caller (a test, a sweep) may
    # parse several in one process.
    saved_argv, sys.argv = sys.argv, list(argv)
    for name in [n for n in FLAGS if n.startswith("config.")]:
        delattr(FLAGS, name)  # the previous parse's overrides, defined for its config file
    try:
        return _parse_config(argv)
    finally:
        sys.argv = saved_argv


def _parse_config(argv: list[str]) -> ml_collections.ConfigDict:
    filename = _config_filename(argv)
    if filename is None:
        raise UserError("no config given: pass --config configs/shakespeare.py")
    if not os.path.isfile(filename):
        raise UserError(f"config file {filename} does not exist: pick one of configs/*.py")
    try:
        FLAGS(argv)
    except flags.UnrecognizedFlagError as err:
        raise UserError(f"{err}: use --config FILE and --config.FIELD=VALUE") from None
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as err:
        text = _clean(err)
        other = re.match(r"flag --(?!config\b)([\w.]+)=.*?: (.*)", text)
        if other:  # a value for one of the script's own flags, not the config's
            raise UserError(f"bad value for --{other[1]}: {other[2]} (--help lists the flags)"
                            ) from None
        raise UserError(f"bad --config override: {text} (the fields are listed in "
                        "gpt_jax/config.py and the README)") from None
    try:
        return _CONFIG.value
    except Exception as err:  # noqa: BLE001 (the config file itself failed to load)
        raise UserError(f"config file {filename} could not be loaded: {_clean(err)}") from None


def init_distributed() -> None:
    """Starts JAX's distributed runtime when the flags ask for a multi-process run."""
    import jax

    explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise UserError("a multi-process run needs all of --coordinator_address, "
                            "--num_processes and --process_id")
        if not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
            raise UserError(f"--process_id={_PROCESS_ID.value} must be in [0, "
                            f"{_NUM_PROCESSES.value})")
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    elif _DISTRIBUTED.value:
        jax.distributed.initialize()


def with_default_config(argv: list[str], path: str) -> list[str]:
    """Returns argv with `--config PATH` after the program name when argv names no config."""
    if _config_filename(argv) is not None:
        return list(argv)
    return [*argv[:1], "--config", path, *argv[1:]]


def _config_filename(argv: list[str]) -> str | None:
    """Returns the value of --config in argv (the file part of FILE:ARGS), or None."""
    for i, arg in enumerate(argv):
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1].split(":")[0]
        if arg.startswith(("--config=", "-config=")):
            return arg.split("=", 1)[1].split(":")[0]
    return None


def _clean(err: BaseException) -> str:
    text = str(err)
    typo = re.search(r'Did you mean "([\w.]+)" instead of "([\w.]+)"', text)
    if typo:
        return f"unknown field '{typo.group(2)}' (did you mean '{typo.group(1)}'?)"
    key = re.fullmatch(r"""['"]*([\w.]+)['"]*""", text.strip())
    if isinstance(err, (KeyError, AttributeError)) and key:
        return f"unknown field '{key.group(1)}'"
    return re.sub(r"\s+", " ", text.replace("\\n", " ")).strip()
