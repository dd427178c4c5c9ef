"""train.py, sample.py and benchmarks/bench.py as a user runs them, in fresh processes."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
from conftest import REPO, run_cli, tiny_flags

CPU = "configs/shakespeare_cpu.py"
BENCH = "benchmarks/bench.py"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny checkpoint trained by train.py (20 steps), shared by the sampling tests."""
    out = tmp_path_factory.mktemp("cli") / "run"
    result = run_cli("train.py", "--config", CPU, *tiny_flags(out))
    assert result.returncode == 0, result.stderr
    assert "step 20 |" in result.stdout
    return out


def test_sample_prints_only_text_on_stdout(trained):
    result = run_cli("sample.py", "--checkpoint", trained, "--prompt", "ROMEO:",
                     "--num_samples", "3", "--max_new_tokens", "40", "--seed", "1")
    assert result.returncode == 0, result.stderr
    samples = result.stdout.split("\n" + "-" * 40 + "\n")
    assert len(samples) == 3
    assert all(s.startswith("ROMEO:") and len(s.rstrip("\n")) >= 6 for s in samples)
    assert "loaded" in result.stderr and "loaded" not in result.stdout


def test_a_second_sample_run_loads_its_program_from_the_compilation_cache(trained, tmp_path):
    cache = {"GPT_JAX_CACHE": str(tmp_path / "cache")}
    args = ("sample.py", "--checkpoint", trained, "--max_new_tokens", "5")
    first, second = run_cli(*args, env=cache), run_cli(*args, env=cache)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "from the persistent compilation cache" not in first.stderr
    assert "from the persistent compilation cache" in second.stderr
    assert first.stdout == second.stdout


def test_sample_py_imports_orbax_only_for_a_checkpoint():
    # Start-up latency: orbax takes ~0.4 s to import and only checkpoints need it.
    code = "import sys, sample; print(sorted(m for m in sys.modules if m.startswith('orbax')))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    assert result.stdout.strip() == "[]"


def test_greedy_sampling_is_reproducible(trained):
    args = ("sample.py", "--checkpoint", trained, "--temperature", "0", "--max_new_tokens", "30")
    first, second = run_cli(*args, "--seed", "1"), run_cli(*args, "--seed", "2")
    assert first.returncode == 0 and first.stdout == second.stdout


BAD_SAMPLE = {
    "missing checkpoint": (["--checkpoint", "{tmp}/nope"], "does not exist"),
    "empty out_dir": (["--checkpoint", "{tmp}"], "holds no checkpoint"),
    "prompt outside vocab": (["--checkpoint", "{run}", "--prompt", "日本"], "outside the model's"),
    "zero new tokens": (["--checkpoint", "{run}", "--max_new_tokens", "0"], "max_new_tokens"),
    "negative temperature": (["--checkpoint", "{run}", "--temperature", "-1"], "temperature"),
    "top_k zero": (["--checkpoint", "{run}", "--top_k", "0"], "top_k must be at least 1"),
    "not a number": (["--checkpoint", "{run}", "--num_samples", "x"], "invalid int value"),
    "negative new tokens": (["--checkpoint", "{run}", "--max_new_tokens", "-3"], "max_new_tokens"),
    "top_p zero": (["--checkpoint", "{run}", "--top_p", "0"], "top_p must be in (0, 1]"),
    "top_p above one": (["--checkpoint", "{run}", "--top_p", "1.5"], "top_p must be in (0, 1]"),
    "window_keep too big": (["--checkpoint", "{run}", "--window_keep", "17"], "window_keep"),
    "empty prompt": (["--checkpoint", "{run}", "--prompt", ""], "the prompt is empty"),
    "stream a batch": (["--checkpoint", "{run}", "--stream", "--num_samples", "2"],
                       "--stream prints one text sample"),
    "stream json": (["--checkpoint", "{run}", "--stream", "--format", "json"], "--stream prints"),
    "bad format": (["--checkpoint", "{run}", "--format", "xml"], "invalid choice: 'xml'"),
    "per_line alone": (["--checkpoint", "{run}", "--per_line"], "--per_line needs --prompt_file"),
    "no prompt file": (["--checkpoint", "{run}", "--prompt_file", "{tmp}/nope.txt"],
                       "cannot be read (No such file or directory)"),
    "prompt and file": (["--checkpoint", "{run}", "--prompt", "a", "--prompt_file", "{tmp}/p"],
                        "not allowed with argument --prompt"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAMPLE))
def test_bad_sample_input_is_one_line(case, trained, tmp_path):
    args, message = BAD_SAMPLE[case]
    args = [a.format(tmp=tmp_path, run=trained) for a in args]
    _assert_one_line_error(run_cli("sample.py", *args), message)


@pytest.fixture(scope="module")
def trained_model(trained):
    """(step, config, params, tokenizer) of the tiny checkpoint, loaded in this process."""
    from gpt_jax import checkpoint

    return checkpoint.load_model(trained)


def _json_lines(result) -> list[dict]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_sample_json_lines_and_stop_strings(trained, trained_model):
    tokenizer = trained_model[3]
    args = ("sample.py", "--checkpoint", trained, "--prompt", "ROMEO:", "--num_samples", "2",
            "--max_new_tokens", "30", "--seed", "1", "--format", "json")
    free = _json_lines(run_cli(*args))
    assert len(free) == 2 and free[0]["tokens"] != free[1]["tokens"]
    for sample in free:
        assert set(sample) == {"prompt", "prompt_tokens", "text", "tokens", "tokens_per_sec"}
        assert sample["prompt"] == "ROMEO:"
        assert sample["prompt_tokens"] == tokenizer.encode("ROMEO:")
        assert len(sample["tokens"]) == 30 and tokenizer.decode(sample["tokens"]) == sample["text"]
        assert sample["tokens_per_sec"] > 0
    text = free[0]["text"]
    stop = next(text[i:i + 2] for i in range(4, 20) if text[i:i + 2] not in text[:i + 1])
    stopped = _json_lines(run_cli(*args, "--stop", stop, "--stop", "never seen"))
    for before, after in zip(free, stopped):  # the same seed draws the same tokens
        cut = before["text"].find(stop) if stop in before["text"] else 30
        assert after["text"] == before["text"][:cut] and after["tokens"] == before["tokens"][:cut]
    assert len(stopped[0]["text"]) < 20


def test_prompt_file_lines_run_as_one_batch(trained, trained_model, tmp_path):
    from gpt_jax import sampling

    _, config, params, tokenizer = trained_model
    path = tmp_path / "prompts.txt"
    path.write_text("ROMEO:\nJULIET:\n\nFirst Citizen:\n")
    result = run_cli("sample.py", "--checkpoint", trained, "--prompt_file", path, "--per_line",
                     "--temperature", "0", "--max_new_tokens", "24", "--format", "json")
    samples = _json_lines(result)
    assert [s["prompt"] for s in samples] == ["ROMEO:", "JULIET:", "First Citizen:"]
    assert "generated 3 x 24 tokens" in result.stderr
    for sample in samples:
        alone = sampling.generate(params, config, [tokenizer.encode(sample["prompt"])],
                                  max_new_tokens=24, temperature=0.0)
        assert sample["tokens"] == alone[0].tolist()


def test_stream_prints_what_sampling_prints_and_crops_long_prompts(trained):
    prompt = "ROMEO:\nWhat light through yonder window breaks?"  # 47 characters, block_size 16
    args = ("sample.py", "--checkpoint", trained, "--prompt", prompt, "--max_new_tokens", "40",
            "--temperature", "0.8", "--seed", "3")
    plain, streamed = run_cli(*args), run_cli(*args, "--stream")
    assert plain.returncode == 0 and streamed.returncode == 0, plain.stderr + streamed.stderr
    assert streamed.stdout == plain.stdout and plain.stdout.startswith(prompt)
    assert len(plain.stdout) == len(prompt) + 40 + 1
    notice = "the prompt has 47 tokens: the model sees its last 16 (block_size)"
    assert notice in plain.stderr and notice in streamed.stderr


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    """hf:DIR of a random GPT-2-vocabulary model (block_size 16), written by gpt_jax.hf."""
    import jax

    from gpt_jax import hf
    from gpt_jax.model import GPTConfig, init_params

    config = GPTConfig(vocab_size=50257, block_size=16, n_layer=2, n_head=2, n_embd=32)
    directory = tmp_path_factory.mktemp("bpe") / "random-gpt2"
    hf.write(directory, init_params(config, jax.random.PRNGKey(0)), config)
    return f"hf:{directory}"


def test_stream_prints_what_sampling_prints_for_bpe(bpe_model):
    args = ("sample.py", "--init_from", bpe_model, "--prompt", "The quick brown fox",
            "--max_new_tokens", "40", "--temperature", "1.0", "--seed", "5")
    plain, streamed = run_cli(*args), run_cli(*args, "--stream")
    assert plain.returncode == 0 and streamed.returncode == 0, plain.stderr + streamed.stderr
    assert streamed.stdout == plain.stdout
    assert plain.stdout.startswith("The quick brown fox") and len(plain.stdout) > 40


def _assert_one_line_error(result, message):
    assert result.returncode != 0
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]


def test_sigint_saves_a_checkpoint_and_the_rerun_resumes(tmp_path):
    out = tmp_path / "run"
    flags = [*tiny_flags(out), "--config.max_steps=100000", "--config.decay_steps=100000",
             "--config.log_interval=1", "--config.eval_interval=1000"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "train.py", "--config", CPU, *flags], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("step 3 |"):
            break
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "stopped by SIGINT at step" in stderr and "Traceback" not in stderr
    stopped_at = int(stderr.split("at step ")[1].split(";")[0])
    again = run_cli("train.py", "--config", CPU, *flags, f"--config.max_steps={stopped_at + 2}")
    assert again.returncode == 0, again.stderr
    assert f"resuming from step {stopped_at}" in again.stdout


def test_bench_prints_the_closing_line():
    result = run_cli(BENCH, "--config", CPU, "--steps", "3", "--warmup", "1",
                     "--config.model.n_layer=1", "--config.model.n_embd=32",
                     "--config.model.n_head=2")
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("tokens_per_sec=") and " ms_per_step=" in last
    assert "compile_s=" in result.stdout


def test_bench_times_the_configs_mesh_like_train():
    eight = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    tiny = ["--steps", "2", "--warmup", "1", "--config.model.n_layer=1",
            "--config.model.n_embd=32", "--config.model.n_head=2", "--config.batch_size=8"]
    result = run_cli(BENCH, "--config", CPU, *tiny, "--config.mesh.fsdp=4", env=eight)
    assert result.returncode == 0, result.stderr
    assert "backend: cpu (8 device(s): data=2 x fsdp=4)" in result.stdout
    # The eight simulated devices share the host's cores: the probe's peak, counted once.
    assert "(float32 matmul probe)" in result.stdout
    odd = run_cli(BENCH, "--config", CPU, *tiny, "--config.batch_size=12", env=eight)
    assert odd.returncode == 2
    assert odd.stderr.strip() == ("error: batch_size=12 does not split evenly over 8 device(s) "
                                  "× 1 micro-batch(es): make it a multiple of 8")


def test_bench_variants_mode_times_each_variant_against_the_first():
    result = run_cli(BENCH, "--config", CPU, "--mode", "variants", "--steps", "1",
                     "--rounds", "2", "--warmup", "1", "--config.model.n_layer=1",
                     "--config.model.n_embd=32", "--config.model.n_head=2", "--variant=",
                     "--variant=model.activation=swiglu optimizer=muon")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len([line for line in lines if line.startswith("round ")]) == 2
    # 1 layer of width 32, no biases: 16,512. swiglu adds a third 32 x 128 matrix (Llama's rule
    # rounds 2/3 of 128 up to 128).
    assert re.fullmatch(r"variant=baseline params=16512 ms_per_step=[\d.]+ "
                        r"tokens_per_sec=\d+ relative=1.000", lines[-2]), lines[-2]
    assert re.fullmatch(r"variant=activation=swiglu__optimizer=muon params=20608 "
                        r"ms_per_step=[\d.]+ tokens_per_sec=\d+ relative=[\d.]+",
                        lines[-1]), lines[-1]


def test_bench_compile_mode_reports_compile_seconds_and_xla_memory_per_variant():
    result = run_cli(BENCH, "--config", CPU, "--mode", "compile", "--rounds", "1",
                     "--config.model.n_layer=2", "--config.model.n_embd=32",
                     "--config.model.n_head=2", "--config.batch_size=4", "--variant=",
                     "--variant=model.scan_layers=True model.remat=block")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    figures = r"compile_s=[\d.]+ temp_mib=[\d.]+ argument_mib=[\d.]+ output_mib=[\d.]+"
    assert re.fullmatch(r"variant=baseline " + figures, lines[-2]), lines[-2]
    assert re.fullmatch(r"variant=scan_layers=True__remat=block " + figures, lines[-1]), lines[-1]


def test_vs_transformers_checks_the_tokens_and_ends_each_batch_with_the_ratio():
    from conftest import require_parity_libs

    require_parity_libs()
    result = run_cli("benchmarks/vs_transformers.py", "--n_layer", "1", "--n_head", "2",
                     "--n_embd", "32", "--new_tokens", "6", "--rounds", "2",
                     "--batch_sizes", "1,2", "--latency")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    pairs = [line for line in lines if line.startswith("  sample.py pair")]
    assert len(pairs) == 2 and all("(the same command again)" in line for line in pairs)
    assert any(re.fullmatch(r"first_run_first_token_s=[\d.]+ second_run_first_token_s=[\d.]+",
                            line) for line in lines), lines
    assert [line.split(";")[0] for line in lines if "tokens identical" in line] == [
        "batch 1: tokens identical", "batch 2: tokens identical"]
    closing = [line for line in lines if line.startswith("batch=")]
    assert [line.split()[0] for line in closing] == ["batch=1", "batch=2"]
    for line in closing:
        assert re.fullmatch(r"batch=\d transformers_tokens_per_sec=[\d.]+ tokens_per_sec=[\d.]+ "
                            r"speedup_vs_transformers=\d+\.\d\dx", line), line


def test_bench_nanogpt_mode_alternates_rounds_and_ends_with_the_ratio():
    from conftest import require_parity_libs

    require_parity_libs()
    result = run_cli(BENCH, "--config", CPU, "--mode", "nanogpt", "--steps", "2",
                     "--rounds", "3", "--warmup", "1", "--config.model.n_layer=1",
                     "--config.model.n_embd=32", "--config.model.n_head=2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    rounds = [line for line in lines if line.startswith("round ")]
    assert [r.split("(")[-1] for r in rounds] == [  # ABBA: drift favours neither side
        "gpt-jax first)", "nanoGPT first)", "gpt-jax first)"]
    assert re.fullmatch(r"nanogpt_ms_per_step=[\d.]+ ms_per_step=[\d.]+ "
                        r"speedup_vs_nanogpt=\d+\.\d\dx", lines[-1]), lines[-1]


def test_bench_nanogpt_mode_refuses_what_nanogpt_cannot_run():
    result = run_cli(BENCH, "--config", CPU, "--mode", "nanogpt",
                     "--config.model.activation=relu")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: nanoGPT has no equivalent of this model: activation='relu' (GPT-2's MLP uses "
        "tanh-GELU)")


def test_a_bad_value_for_a_script_flag_names_that_flag_not_the_config():
    result = run_cli(BENCH, "--config", CPU, "--mode", "bogus")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: bad value for --mode: value should be one of "
        "<train|sample|nanogpt|variants|compile> (--help lists the flags)")


def test_bench_sample_mode_ends_with_the_speedup():
    result = run_cli(BENCH, "--config", CPU, "--mode", "sample", "--new_tokens", "20",
                     "--prompt_tokens", "8", "--batch_sizes", "1,2", "--config.model.n_layer=1",
                     "--config.model.n_embd=32", "--config.model.n_head=2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert re.fullmatch(r"speedup_batch1=\d+\.\dx", lines[-1]), lines[-1]
    assert sum("first token" in line and "tokens/s" in line for line in lines) == 4
    assert "timed over 10 tokens" in result.stdout  # batch 2: the recompute baseline


def test_prepare_speed_times_both_sides_on_the_same_tokens():
    from conftest import require_pyarrow

    require_pyarrow()
    result = run_cli("benchmarks/prepare_speed.py", "--mb", "1", "--rounds", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    rounds = [line.split() for line in lines if line.lstrip().startswith("round")]
    assert len(rounds) == 4 and len({r[3] for r in rounds}) == 1  # the same token count
    assert re.fullmatch(r"mb=1 prepare_tokens_per_sec=\d+ plain_tokens_per_sec=\d+ "
                        r"ratio=\d+\.\d\d prepare_peak_mib=\d+", lines[-1]), lines[-1]
