"""Trains a GPT: python train.py --config configs/shakespeare.py [--config.FIELD=VALUE ...]"""

import sys

from gpt_jax import host_memory
from gpt_jax.errors import UserError, exit_with


def main(argv: list[str]) -> None:
    try:
        host_memory.retain_freed_memory()  # before JAX starts: see gpt_jax/host_memory.py
        from gpt_jax import cli, trainer

        config = cli.parse_config(argv)
        cli.init_distributed()
        trainer.run(config)
    except UserError as err:
        exit_with(err)
    except trainer.TrainingStopped as err:
        exit_with(err, err.exit_code)
    except KeyboardInterrupt:
        exit_with(UserError("interrupted; checkpoints already in out_dir are intact"), 130)


if __name__ == "__main__":
    main(sys.argv)
