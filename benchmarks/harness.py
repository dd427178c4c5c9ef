"""Compiling and timing a config's train step and the KV-cache sampler.

What benchmarks/bench.py and benchmarks/accelerator.py share. No flags here: each script
reads its own and passes the values in.
"""

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh

from gpt_jax import config as config_lib
from gpt_jax import loop, metrics, optim, sampling, sharding, trainer
from gpt_jax.model import GPT, GPTConfig

# How both scripts sample: nanoGPT's sample.py settings, a fixed seed.
SAMPLING_OPTIONS = {"temperature": 0.8, "top_k": 200, "seed": 0}


class TrainSetup(NamedTuple):
    """A config's train step compiled over its mesh, with a fresh state and random batches."""

    step: Any  # the compiled step: (state, batch) -> (state, step metrics); donates the state
    state: Any  # trainer.TrainState, born sharded
    batches: list  # 8 random (inputs_BT, targets_BT) global batches, placed on the mesh
    model_cfg: GPTConfig
    mesh: Mesh
    compile_s: float  # tracing, lowering and compiling the step
    peak: tuple[float, str]  # (peak FLOP/s of the mesh's devices, where the figure comes from)


def train_setup(config, vocab_size: int) -> TrainSetup:
    """Returns the config's train step compiled over its mesh, as train.py builds it.

    The mesh is config.mesh's (all devices unless it says otherwise); the batches are random
    tokens below vocab_size. Nothing is printed.
    """
    config_lib.validate(config)
    model_cfg = config_lib.model_config(config, vocab_size)
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch(config.batch_size, config.grad_accum_steps, mesh)
    tx = optim.make_optimizer(config)
    init, shardings = trainer.sharded_init(model_cfg, tx, config.seed, mesh)
    state = jax.jit(init, out_shardings=shardings)()  # born sharded, as in train.py
    rng = np.random.default_rng(0)
    shape = (config.batch_size, model_cfg.block_size + 1)
    batches = [rng.integers(0, model_cfg.vocab_size, size=shape, dtype=np.int32)
               for _ in range(8)]
    batches = [sharding.put_batch((b[:, :-1], b[:, 1:]), mesh, config.batch_size)
               for b in batches]
    t0 = time.perf_counter()
    step = trainer.make_train_step(GPT(model_cfg), tx, config.grad_accum_steps, mesh, shardings,
                                   grad_clip=config.grad_clip).lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    return TrainSetup(step, state, batches, model_cfg, mesh, compile_s,
                      metrics.peak_flops(mesh.devices.flat))


def compile_abstract(config, vocab_size: int):
    """Returns (the config's train step compiled over its mesh, seconds to trace, lower and
    compile it) from the shapes of its state and batch alone: nothing is allocated, so a model
    too large for this host's memory compiles too (its memory_analysis() says what it would
    need)."""
    config_lib.validate(config)
    model_cfg = config_lib.model_config(config, vocab_size)
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch(config.batch_size, config.grad_accum_steps, mesh)
    tx = optim.make_optimizer(config)
    init, shardings = trainer.sharded_init(model_cfg, tx, config.seed, mesh)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         jax.eval_shape(init), shardings)
    tokens = jax.ShapeDtypeStruct((config.batch_size, model_cfg.block_size), np.int32,
                                  sharding=sharding.batch_sharding(mesh))
    t0 = time.perf_counter()
    step = trainer.make_train_step(GPT(model_cfg), tx, config.grad_accum_steps, mesh, shardings,
                                   grad_clip=config.grad_clip).lower(state, (tokens, tokens))
    return step.compile(), time.perf_counter() - t0


def mesh_line(mesh: Mesh) -> str:
    """Returns `backend: gpu (8 device(s): data=2 x fsdp=4)`."""
    return (f"backend: {jax.default_backend()} ({mesh.size} device(s): "
            f"data={mesh.shape[sharding.DATA]} x fsdp={mesh.shape[sharding.FSDP]})")


class TimedLoop:
    """Runs a setup's train steps paced as train.py's loop paces them.

    `loop(n)` runs n steps and returns their seconds; `loop.state` is the state after the
    last one (the step donates its input state, so only the newest is alive).
    """

    def __init__(self, step, state, batches: list):
        self._step, self.state, self._batches = step, state, batches
        self._pace = loop.StepPacer(step)
        self._done = 0

    def __call__(self, n: int) -> float:
        t0 = time.perf_counter()
        step_metrics = None  # n = 0 runs no step
        for _ in range(n):
            self.state, step_metrics = self._step(self.state,
                                                  self._batches[self._done % len(self._batches)])
            self._done += 1
            self._pace(step_metrics)
        jax.block_until_ready(step_metrics)
        return time.perf_counter() - t0


def seconds(fn: Callable[[], Any]) -> float:
    """Returns the wall-clock seconds of fn() (which must wait for its own results)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def random_prompts(vocab_size: int, batch: int, length: int) -> list[list[int]]:
    """Returns `batch` prompts of `length` random token ids (seeded by the batch size)."""
    rng = np.random.default_rng(batch)
    return rng.integers(0, vocab_size, (batch, length)).tolist()


def time_kv_cache(params, cfg: GPTConfig, prompts: list[list[int]], new_tokens: int
                  ) -> tuple[float, float, float]:
    """Times sampling.generate with the KV cache on one batch of prompts.

    Returns:
      (compile seconds, first-token seconds: the prefill and the first sampled token as
      --stream shows it, tokens/s over the batch's new_tokens rows).
    """
    def run():
        return sampling.generate(params, cfg, prompts, max_new_tokens=new_tokens,
                                 **SAMPLING_OPTIONS)

    def first_token():
        return next(sampling.stream(params, cfg, prompts, max_new_tokens=new_tokens,
                                    **SAMPLING_OPTIONS))

    with sampling.compile_watch() as compiling:
        run()
        first_token()
    first_s = seconds(first_token)
    return compiling.seconds, first_s, len(prompts) * new_tokens / seconds(run)


def sampling_line(batch: int, name: str, compile_s: float, first_s: float,
                  tokens_per_sec: float, note: str = "") -> str:
    """Returns `batch 1 | kv cache  | compile  1.23 s | first token  12.3 ms | 456.7 tokens/s`."""
    return (f"batch {batch} | {name:<9} | compile {compile_s:5.2f} s | first token "
            f"{1000 * first_s:7.1f} ms | {tokens_per_sec:8.1f} tokens/s{note}")
