"""benchmarks/accelerator.py: the batch search, the attention check, and the script on a CPU."""

import re

import jax
import pytest
from conftest import run_cli

from benchmarks import attention_check, batch_search
from gpt_jax import entry
from gpt_jax.errors import UserError

SCRIPT = "benchmarks/accelerator.py"
TINY = ["--steps", "3", "--warmup", "1", "--tokens_per_step", "1024", "--max_batch", "8",
        "--vocab_size", "65", "--new_tokens", "8", "--prompt_tokens", "8",
        "--config.model.n_layer=1", "--config.model.n_embd=32", "--config.model.n_head=2",
        "--config.model.block_size=32", "--layer_models=config", "--layer_steps=1",
        "--remat_policies=block"]
CLOSING_KEYS = ["micro_batch", "grad_accum_steps", "compile_s", "ms_per_step", "tokens_per_sec",
                "mfu", "peak_mem_gib", "attention_max_diff", "attention",
                "sample_tokens_per_sec_b1", "sample_tokens_per_sec_b16"]


def test_the_search_keeps_the_largest_micro_batch_that_fits_and_accumulates_to_the_target():
    tried = []

    def try_batch(micro, accum):  # a device where 16 sequences of 1024 tokens fit, 32 do not
        tried.append((micro, accum))
        return f"setup of {micro}" if micro <= 16 else None

    sizes = batch_search.candidates(64, 1024, 2**19)
    assert sizes == [64, 32, 16, 8, 4, 2, 1]
    assert batch_search.largest_fitting(try_batch, sizes, 1024, 2**19) == (16, 32, "setup of 16")
    assert tried == [(64, 8), (32, 16), (16, 32)]  # each try is the step it will time
    assert 16 * 32 * 1024 == 2**19


def test_the_candidates_split_over_devices_and_never_exceed_one_step():
    assert batch_search.candidates(64, 1024, 2**19, shards=8) == [512, 256, 128, 64, 32, 16, 8]
    assert batch_search.candidates(48, 1024, 2**19) == [32, 16, 8, 4, 2, 1]
    assert batch_search.candidates(64, 32, 100) == [2, 1]  # 100 tokens hold 3 sequences of 32
    assert batch_search.grad_accum_steps(2, 32, 100) == 2  # 128 tokens: the nearest to 100
    assert batch_search.grad_accum_steps(64, 1024, 1000) == 1
    with pytest.raises(UserError, match=r"^tokens_per_step=512 is less than one sequence of "
                       r"block_size=1024 per device \(1 device\(s\)\): raise --tokens_per_step"):
        batch_search.candidates(64, 1024, 512)


def test_the_search_says_when_nothing_fits():
    with pytest.raises(UserError, match=r"^not even a micro-batch of 1 sequence\(s\) of "
                       r"block_size=1024 fits in device memory"):
        batch_search.largest_fitting(lambda micro, accum: None, [4, 2, 1], 1024, 2**19)


def test_only_xla_running_out_of_memory_counts_as_out_of_memory():
    oom = jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 25769803776 bytes.")
    assert batch_search.is_out_of_memory(oom)
    assert not batch_search.is_out_of_memory(
        jax.errors.JaxRuntimeError("INVALID_ARGUMENT: Executable expected shape f32[8]"))
    assert not batch_search.is_out_of_memory(MemoryError("RESOURCE_EXHAUSTED"))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_fused_attention_agrees_with_the_reference_within_the_dtypes_tolerance(dtype):
    check = attention_check.compare((2, 64, 2, 16), dtype)
    assert list(check.diffs) == ["output", "grad_q", "grad_k", "grad_v"]
    assert check.implementation == "XLA"  # no cuDNN on a CPU
    assert check.passed and check.tolerance == attention_check.TOLERANCE[dtype]
    if dtype == "bfloat16":  # rounding differs, by about one bfloat16 epsilon (2^-7) at most
        assert 1e-3 < check.max_diff < 2**-7
    else:
        assert check.max_diff < 1e-5


def test_the_attention_check_fails_a_kernel_that_sees_the_future():
    def not_causal(q, k, v, **_):
        return jax.nn.dot_product_attention(q, k, v, is_causal=False)

    check = attention_check.compare((2, 64, 2, 16), "bfloat16", fused=not_causal)
    assert not check.passed and check.max_diff > 0.2
    assert "attention check FAIL" in attention_check.report(check, (2, 64, 2, 16), "bfloat16")
    with pytest.raises(SystemExit) as stop:  # the script's exit status for a failed check
        entry.main(lambda: (_ for _ in ()).throw(attention_check.AttentionMismatch("differs")))
    assert stop.value.code == 1


def test_the_script_trains_checks_and_samples_on_a_cpu_with_tiny_shapes():
    result = run_cli(SCRIPT, *TINY)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "backend: cpu (1 device(s): data=1 x fsdp=1), device kind: cpu" in out
    # GPT-2's recipe shrunk, in the accelerator's dtype and kernels even on a CPU
    assert "block_size 32, vocab 65: 15,872 parameters; bfloat16, kernels fused" in out
    assert "batch search: micro-batches 8, 4, 2, 1 in turn" in out
    assert "batch: micro_batch=8 grad_accum_steps=4 block_size=32 tokens_per_step=1024 " \
           "(target 1024)" in out
    assert "peak device memory: n/a (CPU)" in out
    assert re.search(r"attention check PASS: max difference [\d.]+% <= tolerance 3.125% "
                     r"\(bfloat16\)", out)
    assert len(re.findall(r"^batch (1|16) \| kv cache .* tokens/s$", out, re.M)) == 2
    assert "not judged on cpu" in out
    layouts = re.findall(r"^layout: model=config (.*): compile_s=[\d.]+ ms_per_step=[\d.]+ "
                         r"mfu=[\d.]+ temp_gib=[\d.]+$", out, re.M)
    assert layouts == ["unrolled", "scanned remat=block"]

    last = out.strip().splitlines()[-1]
    assert last.startswith("accelerator: ")
    fields = dict(pair.split("=") for pair in last.removeprefix("accelerator: ").split())
    assert list(fields) == CLOSING_KEYS
    assert int(fields["micro_batch"]) * int(fields["grad_accum_steps"]) * 32 == 1024
    assert fields["attention"] == "PASS" and float(fields["attention_max_diff"]) < 2**-5
    assert fields["peak_mem_gib"] == "n/a"
    for key in ("compile_s", "ms_per_step", "tokens_per_sec", "mfu",
                "sample_tokens_per_sec_b1", "sample_tokens_per_sec_b16"):
        assert float(fields[key]) > 0, key


def test_the_script_refuses_a_bad_sampling_batch_in_one_line():
    result = run_cli(SCRIPT, "--sample_batch_sizes=1,0")
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: --sample_batch_sizes must be positive integers, got "
                                     "'1,0': e.g. --sample_batch_sizes=1,16")


def test_the_script_refuses_an_unknown_remat_policy_in_one_line():
    result = run_cli(SCRIPT, "--remat_policies=none,full")
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: --remat_policies: 'full' is no model.remat policy: "
                                     "use none, block, dots")
