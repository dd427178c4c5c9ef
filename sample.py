"""Samples text from a checkpoint: python sample.py --checkpoint out/shakespeare --prompt "ROMEO:"

Standard output carries only the samples (separated by a line of dashes); logs go to stderr.
"""

import argparse
import sys

from gpt_jax.errors import UserError, exit_with

SEPARATOR = "-" * 40


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        exit_with(UserError(f"{message} (see python sample.py --help)"))


def parse_args(argv):
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="out_dir of a training run")
    source.add_argument("--init_from", help="hf:DIR (a Hugging Face GPT-2 directory) or hf:gpt2")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top_k", type=int, default=200, help="keep the k most likely tokens")
    p.add_argument("--seed", type=int, default=1337)
    return p.parse_args(argv)


def load_hf(spec: str):
    """Returns (config, params, tokenizer) of a Hugging Face GPT-2 model (dropout off)."""
    from gpt_jax import data, hf

    if not spec.startswith(hf.PREFIX):
        raise UserError(f"--init_from {spec!r} is not understood: use hf:DIR or hf:gpt2")
    config, params = hf.load(spec)
    tokenizer = data.TiktokenTokenizer("gpt2")
    if config.vocab_size > tokenizer.vocab_size:
        raise UserError(f"{spec} has a vocabulary of {config.vocab_size} tokens, more than GPT-2's "
                        f"BPE ({tokenizer.vocab_size}): its ids cannot be decoded")
    print(f"loaded {spec} ({config.n_layer} layers, {config.n_embd} wide)", file=sys.stderr)
    return config, params, tokenizer


def main(argv):
    args = parse_args(argv)
    try:
        from gpt_jax import checkpoint, sampling

        sampling.check_options(args.max_new_tokens, args.temperature, args.top_k)
        if args.num_samples < 1:
            raise UserError(f"num_samples must be at least 1, got {args.num_samples}")
        if args.checkpoint:
            step, config, params, tokenizer = checkpoint.load_model(args.checkpoint, args.step)
            print(f"loaded {args.checkpoint} at step {step}", file=sys.stderr)
        else:
            config, params, tokenizer = load_hf(args.init_from)
        prompt = tokenizer.encode(args.prompt)
        if len(prompt) > config.block_size:
            print(f"the prompt has {len(prompt)} tokens: the model sees its last "
                  f"{config.block_size} (block_size)", file=sys.stderr)
        tokens = sampling.generate(
            params, config, prompt, num_samples=args.num_samples,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_k=args.top_k, seed=args.seed)
    except UserError as err:
        exit_with(err)
    texts = [tokenizer.decode(row) for row in tokens]
    print(f"\n{SEPARATOR}\n".join(texts))


if __name__ == "__main__":
    main(sys.argv[1:])
