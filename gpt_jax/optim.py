"""The optax chain: warmup-then-cosine schedule, global-norm clipping, AdamW with a decay mask."""

import jax
import optax


def lr_schedule(config) -> optax.Schedule:
    """Returns lr(step): 0 at step 0, learning_rate at warmup_steps, min_lr at the decay end.

    `step` counts optimizer updates done; update number k (1-based) uses lr(k), so the first
    update already moves the weights and the last of max_steps updates uses min_lr.
    """
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=config.decay_steps or config.max_steps,
        end_value=config.min_lr,
    )


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
