"""Parity with Hugging Face's LlamaForCausalLM: import, greedy generation, export, fine-tune.

No network: small random Llamas are built in transformers (PyTorch, CPU, float32) and saved
locally, with a byte-level BPE tokenizer.json trained here on a slice of tiny-shakespeare.
Their initializer_range is large so that next-token predictions are far from ties, and their
RMSNorm weights are randomised so that the map of every tensor is tested.
"""

import dataclasses
import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import require_parity_libs, run_cli
from safetensors.numpy import load_file, save_file

from gpt_jax import checkpoint, data, export, hf, hf_llama, sampling, tokenization, trainer
from gpt_jax.errors import UserError
from gpt_jax.model import GPT, GPTConfig, effective_fields, init_params

VOCAB = 300  # the size the tokenizer below is trained to
LLAMA_SHAPE = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
               "num_attention_heads": 4, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
               "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}
EOT = 0  # <|endoftext|>, the tokenizer's only special token
PROMPT = [5, 17, 42, 99]


def _save_llama(directory: Path, *, tie: bool, kv_heads: int, vocab_size: int = VOCAB):
    """Returns a random LlamaForCausalLM (eval mode) after save_pretrained(directory)."""
    require_parity_libs()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA_SHAPE, vocab_size=vocab_size, num_key_value_heads=kv_heads,
                         tie_word_embeddings=tie, initializer_range=0.2, bos_token_id=None,
                         eos_token_id=EOT, pad_token_id=EOT)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # RMSNorm weights start at 1: randomise them to test the map
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    """Returns a byte-level BPE tokenizer.json of VOCAB tokens, <|endoftext|> first."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([Path(os.environ["GPT_JAX_SHAKESPEARE"]).read_text()[:20000]],
                            trainers.BpeTrainer(
                                vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False))
    assert tok.get_vocab_size() == VOCAB and tok.token_to_id("<|endoftext|>") == EOT
    return tok.to_str()


@pytest.fixture(scope="module")
def gqa_untied(tmp_path_factory, tokenizer_json):
    """Returns (model, directory): 4 query heads on 2 key/value heads, an untied head, and the
    tokenizer.json beside the weights."""
    directory = tmp_path_factory.mktemp("llama") / "gqa-untied"
    model = _save_llama(directory, tie=False, kv_heads=2)
    (directory / "tokenizer.json").write_text(tokenizer_json)
    return model, directory


@pytest.fixture(scope="module")
def mha_tied(tmp_path_factory):
    """Returns (model, directory): a key/value head per query head and a tied head."""
    directory = tmp_path_factory.mktemp("llama") / "mha-tied"
    return _save_llama(directory, tie=True, kv_heads=4), directory


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    """Returns the out_dir of a checkpoint of a Llama-shaped model on tiny-shakespeare's
    characters: rope (theta 500), rmsnorm (eps 1e-6), swiglu (48 wide), 4 heads on 2
    key/value heads, no biases, an untied head. Its parameters are an initialisation with
    noise on every one (norm scales included), saved as a training run saves them (only the
    parameters: export reads no optimizer state)."""
    config = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=4, n_embd=32,
                       bias=False, pos_encoding="rope", rope_theta=500.0, norm="rmsnorm",
                       norm_eps=1e-6, activation="swiglu", mlp_hidden=48, n_kv_head=2,
                       tie_embeddings=False)
    params = init_params(config, jax.random.PRNGKey(0))
    leaves, treedef = jax.tree.flatten(params)
    noise = np.random.default_rng(3)
    params = jax.tree.unflatten(treedef, [np.asarray(x) + 0.1 * noise.standard_normal(x.shape)
                                          .astype(np.float32) for x in leaves])
    out_dir = tmp_path_factory.mktemp("checkpoint") / "run"
    model = {k: v for k, v in dataclasses.asdict(config).items() if k != "vocab_size"}
    text = Path(os.environ["GPT_JAX_SHAKESPEARE"]).read_text()
    chars = tokenization.CharTokenizer.from_text(text)
    manager = checkpoint.make_manager(out_dir)
    checkpoint.save(manager, 10, {"params": params}, {"model": model}, chars.to_json())
    manager.wait_until_finished()
    manager.close()
    return str(out_dir)


def _torch_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Returns transformers' greedy continuation, ended (like ours) at eos_token_id if set."""
    import torch

    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                         pad_token_id=EOT)
    return out[0, len(prompt):].tolist()


def _ids(shape, vocab_size=VOCAB, seed=0):
    return np.random.default_rng(seed).integers(0, vocab_size, shape)


def _max_diff(ours, theirs) -> float:
    return float(np.max(np.abs(ours - theirs)))


@pytest.mark.parametrize("name, tied, kv_heads", [("gqa_untied", False, 2),
                                                  ("mha_tied", True, 4)])
def test_imported_logits_equal_transformers(request, name, tied, kv_heads):
    model, directory = request.getfixturevalue(name)
    config, params = hf.load(f"hf:{directory}")
    assert config == GPTConfig(
        vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_embd=64, bias=False,
        pos_encoding="rope", rope_theta=500.0, norm="rmsnorm", norm_eps=1e-5,
        activation="swiglu", mlp_hidden=96, n_kv_head=kv_heads, tie_embeddings=tied)
    assert ("lm_head" in params) == (not tied)
    ids = _ids((2, 48))
    ours = np.asarray(GPT(config).apply({"params": params}, ids))
    assert _max_diff(ours, _torch_logits(model, ids)) < 1e-4


@pytest.mark.parametrize("name", ["gqa_untied", "mha_tied"])
def test_greedy_generation_equals_transformers(request, name):
    model, directory = request.getfixturevalue(name)
    config, params = hf.load(f"hf:{directory}")
    expected = _hf_greedy(model, PROMPT, 24)
    ours = sampling.generate(params, config, [PROMPT], max_new_tokens=24, temperature=0.0,
                             stop_token=EOT)
    assert ours[0].tolist()[:len(expected)] == expected
    assert len(expected) == 24 or expected[-1] == EOT  # a stop ends both the same way
    assert len(set(expected)) > 4  # a real continuation, not one repeated token


def test_bfloat16_weights_read_as_their_float32_values(gqa_untied, tmp_path):
    import torch

    model, directory = gqa_untied
    (tmp_path / "bf16").mkdir()
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model.to(torch.float32)
    header_size = int.from_bytes((tmp_path / "bf16" / "model.safetensors").read_bytes()[:8],
                                 "little")
    header = json.loads((tmp_path / "bf16" / "model.safetensors").read_bytes()[8:8 + header_size])
    assert header["model.norm.weight"]["dtype"] == "BF16"
    config, params = hf.load(f"hf:{tmp_path / 'bf16'}")
    state = {k: v.to(torch.bfloat16).float().numpy() for k, v in model.state_dict().items()}
    jax.tree.map(np.testing.assert_array_equal, params,
                 hf_llama.params_from_tensors(state, config))


def test_export_cli_writes_a_llama_transformers_reads_alike(llama_checkpoint, tmp_path, capsys):
    from transformers import LlamaForCausalLM

    out = tmp_path / "exported"
    export.main(["--checkpoint", llama_checkpoint, "--out", str(out)])
    printed = capsys.readouterr()
    assert "(LlamaForCausalLM, 2 layers, 32 wide, vocab 65)" in printed.out
    assert "char tokenizer of 65 tokens" in printed.err
    written = json.loads((out / "config.json").read_text())
    assert {k: written[k] for k in ("num_key_value_heads", "intermediate_size", "rope_theta",
                                    "rms_norm_eps", "tie_word_embeddings", "eos_token_id")} == {
        "num_key_value_heads": 2, "intermediate_size": 48, "rope_theta": 500.0,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "eos_token_id": None}
    reloaded = LlamaForCausalLM.from_pretrained(out).eval()
    _, config, params, tokenizer = checkpoint.load_model(llama_checkpoint)
    ids = _ids((2, 16), vocab_size=65, seed=2)
    ours = np.asarray(GPT(config).apply({"params": params}, ids))
    assert _max_diff(_torch_logits(reloaded, ids), ours) < 1e-4
    prompt = tokenizer.encode("ROMEO:")
    expected = _hf_greedy(reloaded, prompt, 10)
    assert sampling.generate(params, config, [prompt], max_new_tokens=10,
                             temperature=0.0)[0].tolist() == expected


def test_export_then_import_gives_back_the_same_params(llama_checkpoint, mha_tied, tmp_path):
    _, config, params, _ = checkpoint.load_model(llama_checkpoint)
    assert hf.write(tmp_path / "untied", params, config) == "LlamaForCausalLM"
    again_config, again = hf.load(f"hf:{tmp_path / 'untied'}")
    jax.tree.map(np.testing.assert_array_equal, again, jax.tree.map(np.asarray, params))
    shape = {k: getattr(config, k) for k in hf.SHAPE_FIELDS}
    assert effective_fields({k: getattr(again_config, k) for k in hf.SHAPE_FIELDS}) == \
        effective_fields(shape)
    # A tied model is written without lm_head.weight, as transformers writes it.
    config, params = hf.load(f"hf:{mha_tied[1]}")
    hf.write(tmp_path / "tied", params, config)
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")
    jax.tree.map(np.testing.assert_array_equal, hf.load(f"hf:{tmp_path / 'tied'}")[1], params)


def test_export_refuses_what_neither_gpt2_nor_llama_expresses():
    llama = GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=4, n_embd=32, bias=False,
                      pos_encoding="rope", norm="rmsnorm", activation="swiglu", n_kv_head=2,
                      tie_embeddings=False)
    assert hf_llama.export_blockers(llama) == []
    gelu = GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=4, n_embd=32, bias=False,
                     pos_encoding="rope", norm="rmsnorm")
    with pytest.raises(UserError) as err:
        hf.write(Path("/nonexistent/never-written"), {}, gelu)
    assert str(err.value) == (
        "this model cannot be written as GPT-2 (pos_encoding='rope' (GPT-2 has a learned "
        "position table); norm='rmsnorm' (GPT-2 uses LayerNorm)) nor as Llama "
        "(activation='gelu' (Llama's MLP is swiglu))")
    gpt2 = GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=32)
    assert [r.split("=")[0] for r in hf_llama.export_blockers(gpt2)] == [
        "pos_encoding", "norm", "activation", "bias"]


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling="),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     "rope_parameters="),
    ({"attention_bias": True}, "attention_bias=True cannot be imported"),
    ({"mlp_bias": True}, "mlp_bias=True cannot be imported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' cannot be imported"),
    ({"head_dim": 32}, "head_dim=32 cannot be imported"),
    ({"model_type": "mistral"}, "describes a 'mistral' model"),
])
def test_llama_configs_our_model_cannot_express_are_refused(gqa_untied, tmp_path, change,
                                                             message):
    written = json.loads((gqa_untied[1] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**written, **change}))
    with pytest.raises(UserError, match=message) as err:
        hf.read_config(tmp_path)
    assert "\n" not in str(err.value)


def test_transformers_4_config_with_top_level_rope_theta_reads_alike(gqa_untied, tmp_path):
    written = json.loads((gqa_untied[1] / "config.json").read_text())
    del written["rope_parameters"]
    (tmp_path / "config.json").write_text(json.dumps(
        {**written, "rope_theta": 500.0, "rope_scaling": None}))
    assert hf.read_config(tmp_path) == hf.read_config(gqa_untied[1])


@pytest.mark.parametrize("damage, message", [
    ("drop", "missing tensor model.layers.1.self_attn.k_proj.weight"),
    ("extra", "unexpected tensor model.layers.2.input_layernorm.weight"),
    ("shape", "tensor model.layers.0.self_attn.k_proj.weight has shape (64, 64), "
              "expected (32, 64)"),
    ("head", "lm_head.weight differs from model.embed_tokens.weight"),
])
def test_tensor_mismatches_name_the_tensor(mha_tied, gqa_untied, tmp_path, damage, message):
    directory = (mha_tied if damage == "head" else gqa_untied)[1]
    tensors = load_file(directory / "model.safetensors")
    if damage == "drop":
        del tensors["model.layers.1.self_attn.k_proj.weight"]
    elif damage == "extra":
        tensors["model.layers.2.input_layernorm.weight"] = np.ones(64, np.float32)
    elif damage == "shape":
        tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
    else:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        hf.load(f"hf:{tmp_path}")


def test_tokenizer_json_encodes_decodes_and_ends_samples_at_eos(gqa_untied, mha_tied):
    tokenizer = hf.read_tokenizer(gqa_untied[1], VOCAB)
    assert isinstance(tokenizer, tokenization.HFTokenizer) and tokenizer.vocab_size == VOCAB
    assert tokenizer.decode(tokenizer.encode("ROMEO: héllo")) == "ROMEO: héllo"
    assert tokenization.end_of_text(tokenizer) == EOT  # config.json's eos_token_id
    lengths = tokenizer.token_bytes()
    assert lengths[EOT] == 0 and lengths[tokenizer.encode("e")[0]] == 1
    assert lengths[tokenizer.encode(" the")[0]] == 4  # one merged token of four bytes
    assert tokenization.tokenizer_from_json(tokenizer.to_json()) == tokenizer
    with pytest.raises(UserError, match="no tokenizer.json and a vocabulary of 300 tokens"):
        hf.read_tokenizer(mha_tied[1], VOCAB)


def test_sample_cli_prints_what_transformers_generates(gqa_untied):
    from tokenizers import Tokenizer

    model, directory = gqa_untied
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    prompt = "ROMEO:"
    generated = _hf_greedy(model, tok.encode(prompt).ids, 24)
    expected = prompt + tok.decode([i for i in generated if i != EOT])
    result = run_cli("sample.py", "--init_from", f"hf:{directory}", "--prompt", prompt,
                     "--temperature", "0", "--max_new_tokens", "24")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert len(expected) > len(prompt) + 8


def test_fine_tune_from_a_llama_starts_at_the_imported_loss(tmp_path, tiny_config):
    directory = tmp_path / "llama-bpe"
    _save_llama(directory, tie=False, kv_heads=2, vocab_size=50257)
    tiny_config.init_from = f"hf:{directory}"
    tiny_config.data.tokenizer = "gpt2"
    tiny_config.model.block_size = 32  # crops the 64-position context
    tiny_config.max_steps, tiny_config.eval_interval = 10, 10
    first = trainer.run(tiny_config)
    records = [json.loads(line) for line in
               (Path(tiny_config.out_dir) / "metrics.jsonl").read_text().splitlines()]
    _, config, params, tokenizer = checkpoint.load_model(tiny_config.out_dir)
    assert (config.n_layer, config.n_kv_head, config.mlp_hidden, config.block_size) == (
        2, 2, 96, 32)
    assert (config.pos_encoding, config.norm, config.activation) == ("rope", "rmsnorm",
                                                                    "swiglu")
    assert tokenizer.to_json() == {"kind": "tiktoken", "encoding": "gpt2"}
    imported_cfg, imported = hf.load(f"hf:{directory}", block_size=32)
    dataset = data.load_dataset(tiny_config.data)
    before = trainer.estimate_loss(trainer.make_eval_step(GPT(imported_cfg)), imported, dataset,
                                   tiny_config, step=0)
    assert records[0]["step"] == 0
    assert records[0]["val_loss"] == pytest.approx(before["val"], abs=1e-5)
    assert first["val_loss"] < records[0]["val_loss"]  # fine-tuning lowers it
