"""Trains a GPT: python train.py --config configs/shakespeare.py [--config.FIELD=VALUE ...]"""

import sys

from gpt_jax import cli, entry, trainer


def train(argv: list[str]) -> None:
    config = cli.parse_config(argv)
    cli.init_distributed()
    trainer.run(config)


def main(argv: list[str]) -> None:
    entry.main(lambda: train(argv), keep_freed_memory=True,
               interrupted="interrupted; checkpoints already in out_dir are intact")


if __name__ == "__main__":
    main(sys.argv)
