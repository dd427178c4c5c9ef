"""nanoGPT's laptop recipe: a 4-layer character-level GPT on tiny-shakespeare, on a CPU.

    python train.py --config configs/shakespeare_cpu.py

Expect val loss about 1.88 at step 2000 (nanoGPT's own CPU run: 1.8857), a few minutes
on 2 CPU cores. No biases anywhere, as nanoGPT's recipe, so losses compare one to one.
"""

from gpt_jax.config import base_config


def get_config():
    c = base_config()
    c.out_dir = "out/shakespeare_cpu"
    c.batch_size = 12
    c.max_steps = 2000
    c.decay_steps = 2000
    c.eval_interval = 250
    c.eval_iters = 20
    c.log_interval = 10
    c.checkpoint_interval = 250
    c.learning_rate = 1e-3
    c.min_lr = 1e-4
    c.warmup_steps = 100
    c.beta2 = 0.99
    c.model.block_size = 64
    c.model.n_layer = 4
    c.model.n_head = 4
    c.model.n_embd = 128
    c.model.dropout = 0.0
    c.model.bias = False
    return c
