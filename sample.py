"""Samples text from a checkpoint: python sample.py --checkpoint out/shakespeare --prompt "ROMEO:"

Standard output carries only the samples, separated by a line of dashes; with --format json, one
JSON object per sample and line: prompt, prompt_tokens, text (the generated part), tokens (its
ids) and tokens_per_sec (compilation excluded). Logs go to stderr. A sample ends at
<|endoftext|> (BPE models), at the end-of-sequence token of an hf:DIR's tokenizer.json, and
before any --stop text. Past block_size the window slides: see
gpt_jax/sampling.py.
"""

import json
import sys
import time

from gpt_jax import data, entry, inference, metrics, sampling, tokenization
from gpt_jax.errors import UserError

SEPARATOR = "-" * 40


def parse_args(argv):
    p = entry.ArgumentParser(command="python sample.py", description=__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="out_dir of a training run")
    source.add_argument("--init_from",
                        help="hf:DIR (a Hugging Face GPT-2 or Llama directory) or hf:gpt2")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    prompt.add_argument("--prompt_file", help="read the prompt from this UTF-8 file")
    p.add_argument("--per_line", action="store_true",
                   help="each non-empty line of --prompt_file is a prompt; all run as one batch")
    p.add_argument("--num_samples", type=int, default=1, help="samples per prompt, one batch")
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top_k", type=int, default=200, help="keep the k most likely tokens")
    p.add_argument("--top_p", type=float, default=None, help="keep the nucleus of probability p")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--stop", action="append", default=[], help="end a sample before this text")
    p.add_argument("--window_keep", type=int, default=None,
                   help="tokens kept when the window slides past block_size (default: half)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--format", choices=("text", "json"), default="text")
    return p.parse_args(argv)


def read_prompts(args) -> list[str]:
    """Returns the prompt texts: --prompt, the whole --prompt_file, or its non-empty lines."""
    if args.prompt_file is None:
        if args.per_line:
            raise UserError("--per_line needs --prompt_file")
        return [args.prompt]
    try:
        with open(args.prompt_file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        reason = "it is not UTF-8" if isinstance(err, UnicodeDecodeError) else err.strerror
        raise UserError(f"--prompt_file {args.prompt_file} cannot be read ({reason})") from None
    prompts = [line for line in text.splitlines() if line] if args.per_line else [text]
    if not prompts:
        raise UserError(f"--prompt_file {args.prompt_file} has no non-empty line")
    return prompts


def sample(args) -> None:
    """Prints the samples that args ask for on stdout; logs go to stderr."""
    sampling.check_options(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    if args.num_samples < 1:
        raise UserError(f"num_samples must be at least 1, got {args.num_samples}")
    texts = [t for t in read_prompts(args) for _ in range(args.num_samples)]
    if args.stream and (len(texts) > 1 or args.format == "json"):
        raise UserError("--stream prints one text sample: give one prompt, --num_samples 1 "
                        "and --format text")
    # A second run of the same command loads its programs instead of compiling them.
    entry.enable_compile_cache(data.compile_cache_dir())
    config, params, tokenizer, description = inference.load_for_inference(
        args.checkpoint, args.init_from, args.step)
    prompts = [tokenizer.encode(text) for text in texts]
    sampling.check_window_keep(config, args.window_keep)
    if not all(prompts):
        raise UserError("the prompt is empty: give at least one character")
    print(f"loaded {description}", file=sys.stderr)
    for n in sorted({len(p) for p in prompts if len(p) > config.block_size}):
        print(f"the prompt has {n} tokens: the model sees its last {config.block_size} "
              "(block_size)", file=sys.stderr)
    eot = tokenization.end_of_text(tokenizer)
    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
               "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
               "stop_token": eot, "window_keep": args.window_keep}
    if args.stream:
        print(texts[0], end="", flush=True)
        tokens = sampling.stream(params, config, prompts, **options)
        for piece in sampling.stream_text(tokens, tokenizer.decode, args.stop, eot):
            print(piece, end="", flush=True)
        print()
        return
    with sampling.compile_watch() as compiling, metrics.CacheHits() as hits:
        t0 = time.perf_counter()
        tokens = sampling.generate(params, config, prompts, **options)
        seconds = time.perf_counter() - t0 - compiling.seconds
    samples = sampling.records(texts, prompts, tokens, tokenizer.decode, args.stop, eot, seconds)
    print(f"generated {len(samples)} x {args.max_new_tokens} tokens in {seconds:.2f} s "
          f"({samples[0]['tokens_per_sec']} tokens/s per sample) after {compiling.seconds:.1f} s "
          "compiling" + (" (from the persistent compilation cache)" if hits.count else ""),
          file=sys.stderr)
    if args.format == "json":
        print("\n".join(json.dumps(sample) for sample in samples))
    else:
        print(f"\n{SEPARATOR}\n".join(s["prompt"] + s["text"] for s in samples))


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    entry.main(lambda: sample(args), keep_freed_memory=True)


if __name__ == "__main__":
    main(sys.argv[1:])
