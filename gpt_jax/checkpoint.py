"""Checkpoints through orbax's CheckpointManager: train state plus config and tokenizer as JSON.

Layout: OUT_DIR/checkpoints/<step>/{state, config, tokenizer}. Every checkpoint carries the
model's hyperparameters and the tokenizer table, so sampling needs nothing else.
"""

import dataclasses
import functools
import os
import shutil
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from gpt_jax import tokenization
from gpt_jax.errors import UserError
from gpt_jax.metrics import log
from gpt_jax.model import (
    STACKED,
    GPTConfig,
    abstract_params,
    effective_fields,
    saved_model_fields,
    to_layout,
)

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
    saved, wanted = _layouts(manager, step, abstract_state)
    target = abstract_state if saved == wanted else _replicated(
        jax.eval_shape(functools.partial(to_layout, config=saved), abstract_state),
        abstract_state)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target))).state
    except Exception as err:  # noqa: BLE001 (orbax raises many types for a damaged tree)
        raise DamagedCheckpoint(_first_line(err)) from None
    if saved == wanted:
        return restored
    shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
    with_shardings = all(s is not None for s in jax.tree.leaves(shardings))
    return jax.jit(functools.partial(to_layout, config=wanted),
                   out_shardings=shardings if with_shardings else None)(restored)


def _layouts(manager: ocp.CheckpointManager, step: int, abstract_state):
    """Returns (the saved layout, the wanted one) of a train state's parameters: GPTConfigs
    differing at most in scan_layers (see model.to_layout)."""
    model = saved_model_fields(read_metadata(manager, step)[0].get("model", {}))
    saved = GPTConfig(vocab_size=1, n_layer=model.get("n_layer", 12),
                      scan_layers=bool(model["scan_layers"]))
    return saved, dataclasses.replace(saved, scan_layers=STACKED in abstract_state.params)


def _replicated(abstract, like):
    """Returns `abstract` with each leaf replicated over the mesh `like`'s leaves lie on (a
    checkpoint of the other layout is restored whole, then converted into place)."""
    placed = [x.sharding for x in jax.tree.leaves(like) if x.sharding is not None]
    if not placed:
        return abstract
    everywhere = placed[0]
    if isinstance(everywhere, NamedSharding):
        everywhere = NamedSharding(everywhere.mesh, PartitionSpec())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=everywhere),
                        abstract)


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
        tokenizer = tokenization.tokenizer_from_json(tokenizer_table)
        # The kernels are this machine's choice, not the one the run was trained on.
        config = GPTConfig(vocab_size=tokenizer.vocab_size,
                           **{**saved_model_fields(saved_config["model"]), "kernels": "auto"})
        params = restore_params(manager, step, abstract_params(config))
    except DamagedCheckpoint as err:
        older = sorted(s for s in manager.all_steps() if s < step)
        hint = f"pass --step {older[-1]}" if older else "retrain"
        raise UserError(f"checkpoint {manager.directory / str(step)} is damaged ({err}): "
                        f"{hint}") from None
    manager.close()
    return step, config, params, tokenizer


def check_out_dir(out_dir: str) -> None:
    """Raises UserError when out_dir is not a directory this process can create or write."""
    path = Path(out_dir).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise UserError(f"out_dir {path} is a file: choose a directory, --config.out_dir=DIR")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"out_dir {path} cannot be written ({ancestor} is not a writable "
                        "directory): choose another --config.out_dir")


def latest_metadata(out_dir) -> tuple[int | None, tuple[dict, dict] | None]:
    """Returns (step, (config, tokenizer)) of out_dir's newest checkpoint whose metadata reads;
    (None, None) when it has none. Damaged ones are moved aside with a notice."""
    if not has_checkpoint(out_dir):
        return None, None
    manager = open_for_reading(out_dir)
    try:
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                return step, read_metadata(manager, step)
            except DamagedCheckpoint as err:
                moved = set_aside(manager, step)
                log(f"warning: checkpoint {step} is damaged ({err}); moved it to {moved}")
        return None, None
    finally:
        manager.close()


def restore_latest_good(manager: ocp.CheckpointManager, abstract_state):
    """Returns (step, state) of the newest checkpoint that restores, newest first.

    A damaged checkpoint (files missing or truncated, e.g. by a kill during a save on a file
    system without atomic renames) is moved to OUT_DIR/damaged/ with a one-line notice and
    the next older one is tried; (None, None) when none is left.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return step, restore_state(manager, step, abstract_state)
        except DamagedCheckpoint as err:
            moved = set_aside(manager, step)
            log(f"warning: checkpoint {step} is damaged ({err}); moved it to {moved} and "
                "fell back to the previous one")
    log("warning: no checkpoint could be restored; starting from scratch")
    return None, None


# Model fields that may change between runs of one out_dir: the parameters stay the same.
# scan_layers changes the parameters' layout, not their values: a restore converts them.
FREE_MODEL_FIELDS = ("dropout", "dtype", "kernels", "attention", "remat", "scan_layers")


def check_compatible(config, saved: tuple[dict, dict], tokenizer_table: dict) -> None:
    """Raises UserError when out_dir's checkpoint was made by another model or tokenizer."""
    saved_config, saved_tokenizer = saved
    # Fields added since a checkpoint was written take the value it was trained with.
    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    saved_model = effective_fields({**defaults,
                                    **saved_model_fields(saved_config.get("model", {}))})
    model = effective_fields(config.model.to_dict())
    diffs = [f"{k} {saved_model.get(k)!r} vs {v!r}" for k, v in model.items()
             if saved_model.get(k) != v and k not in FREE_MODEL_FIELDS]
    if diffs:
        raise UserError(f"{config.out_dir} holds a checkpoint of a different model "
                        f"(model.{'; model.'.join(diffs)}): use a new --config.out_dir or the "
                        "settings it was trained with")
    saved_optimizer = saved_config.get("optimizer", "adamw")  # older runs: AdamW
    if saved_optimizer != config.optimizer:
        raise UserError(f"{config.out_dir} holds a checkpoint trained with optimizer="
                        f"{saved_optimizer}, whose state does not fit optimizer="
                        f"{config.optimizer}: use a new --config.out_dir or "
                        f"--config.optimizer={saved_optimizer}")
    if saved_tokenizer != tokenizer_table:
        raise UserError(f"{config.out_dir} holds a checkpoint trained on a corpus with another "
                        "tokenizer: use a new --config.out_dir or the original data.path")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__
