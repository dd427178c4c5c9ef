"""The optax chain: warmup-then-cosine schedule, global-norm clipping, AdamW with a decay mask."""

import jax
import jax.numpy as jnp
import optax

LR_SCHEDULES = ("cosine", "inverse_sqrt", "constant")


def lr_schedule(config) -> optax.Schedule:
    """Returns lr(step): a linear warmup from 0 to learning_rate, then config.lr_schedule.

    cosine: down to min_lr at decay_steps (0: max_steps), then flat (GPT-2, nanoGPT).
    inverse_sqrt: learning_rate * sqrt(warmup_steps / step), the original Transformer's.
    constant: learning_rate. `step` counts optimizer updates done; update number k (1-based)
    uses lr(k), so the first update already moves the weights.
    """
    peak, warmup = config.learning_rate, config.warmup_steps
    kind = config.get("lr_schedule", "cosine")
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak, warmup_steps=warmup,
            decay_steps=config.decay_steps or config.max_steps, end_value=config.min_lr)
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
