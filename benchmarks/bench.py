"""Times the train step of a config.

    python benchmarks/bench.py --config configs/shakespeare_cpu.py

The step runs over the config's mesh, as in train.py (all devices unless --config.mesh says
otherwise). Prints compile seconds, FLOPs per step (formula and XLA's count), steady-state
ms/step and MFU (against the peak of all the mesh's devices), then a last line
`tokens_per_sec=N ms_per_step=N mfu=N`. No data is prepared and nothing is written: batches
are random tokens over --vocab_size (65: tiny-shakespeare's characters).

--mode sample times generation instead (python benchmarks/bench.py --config
configs/shakespeare.py --mode sample): the config's model with random parameters, a random
prompt, --new_tokens new tokens at batch 1 and 8, with the KV cache and by full recompute (a
whole block_size window per token, the reference sampler), side by side. It prints compile
seconds, first-token latency (prefill and first token) and tokens/s, then a last line
`speedup_batch1=N.Nx`.

--mode nanogpt times the train step side by side with nanoGPT's (PyTorch eager, same shapes,
same AdamW and clipping; benchmarks/torch_nanogpt.py, needs torch) in one process: --rounds
rounds, each --steps steps of gpt-jax and --steps of nanoGPT, in alternating order (gpt-jax
first in odd rounds, nanoGPT first in even ones), so both see the same machine load (and the
glibc settings of host_memory.py, which spare PyTorch's large allocations their page faults
too). It prints each round's ms/step and ratio, then a last line
`nanogpt_ms_per_step=N ms_per_step=N speedup_vs_nanogpt=N.NNx` (medians over rounds).

--mode variants times the train step of several variants of the config side by side, each
--variant given as in gpt_jax.sweep ("" is the config as it is, the baseline; "model.norm=
rmsnorm optimizer=muon" sets two fields): all are compiled first, then --rounds rounds of
--steps steps of each, the order rotating every round. It prints a line per variant with its
parameters, median ms/step, tokens/s and tokens/s relative to the first variant, e.g.

    python benchmarks/bench.py --config configs/shakespeare_cpu.py --mode variants \
        --variant= --variant=model.pos_encoding=rope --variant=optimizer=muon

--mode compile compiles the train step of each --variant (as --mode variants names them) from
the shapes of its state and batch alone, allocating nothing, --rounds times in rotating order,
and prints per variant the median compile seconds and XLA's memory analysis of the compiled
step: temporaries (activations and workspace), arguments (state and batch) and outputs, e.g.
GPT-2 XL's compile time with the layers unrolled and scanned, on a host too small to train it:

    python benchmarks/bench.py --config configs/gpt2.py --mode compile --rounds 1 \
        --config.model.n_layer=48 --config.model.n_head=25 --config.model.n_embd=1600 \
        --config.batch_size=1 --variant= --variant=model.scan_layers=True
"""

import copy
import math
import sys
import time
from pathlib import Path

# The repo root, as for train.py: configs import each other as `configs.X`, and this module
# imports `benchmarks.torch_nanogpt`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402 (after the path: gpt_jax may not be installed)
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import harness  # noqa: E402
from gpt_jax import cli, entry, metrics, sampling  # noqa: E402
from gpt_jax import config as config_lib  # noqa: E402
from gpt_jax.errors import UserError  # noqa: E402
from gpt_jax.model import count_params, init_params  # noqa: E402

_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "nanogpt", "variants", "compile"],
                          "What to time.")
_VARIANTS = flags.DEFINE_multi_string("variant", [], "--mode variants: FIELD=VALUE overrides "
                                      "(space-separated; empty: the config as it is).")
_STEPS = flags.DEFINE_integer("steps", 50, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed steps after compiling.")
_ROUNDS = flags.DEFINE_integer("rounds", 10, "--mode nanogpt: alternating rounds.")
_VOCAB = flags.DEFINE_integer("vocab_size", 65, "Vocabulary of the random batches.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 500, "--mode sample: tokens generated.")
_PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", 64, "--mode sample: prompt length.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8"], "--mode sample: batch sizes.")
_BASELINE_TOKENS = flags.DEFINE_integer(
    "baseline_tokens", 0, "--mode sample: tokens timed by full recompute (0: new_tokens / batch; "
    "each of its steps costs the same, so tokens/s carries over)")


def bench(argv: list[str]) -> None:
    config = cli.parse_config(argv)
    if _STEPS.value < 1 or _WARMUP.value < 0 or _ROUNDS.value < 1:
        raise UserError("--steps and --rounds must be >= 1 and --warmup >= 0")
    if _MODE.value == "nanogpt" and config.grad_accum_steps != 1:
        raise UserError("--mode nanogpt times one update per batch: set "
                        "--config.grad_accum_steps=1")
    batch_sizes = [int(b) for b in _BATCH_SIZES.value if b.isdigit()]
    if _MODE.value == "sample" and (_NEW_TOKENS.value < 1 or _PROMPT_TOKENS.value < 1 or
                                    len(batch_sizes) < len(_BATCH_SIZES.value) or
                                    min(batch_sizes, default=0) < 1):
        raise UserError("--new_tokens, --prompt_tokens and --batch_sizes must be >= 1")
    if _MODE.value == "sample":
        bench_sample(config, batch_sizes)
    elif _MODE.value == "nanogpt":
        bench_nanogpt(config)  # a UserError without torch
    elif _MODE.value == "variants":
        bench_variants(config, _VARIANTS.value or [""])
    elif _MODE.value == "compile":
        bench_compile(config, _VARIANTS.value or [""])
    else:
        bench_train(config)


def main(argv: list[str]) -> None:
    entry.main(lambda: bench(argv), keep_freed_memory=True)


def _train_setup(config) -> harness.TrainSetup:
    """Compiles the config's train step over its mesh; prints the mesh and compile seconds."""
    setup = harness.train_setup(config, _VOCAB.value)
    print(harness.mesh_line(setup.mesh))
    print(f"compile_s={setup.compile_s:.2f}")
    return setup


def bench_train(config):
    setup = _train_setup(config)
    (peak, peak_source), step = setup.peak, setup.step
    tokens_per_step = config.batch_size * setup.model_cfg.block_size
    flops_per_token = metrics.model_flops_per_token(setup.model_cfg)
    print(metrics.flops_report(flops_per_token * tokens_per_step, metrics.xla_flops(step), peak,
                               peak_source))  # train.py's line

    run = harness.TimedLoop(step, setup.state, setup.batches)
    run(_WARMUP.value)
    ms = 1000 * run(_STEPS.value) / _STEPS.value
    tokens_per_sec = tokens_per_step / ms * 1000
    mfu = tokens_per_sec * flops_per_token / peak
    print(f"steady state over {_STEPS.value} steps: {ms:.2f} ms/step, "
          f"{tokens_per_sec:,.0f} tokens/s ({tokens_per_step} tokens/step), MFU {100 * mfu:.1f}%")
    print(f"tokens_per_sec={tokens_per_sec:.0f} ms_per_step={ms:.2f} mfu={mfu:.3f}")


def bench_nanogpt(config):
    from benchmarks import torch_nanogpt  # PyTorch: only this mode needs it

    model_cfg = config_lib.model_config(config, _VOCAB.value)
    model = torch_nanogpt.build(model_cfg, seed=config.seed)  # refuses what nanoGPT lacks
    torch = torch_nanogpt.require_torch()
    setup = _train_setup(config)
    optimizer = torch_nanogpt.make_optimizer(model, config)
    torch_batches = [tuple(torch.from_numpy(np.asarray(a, np.int64)) for a in b)
                     for b in setup.batches]
    print(f"nanoGPT: PyTorch {torch.__version__} eager, {torch.get_num_threads()} threads, "
          f"same shapes, AdamW{' + clipping' if config.grad_clip > 0 else ''}")

    def run_nanogpt(n):
        t0 = time.perf_counter()
        for i in range(n):
            x, y = torch_batches[i % len(torch_batches)]
            loss = torch_nanogpt.train_step(model, optimizer, x, y, config.grad_clip)
        loss.item()
        return time.perf_counter() - t0

    run_jax = harness.TimedLoop(setup.step, setup.state, setup.batches)
    run_jax(_WARMUP.value)
    run_nanogpt(max(_WARMUP.value, 1))
    steps, ours, theirs = _STEPS.value, [], []
    for r in range(_ROUNDS.value):
        jax_first = r % 2 == 0  # ABBA order: drift within a round favours neither side
        if not jax_first:
            theirs.append(1000 * run_nanogpt(steps) / steps)
        ours.append(1000 * run_jax(steps) / steps)
        if jax_first:
            theirs.append(1000 * run_nanogpt(steps) / steps)
        print(f"round {r + 1}: gpt-jax {ours[-1]:6.2f} ms/step | nanoGPT {theirs[-1]:6.2f} "
              f"ms/step | {theirs[-1] / ours[-1]:.2f}x "
              f"({'gpt-jax' if jax_first else 'nanoGPT'} first)", flush=True)
    ratio = float(np.median([t / o for o, t in zip(ours, theirs)]))
    tokens_per_step = config.batch_size * model_cfg.block_size
    print(f"median over {_ROUNDS.value} rounds of {steps} steps: gpt-jax "
          f"{np.median(ours):.2f} ms/step ({tokens_per_step / np.median(ours) * 1000:,.0f} "
          f"tokens/s), nanoGPT {np.median(theirs):.2f} ms/step "
          f"({tokens_per_step / np.median(theirs) * 1000:,.0f} tokens/s)")
    print(f"nanogpt_ms_per_step={np.median(theirs):.2f} ms_per_step={np.median(ours):.2f} "
          f"speedup_vs_nanogpt={ratio:.2f}x")


def bench_variants(config, variants: list[str]) -> None:
    from gpt_jax import sweep

    runs = []
    for name, overrides in sweep.plan([], variants):
        setup = _train_setup(_variant(config, overrides))
        runs.append((name,
                     harness.TimedLoop(setup.step, setup.state, setup.batches),
                     count_params(setup.model_cfg)["total"], []))
        runs[-1][1](max(_WARMUP.value, 1))
    steps = _STEPS.value
    for r in range(_ROUNDS.value):
        for k in range(len(runs)):  # rotated: each variant leads once every len(runs) rounds
            name, run, _, times = runs[(r + k) % len(runs)]
            times.append(1000 * run(steps) / steps)
        print(f"round {r + 1}: " + " | ".join(f"{name} {times[-1]:.2f} ms/step"
                                              for name, _, _, times in runs), flush=True)
    tokens_per_step = config.batch_size * config.model.block_size
    base = float(np.median(runs[0][3]))
    print(f"median over {_ROUNDS.value} rounds of {steps} steps ({tokens_per_step} tokens/step):")
    for name, _, n_params, times in runs:
        ms = float(np.median(times))
        print(f"variant={name} params={n_params} ms_per_step={ms:.2f} "
              f"tokens_per_sec={tokens_per_step / ms * 1000:.0f} relative={base / ms:.3f}")


def bench_compile(config, variants: list[str]) -> None:
    from gpt_jax import sweep

    plan = [(name, _variant(config, overrides)) for name, overrides in sweep.plan([], variants)]
    seconds, plans = {name: [] for name, _ in plan}, {}
    for r in range(_ROUNDS.value):
        for k in range(len(plan)):  # rotated, as in --mode variants
            name, variant = plan[(r + k) % len(plan)]
            compiled, compile_s = harness.compile_abstract(variant, _VOCAB.value)
            seconds[name].append(compile_s)
            plans[name] = compiled.memory_analysis()
            del compiled
        print(f"round {r + 1}: " + " | ".join(f"{name} {times[-1]:.2f} s"
                                              for name, times in seconds.items()), flush=True)
    print(f"median over {_ROUNDS.value} rounds ({jax.default_backend()}):")
    for name, times in seconds.items():
        mib = {} if plans[name] is None else {
            key: getattr(plans[name], f"{key}_size_in_bytes") / 2**20
            for key in ("temp", "argument", "output")}
        print(f"variant={name} compile_s={float(np.median(times)):.2f} "
              + " ".join(f"{key}_mib={value:.1f}" for key, value in mib.items()))


def _variant(config, overrides):
    from gpt_jax import sweep

    variant = copy.deepcopy(config)
    for field, value in overrides:
        sweep.apply_override(variant, field, value)
    return variant


def bench_sample(config, batch_sizes: list[int]) -> None:
    cfg = config_lib.model_config(config, _VOCAB.value)
    params = init_params(cfg, jax.random.PRNGKey(config.seed))
    print(f"backend: {jax.default_backend()} ({jax.device_count()} device(s))")
    print(f"model: {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, block_size "
          f"{cfg.block_size}, vocab {cfg.vocab_size}: {count_params(cfg)['total']:,} parameters "
          "(random init)")
    print(f"sampling: prompt {_PROMPT_TOKENS.value} tokens, {_NEW_TOKENS.value} new tokens, "
          f"temperature 0.8, top_k 200; past block_size the window slides to its last "
          f"{cfg.block_size // 2} tokens")
    print("recompute: the whole block_size window goes through the model for every token (the "
          "reference sampler, one compiled step)")
    speedups = {batch: _bench_batch(params, cfg, batch) for batch in batch_sizes}
    if 1 in speedups:
        print(f"speedup_batch1={speedups[1]:.1f}x")


def _bench_batch(params, cfg, batch: int) -> float:
    """Times one batch size with the KV cache and by full recompute; returns the speedup."""
    n = _NEW_TOKENS.value
    prompts = harness.random_prompts(cfg.vocab_size, batch, _PROMPT_TOKENS.value)
    compile_s, first_s, cached = harness.time_kv_cache(params, cfg, prompts, n)
    _report(batch, "kv cache", compile_s, first_s, cached, "")

    def recompute(tokens):
        return sampling.generate(params, cfg, prompts, max_new_tokens=tokens, use_cache=False,
                                 **harness.SAMPLING_OPTIONS)

    k = _BASELINE_TOKENS.value or max(1, math.ceil(n / batch))
    with sampling.compile_watch() as compiling:
        recompute(1)
    first_s = harness.seconds(lambda: recompute(1))
    full = batch * k / harness.seconds(lambda: recompute(k))
    note = f" (timed over {k} tokens, same cost per token)" if k != n else ""
    _report(batch, "recompute", compiling.seconds, first_s, full, note)
    print(f"batch {batch}: the kv cache is {cached / full:.1f}x faster than full recompute")
    return cached / full


def _report(*args):
    print(harness.sampling_line(*args), flush=True)


if __name__ == "__main__":
    main(sys.argv)
