"""The baby GPT of nanoGPT's README: a 6-layer character-level GPT on tiny-shakespeare.

    python train.py --config configs/shakespeare.py
    python sample.py --checkpoint out/shakespeare --prompt "ROMEO:" --num_samples 3

nanoGPT reports val loss 1.4697 for this recipe after 5000 steps (a few minutes on one A100);
gpt-jax has not been measured on it yet. No biases anywhere, as in nanoGPT's recipe, so
losses compare one to one. On a CPU use configs/shakespeare_cpu.py instead.
"""

from gpt_jax.config import base_config


def get_config():
    c = base_config()
    c.out_dir = "out/shakespeare"
    c.batch_size = 64
    c.max_steps = 5000
    c.eval_interval = 250
    c.eval_iters = 200
    c.log_interval = 10
    c.checkpoint_interval = 250
    c.learning_rate = 1e-3
    c.min_lr = 1e-4
    c.warmup_steps = 100
    c.beta2 = 0.99
    c.model.block_size = 256
    c.model.n_layer = 6
    c.model.n_head = 6
    c.model.n_embd = 384
    c.model.dropout = 0.2
    c.model.bias = False
    return c
