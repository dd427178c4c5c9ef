"""What sampling and evaluation start from: a run's checkpoint, or Hugging Face weights.

Start-up time is what a user of sample.py waits through, so each source loads only what it
needs: orbax (about 0.4 s to import) only for a checkpoint, and the tokenizer (tiktoken
builds GPT-2's BPE tables in about 0.4 s) is made ready in a thread while the weights load.
"""

import threading

from gpt_jax import hf
from gpt_jax.errors import UserError


def load_for_inference(out_dir: str | None, init_from: str = "", step: int | None = None):
    """Returns (model config, params, tokenizer, description) of a checkpoint directory or of
    init_from (hf:DIR or hf:NAME, GPT-2 or Llama, with the directory's tokenizer.json or else
    GPT-2's BPE), for sampling and evaluation."""
    if out_dir:
        from gpt_jax import checkpoint

        step, config, params, tokenizer = checkpoint.load_model(out_dir, step)
        return config, params, tokenizer, f"{out_dir} at step {step}"
    if not init_from.startswith(hf.PREFIX):
        raise UserError(f"--init_from {init_from!r} is not understood: use hf:DIR or hf:gpt2")
    directory = hf.resolve(init_from)
    config = hf.read_config(directory)
    tokenizer = hf.read_tokenizer(directory, config.vocab_size)
    ready = threading.Thread(target=tokenizer.encode, args=("",), daemon=True)
    ready.start()
    config, params = hf.load(f"{hf.PREFIX}{directory}")
    ready.join()
    return config, params, tokenizer, f"{init_from} ({config.n_layer} layers, {config.n_embd} wide)"
