"""nanoGPT's laptop recipe: the Shakespeare recipe shrunk to a 4-layer GPT that trains on a CPU.

    python train.py --config configs/shakespeare_cpu.py

Expect val loss about 1.90 at step 2000 (1.8967, 2.736 bits per byte, on the fixed measure;
nanoGPT's own CPU run: 1.8857 on its random estimate), about 3 minutes on 2 CPU cores. The overrides are nanoGPT's README command for CPUs.
"""

from configs import shakespeare


def get_config():
    c = shakespeare.get_config()
    c.out_dir = "out/shakespeare_cpu"
    c.batch_size = 12
    c.max_steps = 2000
    c.eval_iters = 20  # with --config.eval_mode=random, nanoGPT's estimate
    # The fixed validation measure scores 512 of the val split's 1,742 windows (and as many
    # of the train split's) at each evaluation.
    c.eval_tokens = 32768
    c.model.block_size = 64
    c.model.n_layer = 4
    c.model.n_head = 4
    c.model.n_embd = 128
    c.model.dropout = 0.0
    return c
