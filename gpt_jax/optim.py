"""The optax chain: warmup-then-cosine schedule, global-norm clipping, AdamW with a decay mask."""

import jax
import jax.numpy as jnp
import optax


def decay_steps(config) -> int:
    """Returns the step at which the cosine reaches min_lr: decay_steps, or 0 for max_steps."""
    return config.decay_steps or config.max_steps


def warmup_steps(config) -> int:
    """Returns the warmup the schedule uses: warmup_steps, shortened when it does not fit.

    A cosine warmup must end before the decay does; when warmup_steps is too long for it (a
    short run of a recipe, e.g. --config.max_steps=60 with 100 warmup steps), the warmup
    takes the first half of the decay instead, so the run still warms up and then anneals
    to min_lr. The other schedules keep their warmup whatever the run's length.
    """
    decay = decay_steps(config)
    if config.get("lr_schedule", "cosine") == "cosine" and config.warmup_steps >= decay:
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
    if kind == "inverse_sqrt":
        decay = lambda count: peak * jnp.sqrt(warmup / jnp.maximum(count + warmup, 1))
    else:
        decay = optax.constant_schedule(peak)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params):
    """Returns True for parameters of two or more dimensions (matrices, embeddings)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config) -> optax.GradientTransformation:
    """Returns global-norm clipping followed by AdamW on the warmup-cosine schedule."""
    schedule = lr_schedule(config)
    adamw = optax.adamw(
        learning_rate=lambda count: schedule(count + 1),
        b1=config.beta1,
        b2=config.beta2,
        eps=1e-8,
        weight_decay=config.weight_decay,
        mask=decay_mask,
    )
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
    return adamw
