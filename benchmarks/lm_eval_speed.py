"""Times lm-evaluation-harness scoring: gpt-jax's backend against the harness's own HF backend.

    python benchmarks/lm_eval_speed.py [--size gpt2] [--limit 16] [--batch_size 16]

Both score the same harness requests (the local HellaSwag-style task by default,
tests/data/lm_eval/local_hellaswag.yaml: 4 requests per example) with the same random model:
GPT-2 124M-shaped by default (`--size tiny`: 2 layers, 32 wide), written once as a Hugging Face
directory for the harness's HFLM (transformers, PyTorch on CPU or CUDA). Each side is timed over
--rounds calls of its loglikelihood on the whole request list, in alternating order, after one
untimed call (gpt-jax compiles there). Prints each side's requests/s (median over rounds), the
largest difference between their log-likelihoods, then a last line
`gpt_jax_requests_per_sec=N hf_requests_per_sec=N speedup_vs_hf=N.NNx compilations=N`.
Needs the eval and parity extras; offline, the GPT-2 BPE files come from TIKTOKEN_CACHE_DIR.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # before gpt_jax: it may not be installed

import jax
import numpy as np

from gpt_jax import hf, tokenization
from gpt_jax import lm_eval as gpt_lm_eval
from gpt_jax.model import GPTConfig, abstract_params, count_params

SIZES = {"gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024},
         "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64}}
# tiktoken's cache names its files by the sha1 of their URL: GPT-2's vocab.json and merges.txt.
TIKTOKEN_FILES = ("6c7ea1a7e38e3a7f062df639a5b80947f075ffe6",
                  "6d1cbeee0f20b3d9449abfede4726ed8212e3aee")


def hf_gpt2_tokenizer():
    """Returns transformers' GPT-2 tokenizer built offline from tiktoken's cached BPE files
    (checked against tiktoken: a wrongly built one can encode everything to nothing)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2TokenizerFast

    cache = os.environ.get("TIKTOKEN_CACHE_DIR", str(REPO.parent / "shared" / "tiktoken_cache"))
    bpe = Tokenizer(models.BPE.from_file(*(f"{cache}/{name}" for name in TIKTOKEN_FILES)))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    eot = "<|endoftext|>"
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe, eos_token=eot, bos_token=eot,
                                  unk_token=eot)
    sample = "The quick brown fox's   tail,\n\nit said<|endoftext|> 42."
    if tokenizer.encode(sample) != tokenization.TiktokenTokenizer("gpt2").encode(sample):
        raise SystemExit("the BPE files in TIKTOKEN_CACHE_DIR do not encode as tiktoken does")
    return tokenizer


def requests_of(task_file: str, limit: int):
    """Returns the harness's Instances of the task in task_file (its first `limit` examples)."""
    import lm_eval.tasks

    manager, names = gpt_lm_eval.resolve_tasks([task_file])
    with gpt_lm_eval.quiet():
        task = lm_eval.tasks.get_task_dict(names, manager)[names[0]]
        task.build_all_requests(limit=limit, rank=0, world_size=1)
    return task.instances


def timed(lm, requests) -> tuple[float, list]:
    start = time.perf_counter()
    with gpt_lm_eval.quiet():
        results = lm.loglikelihood(requests, disable_tqdm=True)
    return time.perf_counter() - start, results


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="gpt2")
    p.add_argument("--task", default="tests/data/lm_eval/local_hellaswag.yaml")
    p.add_argument("--limit", type=int, default=16, help="examples of the task")
    p.add_argument("--batch_size", type=int, default=16, help="rows per call, both sides")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    os.chdir(REPO)  # the local tasks name their data relative to the repository root
    import torch
    from lm_eval.models.huggingface import HFLM

    config = GPTConfig(vocab_size=50257, **SIZES[args.size])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: rng.normal(0, 0.02, x.shape).astype(np.float32),
                          abstract_params(config))
    requests = requests_of(args.task, args.limit)
    ours = gpt_lm_eval.harness_model(params, config, tokenization.TiktokenTokenizer("gpt2"),
                                     batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as directory:
        hf.write(Path(directory), params, config)
        theirs = HFLM(pretrained=directory, tokenizer=hf_gpt2_tokenizer(),
                      batch_size=args.batch_size,
                      device="cuda" if torch.cuda.is_available() else "cpu")
        print(f"{args.size}-shaped random model ({count_params(config)['total']:,} parameters), "
              f"{len(requests)} requests of {args.task}, batch {args.batch_size}, "
              f"HF backend on {theirs.device}")
        first_ours, got = timed(ours, requests)
        first_theirs, expected = timed(theirs, requests)
        print(f"first call: gpt-jax {first_ours:.2f} s ({ours.scorer.compilations} "
              f"compilation(s)), hf {first_theirs:.2f} s")
        seconds = {"gpt-jax": [], "hf": []}
        for r in range(args.rounds):
            order = [("gpt-jax", ours), ("hf", theirs)]
            for name, lm in order if r % 2 == 0 else order[::-1]:
                seconds[name].append(timed(lm, requests)[0])
            print(f"round {r + 1}: gpt-jax {seconds['gpt-jax'][-1]:.2f} s, "
                  f"hf {seconds['hf'][-1]:.2f} s")
    rate = {name: len(requests) / statistics.median(s) for name, s in seconds.items()}
    diff = max(abs(a[0] - b[0]) for a, b in zip(got, expected, strict=True))
    print(f"gpt-jax {rate['gpt-jax']:.1f} requests/s, hf {rate['hf']:.1f} requests/s; largest "
          f"log-likelihood difference {diff:.2e}")
    print(f"gpt_jax_requests_per_sec={rate['gpt-jax']:.2f} hf_requests_per_sec={rate['hf']:.2f} "
          f"speedup_vs_hf={rate['gpt-jax'] / rate['hf']:.2f}x "
          f"compilations={ours.scorer.compilations}")


if __name__ == "__main__":
    main(sys.argv[1:])
