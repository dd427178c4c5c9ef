"""TrainState, the pure train and eval steps, and the training loop."""

import dataclasses
import functools
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gpt_jax import checkpoint, data, host_memory, metrics, optim, sharding
from gpt_jax import config as config_lib
from gpt_jax.errors import UserError
from gpt_jax.model import GPT, GPTConfig, count_params, init_params, size_report

PyTree = Any


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # optimizer updates done
    params: PyTree
    opt_state: PyTree
    rng: jax.Array  # base key; step k's dropout key is fold_in(rng, k)
    # Steps whose loss or gradient norm was NaN/Inf (their update was not applied), and the
    # first such step (-1: none yet).
    nonfinite_steps: jax.Array = dataclasses.field(default_factory=lambda: jnp.zeros((), jnp.int32))
    first_nonfinite_step: jax.Array = dataclasses.field(
        default_factory=lambda: jnp.full((), -1, jnp.int32))
    clipped_steps: jax.Array = dataclasses.field(  # steps whose gradient norm was clipped
        default_factory=lambda: jnp.zeros((), jnp.int32))


class TrainingStopped(Exception):
    """Raised when a signal asked the run to stop; the checkpoint is already saved."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> GPTConfig:
    """Returns the GPTConfig of `config` (model.dtype and model.kernels resolved for this
    backend)."""
    config = config_lib.resolve_backend_fields(config, jax.default_backend())
    return GPTConfig(vocab_size=vocab_size, **config.model)


def init_train_state(model_cfg: GPTConfig, tx: optax.GradientTransformation,
                     seed: int, params: PyTree | None = None) -> TrainState:
    """Returns the state before the first update: GPT-2 init (or `params`), fresh AdamW moments."""
    init_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(seed))
    if params is None:
        params = init_params(model_cfg, init_rng)
    else:
        params = jax.tree.map(jnp.asarray, params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=jax.jit(tx.init)(params), rng=dropout_rng)


def loss_fn(params: PyTree, model: GPT, batch, dropout_rng=None) -> jax.Array:
    inputs_BT, targets_BT = batch
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    logits_BTV = model.apply({"params": params}, inputs_BT, rngs=rngs)
    return metrics.cross_entropy(logits_BTV, targets_BT)


def _value_and_grad(loss_of_params, params: PyTree, batch, rng: jax.Array, *,
                    grad_accum_steps: int, dropout: bool):
    """Returns (mean loss, mean gradient) over `batch`, split into grad_accum_steps micro-batches.

    The micro-batches' gradients are summed in a lax.scan: the same update as the whole batch
    at once, with the activation memory of one micro-batch.
    """
    grad_fn = jax.value_and_grad(loss_of_params)
    if grad_accum_steps == 1:
        return grad_fn(params, batch, rng if dropout else None)
    micro_batches = jax.tree.map(lambda x: x.reshape(grad_accum_steps, -1, *x.shape[1:]), batch)

    def accumulate(carry, xs):
        i, micro_batch = xs
        loss_i, grads_i = grad_fn(params, micro_batch,
                                  jax.random.fold_in(rng, i) if dropout else None)
        return jax.tree.map(jnp.add, carry, (loss_i, grads_i)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(accumulate, zeros,
                                    (jnp.arange(grad_accum_steps), micro_batches))
    return jax.tree.map(lambda x: x / grad_accum_steps, (loss, grads))


def sharded_value_and_grad(params: PyTree, batch, rng: jax.Array, *, model: GPT, mesh: Mesh,
                           grad_accum_steps: int = 1):
    """Returns (loss, grads) of the global batch, computed with jax.shard_map over the mesh.

    Each device takes its rows of the batch, gathers the parameters it holds a shard of
    (fsdp), and differentiates its own mean loss; the gradients are then reduced to the
    global mean (an explicit pmean over `data`, see sharding.reduce_gradient). Dropout masks
    differ per device (the key is folded with the device's index on the mesh).
    """
    specs = sharding.tree_specs(params, mesh)
    dropout = model.config.dropout > 0

    def local(params_local, batch_local, rng):
        if dropout:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(sharding.BATCH_AXES))

        def loss_of_params(p, micro_batch, micro_rng):
            full = jax.tree.map(sharding.gather, p, specs, is_leaf=_is_spec_leaf)
            return loss_fn(full, model, micro_batch, micro_rng)

        loss, grads = _value_and_grad(loss_of_params, params_local, batch_local, rng,
                                      grad_accum_steps=grad_accum_steps, dropout=dropout)
        grads = jax.tree.map(lambda g, s: sharding.reduce_gradient(g, s, mesh), grads, specs)
        return sharding.batch_mean(loss, mesh), grads

    return jax.shard_map(local, mesh=mesh, in_specs=(specs, P(sharding.BATCH_AXES), P()),
                         out_specs=(P(), specs), check_vma=False)(params, batch, rng)


def _is_spec_leaf(x) -> bool:
    return isinstance(x, P)


def norms(prefix: str, tree: PyTree) -> dict[str, jax.Array]:
    """Returns the global L2 norm of `tree` and of each top-level layer (wte, h_0, ..., ln_f)."""
    out = {prefix: optax.tree.norm(tree)}
    out.update({f"{prefix}/{name}": optax.tree.norm(sub) for name, sub in tree.items()})
    return out


def train_step(state: TrainState, batch, *, model: GPT, tx: optax.GradientTransformation,
               mesh: Mesh, grad_accum_steps: int = 1,
               grad_clip: float = 0.0) -> tuple[TrainState, dict]:
    """Returns the state after one AdamW update on the global `batch`, and that step's metrics.

    The dropout key of step k is fold_in(state.rng, k), drawn inside the compiled step (a
    separate host call per step would wait for the previous step and stall the dispatch
    queue), so dropout masks are a pure function of (seed, step) and resumes are exact. The
    gradient is computed under shard_map; the AdamW update runs on the sharded state as it lies.
    """
    rng = jax.random.fold_in(state.rng, state.step)
    loss, grads = sharded_value_and_grad(state.params, batch, rng, model=model, mesh=mesh,
                                         grad_accum_steps=grad_accum_steps)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A step whose loss or gradient is not finite leaves params and AdamW state as they were,
    # so NaNs never reach the parameters (or a checkpoint); the loop decides whether to stop.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                     (params, opt_state), (state.params, state.opt_state))
    first_bad = jnp.where((state.first_nonfinite_step < 0) & ~finite, state.step + 1,
                          state.first_nonfinite_step)
    clipped = (grad_clip > 0) & (grad_norm > grad_clip)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
                              first_nonfinite_step=first_bad,
                              clipped_steps=state.clipped_steps + clipped.astype(jnp.int32))
    # Stability signals: global and per-layer norms of gradients, parameters and updates.
    step_metrics = {"loss": loss, **norms("grad_norm", grads), **norms("param_norm", params),
                    **norms("update_norm", updates)}
    return new_state, step_metrics


def default_mesh() -> Mesh:
    """Returns a 1 x 1 mesh over the first device (tests and single-device tools)."""
    return sharding.mesh_of((1, 1), jax.devices()[:1])


def make_train_step(model: GPT, tx: optax.GradientTransformation, grad_accum_steps: int = 1,
                    mesh: Mesh | None = None, state_shardings=None, grad_clip: float = 0.0):
    """Returns train_step jit-compiled with the state donated (and kept in its shardings)."""
    mesh = mesh or default_mesh()
    replicated = NamedSharding(mesh, P())
    out_shardings = None if state_shardings is None else (state_shardings, replicated)
    return jax.jit(functools.partial(train_step, model=model, tx=tx, mesh=mesh,
                                     grad_accum_steps=grad_accum_steps, grad_clip=grad_clip),
                   donate_argnums=0, out_shardings=out_shardings)


def make_eval_step(model: GPT, mesh: Mesh | None = None):
    """Returns a jitted (params, batch) -> mean loss over the global batch, dropout off."""
    mesh = mesh or default_mesh()

    def eval_step(params, batch):
        specs = sharding.tree_specs(params, mesh)

        def local(params_local, batch_local):
            full = jax.tree.map(sharding.gather, params_local, specs, is_leaf=_is_spec_leaf)
            return sharding.batch_mean(loss_fn(full, model, batch_local), mesh)

        return jax.shard_map(local, mesh=mesh, in_specs=(specs, P(sharding.BATCH_AXES)),
                             out_specs=P(), check_vma=False)(params, batch)

    return jax.jit(eval_step)


def estimate_loss(eval_step, params: PyTree, dataset: data.Dataset,
                  config: ml_collections.ConfigDict, step: int, mesh: Mesh | None = None) -> dict:
    """Returns the mean loss over eval_iters random batches of each split (nanoGPT's estimate).

    Each eval batch is one micro-batch (batch_size / grad_accum_steps sequences).
    """
    batch_size = config.batch_size // config.grad_accum_steps
    rows = _process_rows(mesh, batch_size)
    out = {}
    for split in ("train", "val"):
        losses = []
        for i in range(config.eval_iters):
            batch = data.get_batch(
                getattr(dataset, split), batch_size=batch_size,
                block_size=config.model.block_size, seed=config.seed,
                stream=2 + data.SPLIT_STREAMS[split], step=step * config.eval_iters + i,
                rows=rows)
            if mesh is not None:
                batch = sharding.put_batch(batch, mesh, batch_size)
            losses.append(eval_step(params, batch))
        out[split] = float(np.mean(jax.device_get(losses)))
    return out


def train_batch(dataset: data.Dataset, config, step: int, mesh: Mesh | None = None):
    """Returns the batch of update number step + 1 (a pure function of seed and step).

    With a mesh, the batch comes back split over it; in a multi-process run each process
    reads only the rows its devices hold.
    """
    batch = data.get_batch(dataset.train, batch_size=config.batch_size,
                           block_size=config.model.block_size, seed=config.seed, step=step,
                           rows=_process_rows(mesh, config.batch_size))
    return batch if mesh is None else sharding.put_batch(batch, mesh, config.batch_size)


def _process_rows(mesh: Mesh | None, batch_size: int) -> slice | None:
    if mesh is None or jax.process_count() == 1:
        return None
    return sharding.local_rows(mesh, batch_size)


class _StopRequests:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def log(message: str) -> None:
    """Prints a progress line (from process 0 only in multi-process runs)."""
    if jax.process_index() == 0:
        print(message, flush=True)


def warn(message: str) -> None:
    """Prints a one-line notice on standard error, above a progress bar (from process 0)."""
    if jax.process_index() == 0:
        tqdm.tqdm.write(message, file=sys.stderr)


def run(config: ml_collections.ConfigDict) -> dict:
    """Trains (or resumes) the run that `config` describes; returns the last eval record.

    With vmap_seeds = K > 1, K seeds (seed, seed + 1, ...) train at once through jax.vmap
    over their states, batches and dropout keys, in one compiled step; each seed is a run
    of its own in OUT_DIR/seed_<seed>/ (checkpoints, metrics, resumable alone).
    """
    jax.config.update("jax_threefry_partitionable", True)
    config_lib.validate(config)
    _check_out_dir(config.out_dir)
    config = config_lib.resolve_backend_fields(config, jax.default_backend())  # a copy
    _enable_compile_cache(config)
    dataset = data.load_dataset(config.data)
    lanes = _lane_configs(config)
    # Checkpoints are opened once the inputs are known to be good, so that a bad run never
    # creates (or touches) out_dir.
    saved = [_latest_readable_metadata(checkpoint.open_for_reading(c.out_dir))
             if checkpoint.has_checkpoint(c.out_dir) else (None, None) for c in lanes]
    pretrained = None
    if config.init_from:
        config, pretrained = _resolve_init_from(config, saved[0][1], dataset)
        lanes = [config]
    for _, meta in saved:
        if meta is not None:
            _check_compatible(config, meta, dataset.tokenizer.to_json())
    if len({step is None for step, _ in saved}) > 1:
        raise UserError(f"{config.out_dir} has checkpoints for some seeds only: resume each "
                        "seed_<N> alone with vmap_seeds=1, or use a new out_dir")
    model_cfg = model_config(config, dataset.tokenizer.vocab_size)
    dataset.check_fits(model_cfg.block_size)
    log(f"data: {dataset.directory} ({len(dataset.train):,} train / {len(dataset.val):,} val "
        f"tokens, vocab {model_cfg.vocab_size})")
    log(size_report(model_cfg))

    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch(config.batch_size, config.grad_accum_steps, mesh)
    K = len(lanes)
    if K > 1 and mesh.size > 1:
        raise UserError(f"vmap_seeds={K} trains the seeds on one device; this run has "
                        f"{mesh.size}: use --config.vmap_seeds=1, or one device")
    warmup = optim.warmup_steps(config)
    if warmup != config.warmup_steps:
        warn(f"note: warmup_steps={config.warmup_steps} does not fit in the "
             f"{optim.decay_steps(config)}-step decay; "
             + (f"warming up over {warmup} steps (half of it) instead" if warmup else
                "no warmup instead"))
    managers = [checkpoint.make_manager(c.out_dir, keep=c.keep_checkpoints) for c in lanes]
    model = GPT(model_cfg)
    tx = optim.make_optimizer(config)
    schedule = optim.lr_schedule(config)
    tokenizer_table = dataset.tokenizer.to_json()

    start, state, state_shardings = _initial_state(
        model_cfg, tx, lanes, managers, mesh, saved[0][0] is not None, pretrained)
    log(sharding.memory_report(state, mesh))
    start = int(start or 0)
    if start >= config.max_steps:
        log(f"step {start} already reached max_steps={config.max_steps}: nothing to do "
            "(raise --config.max_steps to train further)")
        for manager in managers:
            manager.close()
        return {"step": start}

    writers = [metrics.MetricsWriter(c.out_dir, resume_step=start,
                                     enabled=jax.process_index() == 0,
                                     wandb_project=config.wandb_project,
                                     run_config=c.to_dict()) for c in lanes]
    if K == 1:
        step_fn = make_train_step(model, tx, config.grad_accum_steps, mesh, state_shardings,
                                  config.grad_clip)
    else:
        step_fn = jax.jit(jax.vmap(functools.partial(
            train_step, model=model, tx=tx, mesh=mesh, grad_accum_steps=config.grad_accum_steps,
            grad_clip=config.grad_clip)), donate_argnums=0)
    eval_step = make_eval_step(model, mesh)
    tokens_per_step = config.batch_size * model_cfg.block_size

    def batch_at(step):
        if K == 1:
            return train_batch(dataset, config, step, mesh)
        batches = [train_batch(dataset, c, step) for c in lanes]
        return tuple(np.stack(parts) for parts in zip(*batches, strict=True))

    def lane(tree, k):
        return tree if K == 1 else jax.tree.map(lambda x: x[k], tree)

    def save(step, k):
        _check_finite(lane(state, k), lanes[k])  # never save after a non-finite step
        checkpoint.save(managers[k], step, lane(state, k), lanes[k].to_dict(), tokenizer_table)

    t0 = time.perf_counter()
    with _CacheHits() as hits:
        compiled = step_fn.lower(state, batch_at(start)).compile()
    log(f"train step compiled in {time.perf_counter() - t0:.2f} s"
        + (" (from the persistent compilation cache)" if hits.count else "")
        + (f", {K} seeds in one step (vmap)" if K > 1 else ""))
    flops_per_token = metrics.flops_per_token(
        count_params(model_cfg)["non_embedding"], model_cfg.n_layer, model_cfg.n_embd,
        model_cfg.block_size)
    peak, peak_source = metrics.peak_flops(mesh.devices.flat)
    log(_flops_report(K * flops_per_token * tokens_per_step, metrics.xla_flops(compiled),
                      peak, peak_source))

    def evaluate(step: int, k: int, record: dict) -> None:
        # Say what is coming before an evaluation that may take a while: the first one (its
        # length is unknown; on a CPU the baby GPT's takes a minute) and any after a long one.
        if k == 0 and (eval_round_s is None or eval_round_s >= LONG_EVAL_S):
            say(f"evaluating {config.eval_iters} batches of train and val"
                + (f" for each of {K} seeds" if K > 1 else "") + "...")
        with clock.aside("eval_s", record):
            losses = estimate_loss(eval_step, lane(state.params, k), dataset, lanes[k], step,
                                   mesh)
        record.update(eval_train_loss=losses["train"], val_loss=losses["val"])

    def emit(k: int, record: dict) -> None:
        writers[k].write(record)
        line = metrics.format_record(record)
        say(line if K == 1 else f"seed {lanes[k].seed} | {line}")

    last_eval = {}
    step = start
    # A progress bar (steps, ETA, loss) on an interactive terminal; plain log lines otherwise.
    bar_on = config.progress_bar and sys.stderr.isatty() and jax.process_index() == 0
    bar = tqdm.tqdm(total=config.max_steps, initial=start, unit="step", disable=not bar_on,
                    dynamic_ncols=True)
    say = bar.write if bar_on else log  # a line above the bar, or a plain log line
    clock = metrics.LoopClock()
    elapsed_before = [_elapsed_before(c.out_dir, start) for c in lanes]
    eval_steps = {s for s in range(start + 1, config.max_steps + 1)
                  if s % config.eval_interval == 0} | {config.max_steps}
    saves = [{} for _ in lanes]  # save seconds since each lane's last record
    saved_at = start  # the newest step saved
    # The loop's wall time at its last record, and the evaluations' and saves' share of it.
    loop_s, aside = 0.0, dict(clock.totals)
    eval_round_s = None  # how long the last evaluation (of every seed) took
    try:
        with _StopRequests() as stop:
            if start == 0:
                for k in range(K):
                    record = {"step": 0, "lr": float(schedule(0))}
                    evaluate(0, k, record)
                    last_eval = {key: record[key] for key in EVAL_KEYS}
                    emit(k, dict(record, train_loss=record["eval_train_loss"],
                                 elapsed_s=clock.elapsed()))
                eval_round_s = clock.totals["eval_s"]
            steps_since_log = 0
            pace = host_memory.StepPacer(compiled)  # at most one step ahead on a CPU
            clipped_at_log = np.asarray(state.clipped_steps)
            while step < config.max_steps:
                if stop.signum is not None:
                    if step > saved_at:
                        for k in range(K):
                            save(step, k)
                    for manager in managers:
                        manager.wait_until_finished()
                    raise TrainingStopped(
                        f"stopped by {signal.Signals(stop.signum).name} at step {step}; "
                        f"checkpoint saved in {checkpoint.checkpoint_dir(config.out_dir)}: run "
                        "the same command to resume", 128 + stop.signum)

                state, step_metrics = compiled(state, batch_at(step))
                pace(step_metrics)
                step += 1
                steps_since_log += 1

                is_last = step == config.max_steps
                if step % config.checkpoint_interval == 0 or is_last:
                    jax.block_until_ready(state)  # the step's own time is not the save's
                    for k in range(K):  # the files are written in the background (orbax)
                        with clock.aside("save_s", saves[k]):
                            save(step, k)
                    saved_at = step
                is_eval = step in eval_steps
                if step % config.log_interval == 0 or is_eval:
                    # The interval ends when its work is done and its figures are fetched.
                    records = [_step_record(step, lane(step_metrics, k), lane(state, k),
                                            lanes[k], schedule, int(lane(clipped_at_log, k)),
                                            steps_since_log) for k in range(K)]
                    seconds = clock.lap()
                    evals_left = sum(s > step for s in eval_steps)
                    evals_before = clock.totals["eval_s"]
                    for k, record in enumerate(records):
                        record.update(metrics.step_timing(
                            seconds, steps_since_log, config.max_steps - step,
                            tokens_per_step, flops_per_token, peak / K,
                            eval_s=eval_round_s or 0.0, evals_left=evals_left), **saves[k])
                        saves[k] = {}
                        if is_eval:
                            evaluate(step, k, record)
                            last_eval = {key: record[key] for key in EVAL_KEYS}
                        loop_s, aside = clock.elapsed(), dict(clock.totals)
                        record["elapsed_s"] = loop_s + elapsed_before[k]
                        emit(k, record)
                    if is_eval:
                        eval_round_s = clock.totals["eval_s"] - evals_before
                    if step - steps_since_log == start:  # the first interval of this process
                        _suggest_cpu_recipe(record["eta_s"])
                    bar.set_postfix(loss=f"{record['train_loss']:.4f}", refresh=False)
                    clipped_at_log = np.asarray(state.clipped_steps)
                    steps_since_log = 0
                bar.update(1)
    finally:
        bar.close()
        finishing = {}
        with clock.aside("save_s", finishing):  # the last checkpoint's files are written
            for manager, writer in zip(managers, writers, strict=True):
                manager.wait_until_finished()
                manager.close()
                writer.close()
    log(f"trained {step - start} steps in {loop_s:.2f} s ({metrics.format_duration(loop_s)}): "
        f"{loop_s - sum(aside.values()):.2f} s of steps, {aside['eval_s']:.2f} s evaluating, "
        f"{aside['save_s']:.2f} s saving; the last checkpoint's writes took another "
        f"{finishing['save_s']:.2f} s")
    return last_eval


# An evaluation this long (all seeds) is announced before the next one starts.
LONG_EVAL_S = 5.0
EVAL_KEYS = ("step", "lr", "eval_train_loss", "val_loss")  # what run() returns
SLOW_RUN_S = 3600  # a CPU run with more left than this is pointed at the CPU recipe


def _suggest_cpu_recipe(eta_s: float) -> None:
    """Points a CPU run that will take hours at the CPU recipe (once, after its first interval)."""
    if jax.default_backend() == "cpu" and eta_s > SLOW_RUN_S:
        warn(f"note: at this pace the run needs about {metrics.format_duration(eta_s)} more on "
             "this CPU; for a CPU try python train.py --config configs/shakespeare_cpu.py "
             "(nanoGPT's CPU recipe: a 0.8M-parameter GPT, minutes on 2 cores)")


def _lane_configs(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
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


def sharded_init(model_cfg: GPTConfig, tx: optax.GradientTransformation, seed: int, mesh: Mesh):
    """Returns (init, shardings): init(params=None) builds the fresh train state, and shardings
    says where each of its leaves lives on the mesh (jit init with out_shardings=shardings to
    have it born sharded)."""
    init = functools.partial(init_train_state, model_cfg, tx, seed)
    return init, sharding.tree_shardings(jax.eval_shape(init), mesh)


def _initial_state(model_cfg, tx, lanes, managers, mesh, resume: bool, pretrained):
    """Returns (start step or None, state, its shardings): restored, imported or fresh.

    Several lanes (vmap_seeds) are stacked along a leading axis and restored at the newest
    step they all have.
    """
    if len(lanes) == 1:
        init, shardings = sharded_init(model_cfg, tx, lanes[0].seed, mesh)
        if resume:
            abstract = jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                jax.eval_shape(init), shardings)
            start, state = _restore_latest_good(managers[0], abstract)
            if start is not None:
                log(f"resuming from step {start}")
                return start, state, shardings
        if pretrained is not None:
            return None, jax.device_put(init(params=pretrained), shardings), shardings
        return None, jax.jit(init, out_shardings=shardings)(), shardings  # born sharded
    seeds = jnp.array([c.seed for c in lanes])
    init = jax.vmap(lambda seed: init_train_state(model_cfg, tx, seed))
    if not resume:
        return None, jax.jit(init)(seeds), None
    start = min(m.latest_step() for m in managers)
    abstract = jax.eval_shape(lambda: init_train_state(model_cfg, tx, 0))
    states = []
    for c, manager in zip(lanes, managers, strict=True):
        try:
            states.append(checkpoint.restore_state(manager, start, abstract))
        except checkpoint.DamagedCheckpoint as err:
            raise UserError(f"{c.out_dir} step {start} could not be restored ({err}): resume "
                            "that seed alone with vmap_seeds=1") from None
    log(f"resuming {len(lanes)} seeds from step {start}")
    return start, jax.tree.map(lambda *xs: jnp.stack(xs), *states), None


def _step_record(step: int, step_metrics: dict, state: TrainState, config, schedule,
                 clipped_at_last_log: int, steps: int) -> dict:
    """Returns the deterministic part of a logged step's record (losses, lr, norms, counts)."""
    skipped = _check_finite(state, config)
    record = {"step": step, "train_loss": float(step_metrics["loss"]),
              "lr": float(schedule(step))}
    record.update({k: float(v) for k, v in step_metrics.items() if k != "loss"})
    record["clip_fraction"] = (int(state.clipped_steps) - clipped_at_last_log) / steps
    if config.skip_nonfinite:
        record["skipped_steps"] = skipped
    return record


def _elapsed_before(out_dir, start: int) -> float:
    """Returns the training seconds logged up to `start` by earlier runs of this out_dir."""
    if not start or not (Path(out_dir) / "metrics.jsonl").exists():
        return 0.0
    times = [r.get("elapsed_s", 0.0) for r in metrics.read_records(out_dir) if r["step"] <= start]
    return max(times, default=0.0)


def _check_out_dir(out_dir: str) -> None:
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


def _check_finite(state: TrainState, config: ml_collections.ConfigDict) -> int:
    """Returns the number of non-finite steps so far; raises UserError at the first one unless
    config.skip_nonfinite (the update of such a step was never applied either way)."""
    first = int(state.first_nonfinite_step)
    if first > 0 and not config.skip_nonfinite:
        raise UserError(
            f"the loss or gradient norm became NaN/Inf at step {first}: lower "
            "--config.learning_rate or raise --config.warmup_steps (or pass "
            "--config.skip_nonfinite=True to skip such steps); no parameters from that step "
            f"were saved, the checkpoints in {checkpoint.checkpoint_dir(config.out_dir)} are good")
    return int(state.nonfinite_steps)


def _restore_latest_good(manager, abstract_state) -> tuple[int | None, Any]:
    """Returns (step, state) of the newest checkpoint that restores, newest first.

    A damaged checkpoint (files missing or truncated, e.g. by a kill during a save on a file
    system without atomic renames) is moved to OUT_DIR/damaged/ with a one-line notice and
    the next older one is tried; (None, None) when none is left.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return step, checkpoint.restore_state(manager, step, abstract_state)
        except checkpoint.DamagedCheckpoint as err:
            moved = checkpoint.set_aside(manager, step)
            log(f"warning: checkpoint {step} is damaged ({err}); moved it to {moved} and "
                "fell back to the previous one")
    log("warning: no checkpoint could be restored; starting from scratch")
    return None, None


def _enable_compile_cache(config: ml_collections.ConfigDict) -> None:
    """Turns on JAX's persistent compilation cache, so a rerun of a config skips compiling."""
    directory = config.compile_cache_dir or str(data.cache_root(config.data) / "jax_compile")
    jax.config.update("jax_compilation_cache_dir", str(Path(directory).expanduser()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class _CacheHits:
    """Counts persistent compilation cache hits while the `with` block runs."""

    EVENT = "/jax/compilation_cache/cache_hits"

    def __enter__(self):
        self.count = 0
        jax.monitoring.register_event_listener(self._listen)
        return self

    def _listen(self, event, **kwargs):
        if event == self.EVENT:
            self.count += 1

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_listener(self._listen)


def _flops_report(formula: float, xla: float | None, peak: float, peak_source: str) -> str:
    """Returns one line: FLOPs per train step by the 6N + 12LDT formula and by XLA, and the peak."""
    line = f"FLOPs per step: {formula / 1e9:,.2f} G by 6N + 12·n_layer·n_embd·block_size"
    if xla is not None:
        total = xla * jax.device_count()
        line += f", {total / 1e9:,.2f} G by XLA's cost analysis ({total / formula:.2f}x)"
    return line + f"; MFU against {peak / 1e12:,.3f} TFLOP/s ({peak_source})"


def _latest_readable_metadata(manager) -> tuple[int | None, tuple[dict, dict] | None]:
    """Returns (step, (config, tokenizer)) of the newest checkpoint whose metadata reads."""
    try:
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                return step, checkpoint.read_metadata(manager, step)
            except checkpoint.DamagedCheckpoint as err:
                moved = checkpoint.set_aside(manager, step)
                log(f"warning: checkpoint {step} is damaged ({err}); moved it to {moved}")
        return None, None
    finally:
        manager.close()


def _resolve_init_from(config: ml_collections.ConfigDict, saved, dataset):
    """Returns (config with the pretrained model's shape, its params or None on a resume).

    The pretrained model fixes every shape field of config.model except block_size, which
    may crop its context; dropout and dtype stay the config's. A resume reads the shape from
    the checkpoint and ignores init_from, so the weights are not fetched again.
    """
    from gpt_jax import hf

    config = ml_collections.ConfigDict(config.to_dict())
    if saved is not None:
        saved_model = saved[0]["model"]
        config.model.update({k: saved_model[k] for k in HF_SHAPE_FIELDS})
        return config, None
    hf_cfg, params = hf.load(config.init_from, block_size=config.model.block_size)
    if hf_cfg.vocab_size != dataset.tokenizer.vocab_size:
        raise UserError(
            f"{config.init_from} has a vocabulary of {hf_cfg.vocab_size} tokens but the corpus's "
            f"tokenizer has {dataset.tokenizer.vocab_size}: set --config.data.tokenizer=gpt2 "
            "or use a corpus prepared with python -m gpt_jax.prepare")
    config.model.update({k: getattr(hf_cfg, k) for k in HF_SHAPE_FIELDS})
    log(f"init_from {config.init_from}: {hf_cfg.n_layer} layers, {hf_cfg.n_head} heads, "
        f"{hf_cfg.n_embd} wide, context {hf_cfg.block_size}")
    return config, params


HF_SHAPE_FIELDS = ("block_size", "n_layer", "n_head", "n_embd", "bias", "qkv_bias",
                   "pos_encoding", "tie_embeddings", "norm_position", "activation")


def _check_compatible(config: ml_collections.ConfigDict, saved: tuple[dict, dict],
                      tokenizer_table: dict) -> None:
    """Raises UserError when out_dir's checkpoint was made by another model or tokenizer."""
    saved_config, saved_tokenizer = saved
    # Fields added since a checkpoint was written take their default (what it was trained with).
    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    saved_model = {**defaults, **saved_config.get("model", {})}
    model = config.model.to_dict()
    # dropout, the compute dtype and the attention kernel may change between runs; the
    # parameters stay the same.
    diffs = [f"{k} {saved_model.get(k)!r} vs {v!r}" for k, v in model.items()
             if saved_model.get(k) != v and k not in ("dropout", "dtype", "kernels", "attention")]
    if diffs:
        raise UserError(f"{config.out_dir} holds a checkpoint of a different model "
                        f"(model.{'; model.'.join(diffs)}): use a new --config.out_dir or the "
                        "settings it was trained with")
    if saved_tokenizer != tokenizer_table:
        raise UserError(f"{config.out_dir} holds a checkpoint trained on a corpus with another "
                        "tokenizer: use a new --config.out_dir or the original data.path")
