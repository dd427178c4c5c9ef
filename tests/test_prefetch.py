"""gpt_jax/prefetch.py: batches built ahead by a thread, in order, the same as built inline."""

import threading
import time

import pytest

from gpt_jax import config as config_lib
from gpt_jax import trainer
from gpt_jax.errors import UserError
from gpt_jax.prefetch import Prefetcher


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "gpt_jax-prefetch"]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_yields_each_steps_batch_in_order(depth):
    built = []

    def batch_of(step):
        built.append(step)
        return {"step": step, "tokens": list(range(step, step + 4))}

    with Prefetcher(batch_of, 5, 12, depth) as batches:
        got = [batches.get(step) for step in range(5, 12)]
    assert got == [batch_of(step) for step in range(5, 12)]
    assert built[:7] == list(range(5, 12))  # each built once, in step order
    assert not _prefetch_threads()


def test_an_error_in_the_thread_is_raised_by_the_get_of_its_step():
    def batch_of(step):
        if step == 3:
            raise ValueError("shard 7 is truncated")
        return step

    with Prefetcher(batch_of, 0, 10, 2) as batches:
        assert [batches.get(step) for step in range(3)] == [0, 1, 2]
        with pytest.raises(ValueError, match="shard 7 is truncated"):
            batches.get(3)
    assert not _prefetch_threads()


def test_close_mid_run_stops_the_thread_and_steps_must_come_in_order():
    batches = Prefetcher(lambda step: time.sleep(0.01) or step, 0, 10**6, 2)
    assert batches.get(0) == 0
    with pytest.raises(RuntimeError, match="step 5 was asked for"):
        batches.get(5)
    batches.close()
    assert not _prefetch_threads()


def test_training_with_prefetch_equals_building_each_batch_inline(tiny_config, tmp_path):
    runs = {}
    for depth in (0, 2):
        config = tiny_config.copy_and_resolve_references()
        config.data.prefetch, config.out_dir = depth, str(tmp_path / f"prefetch{depth}")
        config.max_steps = 10
        trainer.run(config)
        runs[depth] = (tmp_path / f"prefetch{depth}" / "metrics.jsonl").read_bytes()
    assert runs[0] == runs[2]
    assert not _prefetch_threads()


def test_a_negative_prefetch_is_refused(tiny_config):
    tiny_config.data.prefetch = -1
    with pytest.raises(UserError, match=r"^data.prefetch must be >= 0"):
        config_lib.validate(tiny_config)
