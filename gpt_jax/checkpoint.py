"""Checkpoints through orbax's CheckpointManager: train state plus config and tokenizer as JSON.

Layout: OUT_DIR/checkpoints/<step>/{state, config, tokenizer}. Every checkpoint carries the
model's hyperparameters and the tokenizer table, so sampling needs nothing else.
"""

import shutil
import time
from pathlib import Path

import orbax.checkpoint as ocp

from gpt_jax import data
from gpt_jax.errors import UserError
from gpt_jax.model import GPTConfig, abstract_params

CHECKPOINT_SUBDIR = "checkpoints"


def checkpoint_dir(out_dir) -> Path:
    return Path(out_dir).expanduser().absolute() / CHECKPOINT_SUBDIR


def make_manager(out_dir, keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
    """Returns a manager over OUT_DIR/checkpoints keeping the newest `keep` checkpoints.

    Saves are asynchronous: `save` returns once orbax holds the arrays, the files are written
    in the background, and the next save (or `wait_until_finished`) waits for them.
    """
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(checkpoint_dir(out_dir), options=options,
                                 item_names=("state", "config", "tokenizer"))


def save(manager: ocp.CheckpointManager, step: int, state, config: dict, tokenizer: dict) -> None:
    """Starts saving `state` at `step` (asynchronously; call manager.wait_until_finished())."""
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(config),
        tokenizer=ocp.args.JsonSave(tokenizer),
    ), force=True)


class DamagedCheckpoint(Exception):
    """A checkpoint step that exists but cannot be read back."""


def restore_state(manager: ocp.CheckpointManager, step: int, abstract_state):
    """Returns the train state saved at `step`, shaped and placed like `abstract_state`.

    Raises DamagedCheckpoint when the step's files are missing or corrupt.
    """
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
    except Exception as err:  # noqa: BLE001 (orbax raises many types for a damaged tree)
        raise DamagedCheckpoint(_first_line(err)) from None
    return restored.state


def set_aside(manager: ocp.CheckpointManager, step: int) -> Path:
    """Moves a damaged step out of the checkpoints (to OUT_DIR/damaged/) and returns where.

    Nothing is deleted: the files stay for inspection, and the manager forgets the step.
    """
    source = Path(manager.directory) / str(step)
    target = source.parent.parent / "damaged" / f"{step}-{int(time.time())}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(source, target)
    manager.reload()
    return target


def has_checkpoint(out_dir) -> bool:
    """Returns whether out_dir holds at least one checkpoint step directory."""
    directory = checkpoint_dir(out_dir)
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def open_for_reading(out_dir) -> ocp.CheckpointManager:
    """Returns a manager over an existing run's checkpoints, or raises UserError."""
    directory = checkpoint_dir(out_dir)
    if not Path(out_dir).expanduser().is_dir():
        raise UserError(f"checkpoint directory {out_dir} does not exist: pass the out_dir of a "
                        "training run, e.g. --checkpoint out/shakespeare")
    manager = make_manager(out_dir, create=False) if directory.is_dir() else None
    if manager is None or manager.latest_step() is None:
        raise UserError(f"{out_dir} holds no checkpoint (nothing under {directory}): train first "
                        f"with python train.py --config ... --config.out_dir={out_dir}")
    return manager


def read_metadata(manager: ocp.CheckpointManager, step: int) -> tuple[dict, dict]:
    """Returns (config, tokenizer table) saved with the checkpoint at `step`."""
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore(), tokenizer=ocp.args.JsonRestore()))
        return dict(restored.config), dict(restored.tokenizer)
    except Exception as err:  # noqa: BLE001 (missing or truncated JSON, in orbax's wrapping)
        raise DamagedCheckpoint(_first_line(err)) from None


def restore_params(manager: ocp.CheckpointManager, step: int, abstract_params):
    """Returns only the parameters saved at `step` (the optimizer state is not read)."""
    target = {"params": abstract_params}
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True)))
    except Exception as err:  # noqa: BLE001 (orbax raises many types for a damaged tree)
        raise DamagedCheckpoint(_first_line(err)) from None
    return restored.state["params"]


def load_model(out_dir, step: int | None = None):
    """Returns (step, GPTConfig, params, tokenizer) of a run's checkpoint (newest by default)."""
    manager = open_for_reading(out_dir)
    step = manager.latest_step() if step is None else step
    if step not in manager.all_steps():
        raise UserError(f"{out_dir} has no checkpoint at step {step}: it has "
                        f"{sorted(manager.all_steps())}")
    try:
        saved_config, tokenizer_table = read_metadata(manager, step)
        tokenizer = data.tokenizer_from_json(tokenizer_table)
        config = GPTConfig(vocab_size=tokenizer.vocab_size, **saved_config["model"])
        params = restore_params(manager, step, abstract_params(config))
    except DamagedCheckpoint as err:
        older = sorted(s for s in manager.all_steps() if s < step)
        hint = f"pass --step {older[-1]}" if older else "retrain"
        raise UserError(f"checkpoint {manager.directory / str(step)} is damaged ({err}): "
                        f"{hint}") from None
    manager.close()
    return step, config, params, tokenizer


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__
