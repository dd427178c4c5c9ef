"""Seed lanes: the seeds one run trains, one at a time or several at once (vmap_seeds).

One lane is an ordinary run. With vmap_seeds = K > 1, K seeds (seed, seed + 1, ...) train at
once through jax.vmap over their states, batches and dropout keys, in one compiled step; each
seed is a run of its own in OUT_DIR/seed_<seed>/ (checkpoints, metrics, resumable alone). The
loop sees the lanes only through `Lanes`: a stacked state's leaves carry a leading lane axis.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gpt_jax import checkpoint, data, metrics
from gpt_jax.errors import UserError


def lane_configs(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
    """Returns the config of each seed a run trains: itself, or vmap_seeds copies in
    OUT_DIR/seed_<seed>/, each an ordinary single-seed run."""
    if config.vmap_seeds == 1:
        return [config]
    if config.init_from:
        raise UserError("vmap_seeds > 1 cannot start from init_from weights (every seed would "
                        "be the same model): use vmap_seeds=1")
    lanes = []
    for i in range(config.vmap_seeds):
        c = ml_collections.ConfigDict(config.to_dict())
        c.seed, c.vmap_seeds = config.seed + i, 1
        c.out_dir = str(Path(config.out_dir) / f"seed_{c.seed}")
        lanes.append(c)
    return lanes


class Lanes:
    """The seeds of one run, their checkpoints and their metrics files."""

    def __init__(self, configs: list[ml_collections.ConfigDict]):
        self.configs = configs
        self.vmapped = len(configs) > 1
        self.managers, self.writers = [], []

    def __len__(self) -> int:
        return len(self.configs)

    def check_mesh(self, mesh) -> None:
        if self.vmapped and mesh.size > 1:
            raise UserError(f"vmap_seeds={len(self)} trains the seeds on one device; this run "
                            f"has {mesh.size}: use --config.vmap_seeds=1, or one device")

    def part(self, tree, k: int):
        """Returns lane k's part of a tree (the tree itself when there is one lane)."""
        return jax.tree.map(lambda x: x[k], tree) if self.vmapped else tree

    def batch(self, dataset: data.Dataset, step: int, mesh):
        """Returns the batch of update step + 1: lane by lane, stacked (on one device), or
        the one lane's, split over the mesh."""
        if not self.vmapped:
            return data.train_batch(dataset, self.configs[0], step, mesh)
        batches = [data.train_batch(dataset, c, step) for c in self.configs]
        return tuple(np.stack(parts) for parts in zip(*batches, strict=True))

    def jit(self, step_fn, out_shardings=None):
        """Returns step_fn (state, batch) -> (state, metrics) compiled over the lanes, with the
        state donated."""
        if self.vmapped:
            return jax.jit(jax.vmap(step_fn), donate_argnums=0)
        return jax.jit(step_fn, donate_argnums=0, out_shardings=out_shardings)

    def open_checkpoints(self) -> None:
        self.managers = [checkpoint.make_manager(c.out_dir, keep=c.keep_checkpoints)
                         for c in self.configs]

    def initial_state(self, init, shardings, resume: bool, pretrained):
        """Returns (start step or None, state): restored, imported or fresh.

        `init(seed, params=None)` builds one lane's fresh state; `shardings` says where a
        single lane's state lives (None for stacked lanes, which train on one device). Stacked
        lanes are restored at the newest step they all have.
        """
        if not self.vmapped:
            seed = self.configs[0].seed
            if resume:
                abstract = jax.tree.map(
                    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                    jax.eval_shape(init, seed), shardings)
                start, state = checkpoint.restore_latest_good(self.managers[0], abstract)
                if start is not None:
                    metrics.log(f"resuming from step {start}")
                    return start, state
            if pretrained is not None:
                return None, jax.device_put(init(seed, params=pretrained), shardings)
            return None, jax.jit(init, static_argnums=0, out_shardings=shardings)(seed)
        seeds = jnp.array([c.seed for c in self.configs])
        if not resume:
            return None, jax.jit(jax.vmap(init))(seeds)
        start = min(m.latest_step() for m in self.managers)
        abstract = jax.eval_shape(init, 0)
        states = []
        for c, manager in zip(self.configs, self.managers, strict=True):
            try:
                states.append(checkpoint.restore_state(manager, start, abstract))
            except checkpoint.DamagedCheckpoint as err:
                raise UserError(f"{c.out_dir} step {start} could not be restored ({err}): "
                                "resume that seed alone with vmap_seeds=1") from None
        metrics.log(f"resuming {len(self)} seeds from step {start}")
        return start, jax.tree.map(lambda *xs: jnp.stack(xs), *states)

    def open_writers(self, start: int, wandb_project: str) -> None:
        self.writers = [metrics.MetricsWriter(c.out_dir, resume_step=start,
                                              enabled=jax.process_index() == 0,
                                              wandb_project=wandb_project,
                                              run_config=c.to_dict()) for c in self.configs]

    def save(self, k: int, step: int, state, tokenizer_table: dict) -> None:
        """Starts saving lane k's state at `step` (the files are written in the background)."""
        checkpoint.save(self.managers[k], step, self.part(state, k), self.configs[k].to_dict(),
                        tokenizer_table)

    def write(self, k: int, record: dict, say) -> None:
        """Writes lane k's record to its metrics files and says it as a log line."""
        self.writers[k].write(record)
        line = metrics.format_record(record)
        say(f"seed {self.configs[k].seed} | {line}" if self.vmapped else line)

    def wait(self) -> None:
        for manager in self.managers:
            manager.wait_until_finished()

    def close(self) -> None:
        for manager in self.managers:
            manager.wait_until_finished()
            manager.close()
        for writer in self.writers:
            writer.close()
