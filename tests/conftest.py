"""Shared fixtures: the offline tiny-shakespeare copy, a private cache, tiny configs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Offline machines (CI included) point the project at a local corpus and BPE cache.
os.environ.setdefault("GPT_JAX_SHAKESPEARE", str(SHARED / "data" / "tinyshakespeare.txt"))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))

TINY_OVERRIDES = {
    "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 16,
    "batch_size": 4, "max_steps": 20, "decay_steps": 20, "warmup_steps": 5,
    "eval_interval": 10, "eval_iters": 2, "eval_tokens": 128, "log_interval": 5, "checkpoint_interval": 10,
}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Prepared corpora go to a per-session cache, never to ~/.cache."""
    monkeypatch.setenv("GPT_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def tiny_config(tmp_path):
    """Returns the CPU recipe shrunk to a 1-layer, 32-wide model writing under tmp_path."""
    from configs.shakespeare_cpu import get_config

    config = get_config()
    for key, value in TINY_OVERRIDES.items():
        holder = config
        *parents, leaf = key.split(".")
        for p in parents:
            holder = holder[p]
        holder[leaf] = value
    config.out_dir = str(tmp_path / "run")
    return config


def tiny_flags(out_dir) -> list[str]:
    return [f"--config.{k}={v}" for k, v in TINY_OVERRIDES.items()] + [f"--config.out_dir={out_dir}"]


def run_cli(*args, timeout=180, **kwargs) -> subprocess.CompletedProcess:
    """Runs a repo script (train.py, sample.py, benchmarks/bench.py) in a fresh Python."""
    env = dict(os.environ, PYTHONPATH=str(REPO), **kwargs.pop("env", {}))
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False, **kwargs)


def require_pyarrow():
    """Imports pyarrow for the parquet tests: skipped without the `data` extra, except in CI
    (GPT_JAX_REQUIRE_PARITY=1), where a missing install fails."""
    if os.environ.get("GPT_JAX_REQUIRE_PARITY"):
        import pyarrow  # noqa: F401
    return pytest.importorskip("pyarrow.parquet")


def require_parity_libs():
    """Imports torch and transformers for the parity tests.

    Without them (a plain `pip install -e ".[dev]"`) the parity tests are skipped; CI sets
    GPT_JAX_REQUIRE_PARITY=1 so that a missing install fails instead of skipping.
    """
    if os.environ.get("GPT_JAX_REQUIRE_PARITY"):
        import torch  # noqa: F401
        import transformers  # noqa: F401
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
