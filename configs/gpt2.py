"""GPT-2 from scratch on a prepared BPE corpus (nanoGPT's train_gpt2 recipe).

    python -m gpt_jax.prepare /path/to/openwebtext.jsonl --out data/openwebtext
    python train.py --config configs/gpt2.py                 # GPT-2 124M
    python train.py --config configs/gpt2.py:gpt2-medium     # or gpt2-large, gpt2-xl

Context 1024, AdamW 6e-4 peak with betas 0.9/0.95 and weight decay 0.1, 2000 warmup steps,
cosine to 6e-5. Each optimizer step sees 480 x 1024 = 491,520 tokens (~0.5M) as 40
micro-batches of 12 sequences. nanoGPT reaches val loss ~2.85 on OpenWebText after 600k
steps (about 4 days on 8 A100s); gpt-jax has not been run on this recipe yet.
"""

from gpt_jax.config import base_config
from gpt_jax.hf import gpt2_model_fields


def get_config(size: str = "gpt2"):
    c = base_config()
    c.out_dir = f"out/{size}"
    c.data.path = "data/openwebtext"  # a directory written by python -m gpt_jax.prepare
    c.batch_size = 480
    c.grad_accum_steps = 40
    c.max_steps = 600_000
    c.eval_interval = 1000
    c.eval_iters = 200
    c.log_interval = 10
    c.checkpoint_interval = 1000
    c.learning_rate = 6e-4
    c.min_lr = 6e-5
    c.warmup_steps = 2000
    c.weight_decay = 0.1
    c.beta1, c.beta2 = 0.9, 0.95
    c.model.update(gpt2_model_fields(size))
    c.model.dropout = 0.0
    return c
