"""Fine-tune OpenAI's GPT-2 on tiny-shakespeare tokenised with GPT-2's BPE.

    python train.py --config configs/gpt2_finetune_shakespeare.py
    python train.py --config configs/gpt2_finetune_shakespeare.py:gpt2-xl   # any GPT-2 size
    python sample.py --checkpoint out/gpt2_finetune_shakespeare --prompt "ROMEO:"

The weights come from the Hugging Face hub (online, with huggingface_hub installed); offline,
pass a local copy: --config.init_from=hf:/path/to/gpt2. The corpus is ~302k train / ~36k val
BPE tokens; 200 steps of 4 x 1024 tokens are ~2.7 epochs at a small constant learning rate
(after 10 warmup steps). nanoGPT's fine-tune of gpt2-xl reaches val loss ~1.0 this way;
gpt-jax has not been run on real GPT-2 weights yet (no network where it was built).
"""

from gpt_jax.config import base_config


def get_config(size: str = "gpt2"):
    c = base_config()
    c.out_dir = "out/gpt2_finetune_shakespeare"
    c.init_from = f"hf:{size}"
    c.data.tokenizer = "gpt2"  # tiny-shakespeare (data.path empty) in GPT-2 BPE
    c.batch_size = 4
    c.max_steps = 200
    c.eval_interval = 50
    c.eval_iters = 20
    c.log_interval = 10
    c.checkpoint_interval = 50
    c.learning_rate = 3e-5
    c.min_lr = 3e-5  # constant after warmup, as nanoGPT's finetune_shakespeare
    c.warmup_steps = 10
    c.weight_decay = 0.0
    c.model.block_size = 1024
    c.model.dropout = 0.0
    return c
