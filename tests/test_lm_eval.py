"""lm-evaluation-harness on gpt-jax models: parity with the harness's own HF backend, the CLI.

No network: the tasks are local YAML files over JSONL (tests/data/lm_eval/, paths relative to
the repository root), the models tiny and random, the GPT-2 BPE files come from the tiktoken
cache. Without lm-eval (the `eval` extra) these tests are skipped; CI sets
GPT_JAX_REQUIRE_PARITY=1 so that a missing install fails instead.
"""

import importlib
import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import REPO, require_parity_libs, run_cli

from gpt_jax import checkpoint, hf, tokenization
from gpt_jax import config as config_lib
from gpt_jax import lm_eval as gpt_lm_eval
from gpt_jax.model import GPT, GPTConfig, abstract_params


def require(module: str):
    """Imports `module`, or skips without it; under CI (GPT_JAX_REQUIRE_PARITY=1) a missing
    module fails instead, as conftest.require_parity_libs does for torch and transformers."""
    if os.environ.get("GPT_JAX_REQUIRE_PARITY"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


require("lm_eval")

TASKS = REPO / "tests" / "data" / "lm_eval"
MC, PROSE, COMPLETION = (str(TASKS / f"local_{n}.yaml")
                         for n in ("hellaswag", "prose", "completion"))
BLOCK_SIZE = 24  # shorter than most HellaSwag-style requests here: they are cut from the left
TIKTOKEN_FILES = {"vocab": "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6",  # vocab.json
                  "merges": "6d1cbeee0f20b3d9449abfede4726ed8212e3aee"}  # merges.txt


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    """The task files name their JSONL relative to the repository root."""
    monkeypatch.chdir(REPO)


def random_params(config: GPTConfig, seed: int = 0, std: float = 0.3):
    """Returns parameters drawn from N(0, std) everywhere (LayerNorms and biases included), so
    that choices and greedy tokens are far from ties."""
    rng = np.random.default_rng(seed)
    shapes = abstract_params(config)
    return jax.tree.map(lambda x: rng.normal(0, std, x.shape).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """Returns (config, params, hf_dir): a random GPT-2-shaped model, also written for HF."""
    config = GPTConfig(vocab_size=50257, block_size=BLOCK_SIZE, n_layer=2, n_head=2, n_embd=32)
    params = random_params(config)
    directory = tmp_path_factory.mktemp("lm_eval_hf") / "tiny-gpt2"
    hf.write(directory, params, config)
    return config, params, directory


def hf_gpt2_tokenizer():
    """Returns transformers' GPT-2 tokenizer built offline from tiktoken's cached BPE files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2TokenizerFast

    cache = os.environ["TIKTOKEN_CACHE_DIR"]
    bpe = Tokenizer(models.BPE.from_file(f"{cache}/{TIKTOKEN_FILES['vocab']}",
                                         f"{cache}/{TIKTOKEN_FILES['merges']}"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    eot = "<|endoftext|>"
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe, eos_token=eot, bos_token=eot,
                                  unk_token=eot)
    sample = "The cat's   tail,\n\nit  said<|endoftext|> 123 ünïcode."
    assert tokenizer.encode(sample) == tokenization.TiktokenTokenizer("gpt2").encode(sample)
    return tokenizer


@pytest.fixture(scope="module")
def hf_backend(tiny_gpt2):
    """Returns the harness's own HF backend (HFLM, PyTorch on CPU) on the same tiny model."""
    require_parity_libs()
    require("accelerate")
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(tiny_gpt2[2]), tokenizer=hf_gpt2_tokenizer(), batch_size=8,
                device="cpu")


def responses(results: dict, task: str) -> list:
    """Returns the per-request model outputs the harness logged, in document order."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [r[0] for s in samples for r in s["resps"]]


def test_scores_equal_a_plain_forward_in_few_compiled_shapes():
    config = GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=32)
    params = random_params(config, seed=1)
    forward = jax.jit(lambda ids: GPT(config).apply({"params": params}, ids))

    def logits_of(windows):  # right-padded to block_size: causal, so the padding is unseen
        ids = np.zeros((len(windows), config.block_size), np.int32)
        for row, window in zip(ids, windows):
            row[: len(window)] = window
        return np.asarray(forward(ids), np.float64)

    rng = np.random.default_rng(0)
    contexts = [rng.integers(0, 97, n).tolist() for n in (1, 3, 9, 17, 30, 31, 32, 33, 80)]
    greedy_next = [int(logits_of([c[-32:]])[0, len(c[-32:]) - 1].argmax()) for c in contexts]
    requests = []
    for context, best in zip(contexts, greedy_next):
        requests += [(context, rng.integers(0, 97, k).tolist()) for k in (2, 5, 70)]
        # One-token continuations after one context share a forward pass.
        requests += [(context, [best])] + [(context, [int(t)]) for t in rng.integers(0, 97, 3)]
    scorer = gpt_lm_eval.Scorer(params, config, batch_size=4)
    got = scorer(requests)

    # The reference: each continuation token scored after (at most) the block_size tokens
    # before it, in pieces of block_size tokens when it is longer.
    pieces, owners = [], []
    for i, (context, continuation) in enumerate(requests):
        for s in range(0, len(continuation), config.block_size):
            pieces.append((context + continuation[:s], continuation[s: s + config.block_size]))
            owners.append(i)
    windows = [(c + k)[-(config.block_size + 1):][:-1] for c, k in pieces]
    expected = np.zeros(len(requests))
    greedy = np.ones(len(requests), bool)
    for i, (_, continuation), window, logits in zip(owners, pieces, windows, logits_of(windows)):
        logits = logits[len(window) - len(continuation): len(window)]
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        expected[i] += (logits[np.arange(len(continuation)), continuation] - logz).sum()
        greedy[i] &= (logits.argmax(-1) == continuation).all()
    np.testing.assert_allclose([logp for logp, _ in got], expected, atol=1e-4, rtol=0)
    assert [g for _, g in got] == greedy.tolist()
    assert greedy.sum() >= len(contexts)
    assert scorer.compilations <= 2  # buckets 16 and 32: log2(block_size) - 3
    assert scorer.requests == len(requests)


def test_the_three_request_types_equal_the_hf_backend(tiny_gpt2, hf_backend):
    config, params, _ = tiny_gpt2
    tokenizer = tokenization.TiktokenTokenizer("gpt2")
    ours = gpt_lm_eval.harness_model(params, config, tokenizer, batch_size=8)
    kwargs = {"bootstrap_iters": 0, "log_samples": True}
    got = gpt_lm_eval.run_tasks(ours, [MC, PROSE, COMPLETION], **kwargs)
    expected = gpt_lm_eval.run_tasks(hf_backend, [MC, PROSE, COMPLETION], **kwargs)

    choices = responses(got, "local_hellaswag")
    reference = responses(expected, "local_hellaswag")
    assert len(choices) == 48  # 12 documents, 4 endings
    for (logp, greedy), (ref_logp, ref_greedy) in zip(choices, reference, strict=True):
        assert logp == pytest.approx(ref_logp, abs=1e-4) and greedy == ref_greedy
    for metric in ("acc,none", "acc_norm,none"):
        assert got["results"]["local_hellaswag"][metric] == \
            expected["results"]["local_hellaswag"][metric]
    np.testing.assert_allclose(responses(got, "local_prose"), responses(expected, "local_prose"),
                               atol=1e-4, rtol=0)
    texts = responses(got, "local_completion")
    assert texts == responses(expected, "local_completion")  # greedy, cut at the newline
    assert all("\n" not in t for t in texts) and any(texts)
    # Most choices are longer than the model's context: cut from the left, as in HF.
    docs = [json.loads(line) for line in (TASKS / "local_hellaswag.jsonl").open()]
    lengths = [len(tokenizer.encode(d["ctx"] + " " + e)) for d in docs for e in d["endings"]]
    assert max(lengths) > BLOCK_SIZE + 1 and min(lengths) <= BLOCK_SIZE
    assert ours.scorer.compilations <= 2  # buckets 16 and 24 (block_size)


def test_evaluate_returns_clean_metrics(tiny_gpt2):
    config, params, _ = tiny_gpt2
    bpe = tokenization.TiktokenTokenizer("gpt2")
    metrics = gpt_lm_eval.evaluate(params, config, bpe, [MC, PROSE],
                                   limit=4, batch_size=8)
    assert set(metrics) == {"local_hellaswag", "local_prose"}
    assert set(metrics["local_hellaswag"]) == {"acc", "acc_norm"}
    assert set(metrics["local_prose"]) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert all(isinstance(v, float) for m in metrics.values() for v in m.values())


def save_char_checkpoint(config) -> None:
    """Writes a random character-level model (tiny-shakespeare's table) as a step-0 checkpoint
    of `config`, as training would."""
    config = config_lib.resolve_backend_fields(config, jax.default_backend())
    tokenizer = tokenization.CharTokenizer.from_text(
        Path(os.environ["GPT_JAX_SHAKESPEARE"]).read_text(encoding="utf-8"))
    model = GPTConfig(vocab_size=tokenizer.vocab_size, **config.model)
    manager = checkpoint.make_manager(config.out_dir)
    checkpoint.save(manager, 0, {"params": random_params(model, std=0.1)}, config.to_dict(),
                    tokenizer.to_json())
    manager.wait_until_finished()
    manager.close()


def test_cli_scores_a_char_checkpoint(tiny_config, tmp_path):
    save_char_checkpoint(tiny_config)
    out = tmp_path / "results.json"
    result = run_cli("-m", "gpt_jax.lm_eval", "--checkpoint", tiny_config.out_dir, "--tasks",
                     "tests/data/lm_eval/local_hellaswag.yaml,tests/data/lm_eval/local_prose.yaml",
                     "--limit", "3", "--batch_size", "8", "--output_path", out)
    assert result.returncode == 0, result.stderr
    table = result.stdout
    assert "|local_hellaswag|" in table.replace(" ", "") and "acc_norm" in table
    assert "bits_per_byte" in table and "word_perplexity" in table
    assert "requests/s" in result.stderr and "compilation" in result.stderr
    results = json.loads(out.read_text())
    assert 0 <= results["results"]["local_hellaswag"]["acc,none"] <= 1
    assert results["results"]["local_prose"]["bits_per_byte,none"] > 0
    assert results["gpt_jax"]["compilations"] <= 1  # block_size 16: one bucket
    assert results["gpt_jax"]["loglikelihood_requests"] > 16


def test_the_harness_builds_the_model_by_its_registered_name(tiny_config):
    save_char_checkpoint(tiny_config)
    lm_eval = gpt_lm_eval._harness()
    gpt_lm_eval._model_class()
    lm = lm_eval.api.registry.get_model("gpt-jax").create_from_arg_string(
        f"checkpoint={tiny_config.out_dir},batch_size=4")
    assert (lm.batch_size, lm.max_length) == (4, 16)
    by_name = gpt_lm_eval.run_tasks(lm, [MC], limit=3, bootstrap_iters=0)
    _, config, params, tokenizer = checkpoint.load_model(tiny_config.out_dir)
    direct = gpt_lm_eval.run_tasks(gpt_lm_eval.harness_model(params, config, tokenizer,
                                                             batch_size=4),
                                   [MC], limit=3, bootstrap_iters=0)
    assert gpt_lm_eval.metrics_of(by_name) == gpt_lm_eval.metrics_of(direct)


def test_a_missing_task_is_one_line_before_the_model_loads(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        gpt_lm_eval.main(["--checkpoint", str(tmp_path / "no_run"), "--tasks",
                          str(tmp_path / "missing.yaml")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert "missing.yaml does not exist" in err


def test_training_scores_eval_tasks_at_each_evaluation(tiny_config):
    from gpt_jax import trainer

    tiny_config.eval_tasks = f"{MC}, {PROSE}"
    tiny_config.eval_tasks_limit = 4
    tiny_config.max_steps = tiny_config.eval_interval = 10
    trainer.run(tiny_config)
    out = Path(tiny_config.out_dir)
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 10]
    for r in evals:
        assert {"eval/local_hellaswag/acc", "eval/local_hellaswag/acc_norm",
                "eval/local_prose/bits_per_byte"} <= set(r)
        assert r["eval/local_hellaswag/acc"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # 4 examples
        assert r["eval/local_prose/bits_per_byte"] > 0
    # Training moved the model: the rolling task's bits per byte fell.
    assert evals[1]["eval/local_prose/bits_per_byte"] < evals[0]["eval/local_prose/bits_per_byte"]


def test_eval_tasks_without_the_harness_is_one_line(tiny_config, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(config_lib.importlib.util, "find_spec",
                        lambda name: None if name == "lm_eval" else find_spec(name))
    tiny_config.eval_tasks = "hellaswag"
    with pytest.raises(config_lib.UserError, match=r'needs lm-evaluation-harness: pip install'):
        config_lib.validate(tiny_config)
