"""Writes a checkpoint as a Hugging Face GPT-2 directory that GPT2LMHeadModel loads.

    python -m gpt_jax.export --checkpoint out/gpt2_finetune_shakespeare --out hf/shakespeare

Only GPT-2-shaped models can be written (learned positions, tied head; the MLP is always
tanh-GELU). A model trained without biases is written with zero biases. The tokenizer is not
written: a GPT-2 BPE model uses the hub's gpt2 tokenizer; a character-level model's table
stays in the checkpoint.
"""

import sys
from pathlib import Path

from gpt_jax import checkpoint, entry, hf
from gpt_jax.errors import UserError


def export(args) -> None:
    """Writes the checkpoint args name as a GPT-2 directory at args.out."""
    out = Path(args.out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty: pass a new --out directory")
    step, config, params, tokenizer = checkpoint.load_model(args.checkpoint, args.step)
    blockers = hf.export_blockers(config)
    if blockers:
        raise UserError(f"{args.checkpoint} cannot be written as GPT-2: "
                        f"{'; '.join(blockers)}")
    hf.write(out, params, config)
    print(f"wrote {out} (GPT2LMHeadModel, {config.n_layer} layers, {config.n_embd} wide, "
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
