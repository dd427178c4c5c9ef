"""Times the train step of a config: python bench.py --config configs/shakespeare_cpu.py

Prints compile seconds and steady-state ms/step, then a last line
`tokens_per_sec=N ms_per_step=N`. No data is prepared and nothing is written: batches are
random tokens over --vocab_size (65: tiny-shakespeare's characters).
"""

import sys
import time

from absl import flags

from gpt_jax.errors import UserError, exit_with

_STEPS = flags.DEFINE_integer("steps", 50, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed steps after compiling.")
_VOCAB = flags.DEFINE_integer("vocab_size", 65, "Vocabulary of the random batches.")


def main(argv):
    from gpt_jax import cli

    try:
        config = cli.parse_config(argv)
        if _STEPS.value < 1 or _WARMUP.value < 0:
            raise UserError("--steps must be >= 1 and --warmup >= 0")
    except UserError as err:
        exit_with(err)

    import jax
    import numpy as np

    from gpt_jax import config as config_lib
    from gpt_jax import optim, trainer
    from gpt_jax.model import GPT

    config_lib.validate(config)
    model_cfg = trainer.model_config(config, _VOCAB.value)
    tx = optim.make_optimizer(config)
    state = trainer.init_train_state(model_cfg, tx, config.seed)
    rng = np.random.default_rng(0)
    shape = (config.batch_size, model_cfg.block_size + 1)
    batches = [rng.integers(0, model_cfg.vocab_size, size=shape, dtype=np.int32)
               for _ in range(8)]
    batches = [(b[:, :-1], b[:, 1:]) for b in batches]
    tokens_per_step = config.batch_size * model_cfg.block_size

    t0 = time.perf_counter()
    step = trainer.make_train_step(GPT(model_cfg), tx).lower(state, batches[0], state.rng).compile()
    print(f"backend: {jax.default_backend()} ({jax.device_count()} device(s))")
    print(f"compile_s={time.perf_counter() - t0:.2f}")

    def run(n):
        nonlocal state
        for i in range(n):
            state, metrics = step(state, batches[i % len(batches)], state.rng)
        jax.block_until_ready(metrics)

    run(_WARMUP.value)
    t0 = time.perf_counter()
    run(_STEPS.value)
    ms = 1000 * (time.perf_counter() - t0) / _STEPS.value
    print(f"steady state over {_STEPS.value} steps: {ms:.2f} ms/step, "
          f"{tokens_per_step / ms * 1000:,.0f} tokens/s ({tokens_per_step} tokens/step)")
    print(f"tokens_per_sec={tokens_per_step / ms * 1000:.0f} ms_per_step={ms:.2f}")


if __name__ == "__main__":
    main(sys.argv)
