"""Writes a checkpoint as a Hugging Face directory: GPT2LMHeadModel or LlamaForCausalLM.

    python -m gpt_jax.export --checkpoint out/gpt2_finetune_shakespeare --out hf/shakespeare

A GPT-2-shaped model (learned positions, tied head, LayerNorm, tanh-GELU) is written as
GPT-2; a model trained without biases is written with zero biases. A Llama-shaped one (rope,
rmsnorm, swiglu, no biases; grouped-query attention and an untied head allowed) is written as
Llama. Any other model is refused with the reasons neither fits. The tokenizer is not written:
a GPT-2 BPE model uses the hub's gpt2 tokenizer; a character-level model's table stays in the
checkpoint.
"""

import sys
from pathlib import Path

from gpt_jax import checkpoint, entry, hf
from gpt_jax.errors import UserError


def export(args) -> None:
    """Writes the checkpoint args name as a GPT-2 or Llama directory at args.out."""
    out = Path(args.out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty: pass a new --out directory")
    step, config, params, tokenizer = checkpoint.load_model(args.checkpoint, args.step)
    hf.export_architecture(config, args.checkpoint)  # refuses before anything is written
    architecture = hf.write(out, params, config)
    print(f"wrote {out} ({architecture}, {config.n_layer} layers, {config.n_embd} wide, "
          f"vocab {config.vocab_size}) from {args.checkpoint} step {step}")
    if tokenizer.to_json()["kind"] != "tiktoken":
        print(f"note: this model uses a {tokenizer.to_json()['kind']} tokenizer of "
              f"{tokenizer.vocab_size} tokens, not GPT-2's BPE; its table is in the checkpoint",
              file=sys.stderr)


def main(argv: list[str]) -> None:
    p = entry.ArgumentParser(command="python -m gpt_jax.export", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="out_dir of a training run")
    p.add_argument("--out", required=True, help="directory to write (created)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    args = p.parse_args(argv)
    entry.main(lambda: export(args))


if __name__ == "__main__":
    main(sys.argv[1:])
