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
    p.add_argument("--checkpoint", required=True, help="out_dir of a training run")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top_k", type=int, default=200, help="keep the k most likely tokens")
    p.add_argument("--seed", type=int, default=1337)
    return p.parse_args(argv)


def main(argv):
    args = parse_args(argv)
    try:
        from gpt_jax import checkpoint, data, sampling
        from gpt_jax.model import GPTConfig, abstract_params

        sampling.check_options(args.max_new_tokens, args.temperature, args.top_k)
        if args.num_samples < 1:
            raise UserError(f"num_samples must be at least 1, got {args.num_samples}")
        manager = checkpoint.open_for_reading(args.checkpoint)
        step = manager.latest_step() if args.step is None else args.step
        if step not in manager.all_steps():
            raise UserError(f"{args.checkpoint} has no checkpoint at step {step}: it has "
                            f"{sorted(manager.all_steps())}")
        saved_config, tokenizer_table = checkpoint.read_metadata(manager, step)
        tokenizer = data.tokenizer_from_json(tokenizer_table)
        config = GPTConfig(vocab_size=tokenizer.vocab_size, **saved_config["model"])
        params = checkpoint.restore_params(manager, step, abstract_params(config))
        prompt = tokenizer.encode(args.prompt)
        print(f"loaded {args.checkpoint} at step {step}", file=sys.stderr)
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
