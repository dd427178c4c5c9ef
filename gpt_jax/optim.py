"""The optax chain: the learning-rate schedule, global-norm clipping, then AdamW with a decay
mask, or Muon on the hidden matrices beside AdamW on everything else."""

import jax
import jax.numpy as jnp
import optax

from gpt_jax.model import STACKED


def decay_steps(config) -> int:
    """Returns the step at which the cosine reaches min_lr: decay_steps, or 0 for max_steps."""
    return config.decay_steps or config.max_steps


def warmup_steps(config) -> int:
    """Returns the warmup the schedule uses: warmup_steps, shortened when it does not fit.

    A cosine (or wsd) warmup must end before the decay does; when warmup_steps is too long for it (a
    short run of a recipe, e.g. --config.max_steps=60 with 100 warmup steps), the warmup
    takes the first half of the decay instead, so the run still warms up and then anneals
    to min_lr. The other schedules keep their warmup whatever the run's length.
    """
    decay = decay_steps(config)
    if config.get("lr_schedule", "cosine") in ("cosine", "wsd") and config.warmup_steps >= decay:
        return decay // 2
    return config.warmup_steps


def short_warmup_note(config) -> str | None:
    """Returns the one-line note a run prints when its warmup was shortened, else None."""
    warmup = warmup_steps(config)
    if warmup == config.warmup_steps:
        return None
    return (f"note: warmup_steps={config.warmup_steps} does not fit in the "
            f"{decay_steps(config)}-step decay; "
            + (f"warming up over {warmup} steps (half of it) instead" if warmup else
               "no warmup instead"))


def lr_schedule(config) -> optax.Schedule:
    """Returns lr(step): a linear warmup from 0 to learning_rate, then config.lr_schedule.

    cosine: down to min_lr at decay_steps (0: max_steps), then flat (GPT-2, nanoGPT).
    wsd: warmup, stable, decay: learning_rate until the last decay_fraction of the decay_steps,
    then down to min_lr along decay_shape, linear or 1-sqrt (nanochat's warmdown; Hägele et
    al. 2024), then flat.
    inverse_sqrt: learning_rate * sqrt(warmup_steps / step), the original Transformer's.
    constant: learning_rate. `step` counts optimizer updates done; update number k (1-based)
    uses lr(k), so the first update already moves the weights.
    """
    peak, warmup = config.learning_rate, warmup_steps(config)
    kind = config.get("lr_schedule", "cosine")
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak, warmup_steps=warmup,
            decay_steps=decay_steps(config), end_value=config.min_lr)
    if kind == "wsd":
        total = decay_steps(config)
        start = max(warmup, total - round(config.decay_fraction * total))
        shape = _DECAY_SHAPES[config.decay_shape]
        span = max(total - start, 1)
        cooldown = lambda count: config.min_lr + (peak - config.min_lr) * shape(  # noqa: E731
            jnp.clip(count / span, 0.0, 1.0))
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup),
                                     optax.constant_schedule(peak), cooldown],
                                    [warmup, start])
    if kind == "inverse_sqrt":
        def decay(count):
            return peak * jnp.sqrt(warmup / jnp.maximum(count + warmup, 1))
    else:
        decay = optax.constant_schedule(peak)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


# wsd's cool-down: the fraction of (learning_rate - min_lr) left at progress t in [0, 1].
_DECAY_SHAPES = {"linear": lambda t: 1.0 - t, "1-sqrt": lambda t: 1.0 - jnp.sqrt(t)}
DECAY_SHAPES = tuple(_DECAY_SHAPES)


def _matrix_ndim(path, p) -> int:
    # The dimensions of one layer's parameter: a stacked block's (scan_layers) lead with the
    # layer axis, which is not one of them.
    return p.ndim - (getattr(path[0], "key", None) == STACKED)


def decay_mask(params):
    """Returns True for parameters of two or more dimensions (matrices, embeddings)."""
    return jax.tree_util.tree_map_with_path(lambda path, p: _matrix_ndim(path, p) >= 2, params)


def muon_mask(params):
    """Returns True for the hidden matrices Muon updates: the 2-D kernels inside the blocks.

    Everything else (token and position embeddings, an untied lm_head, norms, biases) stays
    with AdamW, as in modded-nanogpt and nanochat: Muon orthogonalises a matrix's update,
    which suits a map between hidden spaces but not a lookup table or the output layer.
    """
    def hidden(path, p) -> bool:
        names = [getattr(k, "key", None) for k in path]
        return (_matrix_ndim(path, p) == 2 and names[-1] == "kernel"
                and (names[0] == STACKED or str(names[0]).startswith("h_")))
    return jax.tree_util.tree_map_with_path(hidden, params)


def _muon_dimensions(params):
    """Returns each matrix's Muon dimension numbers: rows reduced, columns out, and a stacked
    block's layer axis (scan_layers) a batch axis, so each layer is orthogonalised alone."""
    def numbers(p):
        return optax.contrib.MuonDimensionNumbers(p.ndim - 2, p.ndim - 1)
    return jax.tree.map(numbers, params)


def make_optimizer(config) -> optax.GradientTransformation:
    """Returns global-norm clipping followed by config.optimizer on config's schedule.

    adamw: AdamW on every parameter (decay on matrices and embeddings, see decay_mask).
    muon: optax.contrib.muon (Nesterov momentum muon_momentum, five Newton-Schulz steps) on
    the hidden matrices (muon_mask) at muon_lr, and AdamW as above on the rest at
    learning_rate; both follow the same schedule's shape.
    """
    schedule = lr_schedule(config)
    adamw = optax.adamw(
        learning_rate=lambda count: schedule(count + 1),
        b1=config.beta1,
        b2=config.beta2,
        eps=1e-8,
        weight_decay=config.weight_decay,
        mask=decay_mask,
    )
    if config.get("optimizer", "adamw") == "muon":
        ratio = config.muon_lr / config.learning_rate
        muon = optax.contrib.muon(learning_rate=lambda count: ratio * schedule(count + 1),
                                  beta=config.muon_momentum, nesterov=True,
                                  weight_decay=config.muon_weight_decay,
                                  muon_weight_dimension_numbers=_muon_dimensions)
        labels = lambda params: jax.tree.map(  # noqa: E731
            lambda m: "muon" if m else "adamw", muon_mask(params))
        tx = optax.partition({"muon": muon, "adamw": adamw}, labels)
    else:
        tx = adamw
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), tx)
    return tx
