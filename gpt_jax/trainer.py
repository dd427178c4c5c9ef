"""TrainState, the pure train and eval steps, and the training loop."""

import dataclasses
import functools
import math
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gpt_jax import checkpoint, data, entry, hf, host_memory, metrics, optim, seeds, sharding
from gpt_jax import config as config_lib
from gpt_jax.errors import UserError
from gpt_jax.loop import Loop, StepPacer, StopRequests
from gpt_jax.metrics import log, warn
from gpt_jax.model import GPT, GPTConfig, init_params, layer_norms, size_report, to_layout
from gpt_jax.prefetch import Prefetcher
from gpt_jax.profile import StepProfiler

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
    global mean (see sharding.reduce_gradients). Dropout masks differ per device (the key is
    folded with the device's index on the mesh).
    """
    return sharding.over_batch(
        functools.partial(_local_value_and_grad, model=model, mesh=mesh,
                          grad_accum_steps=grad_accum_steps),
        mesh, params, batch, rng, returns_grads=True)


def _local_value_and_grad(params_local, batch_local, rng, *, specs, model, mesh,
                          grad_accum_steps):
    dropout = model.config.dropout > 0
    if dropout:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(sharding.BATCH_AXES))
    loss_of_params = lambda p, micro_batch, micro_rng: loss_fn(  # noqa: E731
        sharding.gather_tree(p, specs), model, micro_batch, micro_rng)
    loss, grads = _value_and_grad(loss_of_params, params_local, batch_local, rng,
                                  grad_accum_steps=grad_accum_steps, dropout=dropout)
    return sharding.batch_mean(loss, mesh), sharding.reduce_gradients(grads, specs, mesh)


def norms(prefix: str, tree: PyTree) -> dict[str, jax.Array]:
    """Returns the global L2 norm of `tree` and of each top-level layer (wte, h_0, ..., ln_f;
    stacked blocks layer by layer)."""
    out = {prefix: optax.tree.norm(tree)}
    out.update({f"{prefix}/{name}": norm for name, norm in layer_norms(tree).items()})
    return out


def train_step(state: TrainState, batch, *, model: GPT, tx: optax.GradientTransformation,
               mesh: Mesh, grad_accum_steps: int = 1,
               grad_clip: float = 0.0) -> tuple[TrainState, dict]:
    """Returns the state after one optimizer update on the global `batch`, and its metrics.

    The dropout key of step k is fold_in(state.rng, k), drawn inside the compiled step (a
    separate host call per step would wait for the previous step and stall the dispatch
    queue), so dropout masks are a pure function of (seed, step) and resumes are exact. The
    gradient is computed under shard_map; the optimizer update runs on the sharded state as it
    lies.
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


def eval_step(params: PyTree, batch, *, model: GPT, mesh: Mesh) -> jax.Array:
    """Returns float32 [summed loss, summed loss of the tokens with bytes] over the global
    batch's weighted tokens (data.eval_batches' layout), dropout off."""
    return sharding.over_batch(functools.partial(_local_sums, model=model, mesh=mesh), mesh,
                               params, batch)


def make_eval_step(model: GPT, mesh: Mesh | None = None):
    """Returns eval_step (params, batch) -> loss sums, jit-compiled."""
    return jax.jit(functools.partial(eval_step, model=model, mesh=mesh or default_mesh()))


def _local_sums(params_local, batch_local, *, specs, model, mesh):
    inputs_BT, targets_BT, weights_BT, bytes_BT = batch_local
    logits_BTV = model.apply({"params": sharding.gather_tree(params_local, specs)}, inputs_BT)
    losses_BT = metrics.token_losses(logits_BTV, targets_BT) * weights_BT
    sums = jnp.stack([losses_BT.sum(), jnp.where(bytes_BT > 0, losses_BT, 0.0).sum()])
    return sharding.batch_sum(sums, mesh)


def estimate_loss(eval_step, params: PyTree, dataset: data.Dataset,
                  config: ml_collections.ConfigDict, step: int, mesh: Mesh | None = None) -> dict:
    """Returns the loss of each split over its evaluation batches (see data.eval_batches), and
    the val split's bits per byte: {"train": loss, "val": loss, "val_bpb": bits}.

    The loss is the mean over every scored token; bits per byte is the summed loss of the
    tokens that stand for text, in bits, over the UTF-8 bytes of that text. The batches'
    sums are added on the host in float64, so the figure does not depend on how the windows
    were split into batches or over devices beyond float32 rounding within a batch.
    """
    out = {}
    for split in ("train", "val"):
        sums, tokens, n_bytes = [], 0, 0
        for batch, batch_tokens, batch_bytes in data.eval_batches(dataset, config, split, step,
                                                                  mesh):
            sums.append(eval_step(params, batch))
            tokens, n_bytes = tokens + batch_tokens, n_bytes + batch_bytes
        loss_sum, text_loss_sum = np.sum(np.asarray(jax.device_get(sums), np.float64), axis=0)
        out[split] = float(loss_sum / tokens)
        out[f"{split}_bpb"] = float(text_loss_sum / math.log(2) / n_bytes) if n_bytes else math.nan
    return out


def sharded_init(model_cfg: GPTConfig, tx: optax.GradientTransformation, seed: int, mesh: Mesh):
    """Returns (init, shardings): init(params=None) builds the fresh train state, and shardings
    says where each of its leaves lives on the mesh (jit init with out_shardings=shardings to
    have it born sharded)."""
    init = functools.partial(init_train_state, model_cfg, tx, seed)
    return init, sharding.tree_shardings(jax.eval_shape(init), mesh)


def run(config: ml_collections.ConfigDict) -> dict:
    """Trains (or resumes) the run that `config` describes; returns the last eval record.

    With vmap_seeds = K > 1, K seeds train at once, each a run of its own (gpt_jax/seeds.py).
    """
    jax.config.update("jax_threefry_partitionable", True)
    config, dataset, lanes, resume, pretrained = _prepare(config)
    model_cfg = config_lib.model_config(config, dataset.tokenizer.vocab_size)
    dataset.check_fits(model_cfg.block_size)
    log(f"data: {dataset.directory} ({len(dataset.train):,} train / {len(dataset.val):,} val "
        f"tokens, vocab {model_cfg.vocab_size})")
    log(size_report(model_cfg))
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch(config.batch_size, config.grad_accum_steps, mesh)
    lanes.check_mesh(mesh)
    if note := optim.short_warmup_note(config):
        warn(note)
    lanes.open_checkpoints()
    model, tx = GPT(model_cfg), optim.make_optimizer(config)
    init = functools.partial(init_train_state, model_cfg, tx)  # init(seed, params=None)
    shardings = None if lanes.vmapped else sharding.tree_shardings(
        jax.eval_shape(init, config.seed), mesh)
    if pretrained is not None:  # imported layer by layer
        pretrained = to_layout(pretrained, model_cfg)
    start, state = lanes.initial_state(init, shardings, resume, pretrained)
    log(sharding.memory_report(state, mesh))
    start = int(start or 0)
    if start >= config.max_steps:
        log(f"step {start} already reached max_steps={config.max_steps}: nothing to do "
            "(raise --config.max_steps to train further)")
        lanes.close()
        return {"step": start}

    lanes.open_writers(start, config.wandb_project)
    step_fn = lanes.jit(functools.partial(
        train_step, model=model, tx=tx, mesh=mesh, grad_accum_steps=config.grad_accum_steps,
        grad_clip=config.grad_clip), (shardings, NamedSharding(mesh, P())))
    compiled = _compile(step_fn, state, lanes.batch(dataset, start, mesh), lanes)
    if line := metrics.step_memory_report(compiled):
        log(line)
    flops_per_token, peak = _report_flops(model_cfg, compiled, config, len(lanes), mesh)
    host_memory.release_freed_memory()  # what compiling freed
    loop = Loop(config, lanes, dataset, mesh, start=start, schedule=optim.lr_schedule(config),
                estimate_loss=functools.partial(estimate_loss, make_eval_step(model, mesh)),
                tokenizer_table=dataset.tokenizer.to_json(), flops_per_token=flops_per_token,
                peak=peak, model_config=model_cfg)
    step, profiler = start, StepProfiler(config)
    batches = Prefetcher(lambda k: lanes.batch(dataset, k, mesh), start, config.max_steps,
                         config.data.prefetch)  # step k + 1's batch built while step k runs
    try:
        with StopRequests() as stop:
            loop.begin(state)  # a fresh run evaluates step 0
            pace = StepPacer(compiled)  # at most one step ahead on a CPU
            while step < config.max_steps:
                if stop.signum is not None:
                    loop.stop(state, step, stop.signum)
                with profiler.step(step + 1):
                    state, step_metrics = compiled(state, batches.get(step))
                pace(step_metrics)
                step += 1
                profiler.done(step, step_metrics)
                if step % config.checkpoint_interval == 0 or step == config.max_steps:
                    loop.save(state, step)
                if step % config.log_interval == 0 or step in loop.eval_steps:
                    loop.record(state, step_metrics, step)
                loop.progress.update()
    finally:
        batches.close()
        profiler.close()
        loop.close()
    log(loop.summary(step))
    return loop.last_eval


def _prepare(config: ml_collections.ConfigDict):
    """Checks `config` and resolves it against the corpus, the checkpoints and the backend;
    returns (config, dataset, lanes, resume, pretrained params or None).

    Every input is checked before out_dir is created or touched, so a bad run leaves nothing.
    """
    config_lib.validate(config)
    checkpoint.check_out_dir(config.out_dir)
    config = config_lib.resolve_backend_fields(config, jax.default_backend())  # a copy
    _enable_compile_cache(config)
    dataset = data.load_dataset(config.data)
    config = data.resolve_documents(config, dataset)
    configs = seeds.lane_configs(config)
    saved = [checkpoint.latest_metadata(c.out_dir) for c in configs]
    pretrained = None
    if config.init_from:
        meta = saved[0][1]
        config, pretrained = hf.resolve_init_from(config, meta and meta[0],
                                                  dataset.tokenizer.vocab_size)
        configs = [config]
    for _, meta in saved:
        if meta is not None:
            checkpoint.check_compatible(config, meta, dataset.tokenizer.to_json())
    if len({step is None for step, _ in saved}) > 1:
        raise UserError(f"{config.out_dir} has checkpoints for some seeds only: resume each "
                        "seed_<N> alone with vmap_seeds=1, or use a new out_dir")
    return config, dataset, seeds.Lanes(configs), saved[0][0] is not None, pretrained


def _compile(step_fn, state, batch, lanes: seeds.Lanes):
    """Returns the train step compiled for these arguments; logs how long that took."""
    t0 = time.perf_counter()
    with metrics.CacheHits() as hits:
        compiled = step_fn.lower(state, batch).compile()
    log(f"train step compiled in {time.perf_counter() - t0:.2f} s"
        + (" (from the persistent compilation cache)" if hits.count else "")
        + (f", {len(lanes)} seeds in one step (vmap)" if lanes.vmapped else ""))
    return compiled


def _report_flops(model_cfg: GPTConfig, compiled, config, n_lanes: int, mesh: Mesh):
    """Logs the FLOPs of one train step and the peak MFU is measured against; returns
    (FLOPs per token, peak FLOP/s of the mesh)."""
    flops_per_token = metrics.model_flops_per_token(model_cfg)
    peak, peak_source = metrics.peak_flops(mesh.devices.flat)
    tokens_per_step = config.batch_size * model_cfg.block_size
    log(metrics.flops_report(n_lanes * flops_per_token * tokens_per_step,
                             metrics.xla_flops(compiled), peak, peak_source))
    return flops_per_token, peak


def _enable_compile_cache(config: ml_collections.ConfigDict) -> None:
    """Turns on JAX's persistent compilation cache, so a rerun of a config skips compiling."""
    entry.enable_compile_cache(config.compile_cache_dir or data.compile_cache_dir(config.data))
