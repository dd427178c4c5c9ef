"""Times one evaluation of a recipe: the fixed validation measure against nanoGPT's estimate.

    python benchmarks/eval_cost.py [--config configs/shakespeare_cpu.py] [--rounds 5] \
        [--config.eval_tokens=N ...]

Builds the recipe's model (fresh init), compiles its eval step, then times trainer.estimate_loss
(train and val splits, as the training loop calls it) with eval_mode=fixed and eval_mode=random
in alternating order, and prints each mode's median seconds, the tokens it scores and the ratio,
then one line `fixed_s=... random_s=... ratio=...`. A training step of the recipe is timed the
same way, so the cost can be read as steps: an evaluation every eval_interval steps adds
(eval seconds) / (eval_interval x step seconds) to the run.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # before gpt_jax: it may not be installed

import jax  # noqa: E402

from gpt_jax import cli, data, optim, trainer  # noqa: E402
from gpt_jax import config as config_lib  # noqa: E402
from gpt_jax.model import GPT  # noqa: E402


def scored_tokens(dataset, config) -> int:
    """Returns the tokens one evaluation scores (both splits)."""
    return sum(tokens for split in ("train", "val")
               for _, tokens, _ in data.eval_batches(dataset, config, split, 0))


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/shakespeare_cpu.py")
    p.add_argument("--rounds", type=int, default=5)
    args, overrides = p.parse_known_args(argv)
    config = config_lib.resolve_backend_fields(
        cli.parse_config(["eval_cost", "--config", args.config, *overrides]),
        jax.default_backend())
    dataset = data.load_dataset(config.data)
    model_cfg = config_lib.model_config(config, dataset.tokenizer.vocab_size)
    model, tx = GPT(model_cfg), optim.make_optimizer(config)
    state = trainer.init_train_state(model_cfg, tx, config.seed)
    eval_step = trainer.make_eval_step(model)
    modes = {}
    for mode in ("fixed", "random"):
        c = config.copy_and_resolve_references()
        c.eval_mode = mode
        modes[mode] = c
        trainer.estimate_loss(eval_step, state.params, dataset, c, 0)  # compile
    step = trainer.make_train_step(model, tx, config.grad_accum_steps)
    batch = data.train_batch(dataset, config, 0)
    state, _ = step(state, batch)
    jax.block_until_ready(state)
    seconds = {"fixed": [], "random": [], "step": []}
    for _ in range(args.rounds):
        for mode, c in modes.items():
            t0 = time.perf_counter()
            trainer.estimate_loss(eval_step, state.params, dataset, c, 0)
            seconds[mode].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(10):
            state, step_metrics = step(state, batch)
        jax.block_until_ready(step_metrics)
        seconds["step"].append((time.perf_counter() - t0) / 10)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    for mode, c in modes.items():
        share = median[mode] / (config.eval_interval * median["step"])
        print(f"{mode}: {median[mode]:.3f} s per evaluation ({scored_tokens(dataset, c):,} "
              f"tokens scored), {median[mode] / median['step']:.0f} train steps' worth; "
              f"every {config.eval_interval} steps: +{100 * share:.1f}% run time")
    print(f"train step {1000 * median['step']:.1f} ms")
    print(f"fixed_s={median['fixed']:.3f} random_s={median['random']:.3f} "
          f"ratio={median['fixed'] / median['random']:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
