"""Greedy sampling side by side with Hugging Face transformers, on the same GPT-2 weights.

    python benchmarks/vs_transformers.py                  # GPT-2 124M shapes, random weights

A GPT2LMHeadModel with random weights (torch seed 0) is saved by transformers and read back by
gpt-jax through `--init_from hf:DIR`'s loader, so both sides hold the same float32 weights.
Both continue the prompt ("Every effort moves you", GPT-2 BPE) greedily by --new_tokens tokens
at each of --batch_sizes (the prompt repeated), with their KV caches: transformers' `generate`
in eager PyTorch, gpt-jax's `sampling.generate` (one compiled program, compiled before timing).
The tokens must be identical. The two alternate in --rounds rounds (which goes first
alternating), and each batch size ends with a line
`batch=B transformers_tokens_per_sec=N tokens_per_sec=N speedup_vs_transformers=N.NNx`
(medians over rounds). Needs torch and transformers (the parity extra).
"""

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, as for bench.py

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gpt_jax import data, entry, hf, sampling  # noqa: E402
from gpt_jax.errors import UserError  # noqa: E402

PROMPT = "Every effort moves you"


def build_models(n_layer: int, n_head: int, n_embd: int, directory: Path):
    """Returns (transformers model, our config, our params) with the same random weights."""
    try:
        import torch
        import transformers
    except ImportError:
        raise UserError("the comparison needs torch and transformers: pip install "
                        "torch==2.13.0, then pip install -e \".[parity]\"") from None
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                                        n_positions=hf.GPT2_BLOCK_SIZE,
                                        vocab_size=hf.GPT2_VOCAB_SIZE)
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    model.save_pretrained(directory)
    model.generation_config.eos_token_id = None  # never stop early: both sides make N tokens
    model.generation_config.pad_token_id = hf.GPT2_VOCAB_SIZE - 1
    config, params = hf.load(f"{hf.PREFIX}{directory}")
    return model, config, jax.device_put(params)  # on the device once, as sample.py holds them


def compare(args) -> None:
    import torch

    if min(args.batch_sizes) < 1 or args.new_tokens < 1 or args.rounds < 1:
        raise UserError("--batch_sizes, --new_tokens and --rounds must be >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        model, config, params = build_models(args.n_layer, args.n_head, args.n_embd, Path(tmp))
    prompt = data.TiktokenTokenizer().encode(PROMPT)
    print(f"model: GPT-2 shapes, {config.n_layer} layers, {config.n_head} heads, "
          f"{config.n_embd} wide, random weights (float32); prompt {PROMPT!r} ({len(prompt)} "
          f"tokens), {args.new_tokens} new tokens, greedy")
    print(f"transformers: eager PyTorch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"gpt-jax: {config.dtype} on {jax.default_backend()}")
    n = args.new_tokens
    for batch in args.batch_sizes:
        prompts = [prompt] * batch
        ids = torch.tensor(prompts)

        def theirs():
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=n, min_new_tokens=None)
            return out[:, len(prompt):].numpy()

        def ours():
            return sampling.generate(params, config, prompts, max_new_tokens=n,
                                     temperature=0.0)

        with sampling.compile_watch() as compiling:
            ours_tokens = ours()
        if not np.array_equal(ours_tokens, theirs()):
            raise UserError(f"batch {batch}: gpt-jax's greedy tokens differ from transformers'")
        print(f"batch {batch}: tokens identical; gpt-jax compiled in {compiling.seconds:.1f} s",
              flush=True)
        times = {"gpt-jax": [], "transformers": []}
        for r in range(args.rounds):
            order = (("gpt-jax", ours), ("transformers", theirs))
            for name, fn in order if r % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
            print(f"  round {r + 1}: gpt-jax {batch * n / times['gpt-jax'][-1]:8.1f} tokens/s | "
                  f"transformers {batch * n / times['transformers'][-1]:8.1f} tokens/s "
                  f"({'gpt-jax' if r % 2 == 0 else 'transformers'} first)", flush=True)
        ratios = [t / o for o, t in zip(times["gpt-jax"], times["transformers"])]
        ours_rate = batch * n / float(np.median(times["gpt-jax"]))
        theirs_rate = batch * n / float(np.median(times["transformers"]))
        print(f"batch={batch} transformers_tokens_per_sec={theirs_rate:.1f} "
              f"tokens_per_sec={ours_rate:.1f} "
              f"speedup_vs_transformers={float(np.median(ratios)):.2f}x", flush=True)


def main(argv: list[str]) -> None:
    p = entry.ArgumentParser(command="python benchmarks/vs_transformers.py",
                             description=__doc__)
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--n_head", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--new_tokens", type=int, default=200)
    p.add_argument("--batch_sizes", type=lambda s: [int(b) for b in s.split(",")],
                   default=[1, 8], help="comma-separated (default 1,8)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    entry.main(lambda: compare(args), keep_freed_memory=True)


if __name__ == "__main__":
    main(sys.argv[1:])
