"""Parity with Hugging Face's GPT2LMHeadModel: import, greedy generation, export, fine-tune.

No network: a small random GPT-2 is built in transformers (PyTorch, CPU) and saved locally.
Its initializer_range is large so that its next-token predictions are far from ties.
"""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import run_cli, tiny_flags
from safetensors.numpy import save_file

from gpt_jax import checkpoint, data, hf, sampling, trainer
from gpt_jax import config as config_lib
from gpt_jax.errors import UserError
from gpt_jax.model import GPT, GPTConfig, count_params

HF_SHAPE = {"vocab_size": 50257, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4}
PROMPT = [464, 2068, 7586, 21831, 18045, 625]  # "The quick brown fox jumps over"


@pytest.fixture(scope="module")
def torch_model(tmp_path_factory):
    """Returns (model, directory): a random GPT2LMHeadModel saved with save_pretrained."""
    from conftest import require_parity_libs

    require_parity_libs()
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(**HF_SHAPE, initializer_range=0.3, resid_pdrop=0.1, embd_pdrop=0.1,
                        attn_pdrop=0.1)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # biases and LayerNorm start at 0/1; randomise them to test the map
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    directory = tmp_path_factory.mktemp("hf") / "random-gpt2"
    model.save_pretrained(directory)
    return model, directory


def _torch_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    import torch

    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _ids(shape, seed=0):
    return np.random.default_rng(seed).integers(0, HF_SHAPE["vocab_size"], shape)


def test_imported_logits_equal_transformers(torch_model):
    model, directory = torch_model
    assert {"config.json", "model.safetensors"} <= {p.name for p in directory.iterdir()}
    config, params = hf.load(f"hf:{directory}")
    assert config == GPTConfig(vocab_size=50257, block_size=64, n_layer=2, n_head=4, n_embd=32)
    assert config.dropout == 0.0  # the HF config's dropout is ignored
    ids = _ids((2, 40))
    ours = np.asarray(GPT(config).apply({"params": params}, ids))
    np.testing.assert_allclose(ours, _torch_logits(model, ids), atol=1e-4, rtol=0)


def test_hub_layout_without_prefix_and_pytorch_bin_import_alike(torch_model, tmp_path):
    import torch

    model, directory = torch_model
    _, reference = hf.load(f"hf:{directory}")
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    hub = tmp_path / "hub"  # OpenAI's hub files: no `transformer.` prefix, no lm_head
    hub.mkdir()
    (hub / "config.json").write_text((directory / "config.json").read_text())
    save_file({k.removeprefix("transformer."): v for k, v in state.items()
               if k != "lm_head.weight"}, hub / "model.safetensors")
    pt = tmp_path / "pt"  # the older pickle format, lm_head included
    pt.mkdir()
    (pt / "config.json").write_text((directory / "config.json").read_text())
    torch.save(model.state_dict(), pt / "pytorch_model.bin")
    for other in (hub, pt):
        _, params = hf.load(f"hf:{other}")
        jax.tree.map(np.testing.assert_array_equal, params, reference)


def test_greedy_generation_equals_transformers(torch_model):
    model, directory = torch_model
    config, params = hf.load(f"hf:{directory}")
    expected = _hf_greedy(model, PROMPT, 32)
    ours = sampling.generate(params, config, [PROMPT], max_new_tokens=32, temperature=0.0)
    assert ours[0].tolist() == expected
    assert len(set(expected)) > 4  # a real continuation, not one repeated token


def test_sample_cli_prints_what_transformers_generates(torch_model):
    import tiktoken

    model, directory = torch_model
    enc = tiktoken.get_encoding("gpt2")
    prompt = "The quick brown fox"
    expected = enc.decode(enc.encode(prompt) + _hf_greedy(model, enc.encode(prompt), 32))
    result = run_cli("sample.py", "--init_from", f"hf:{directory}", "--prompt", prompt,
                     "--temperature", "0", "--max_new_tokens", "32")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_export_reloads_in_transformers_with_equal_logits(torch_model, tmp_path):
    from transformers import GPT2LMHeadModel

    _, directory = torch_model
    config, params = hf.load(f"hf:{directory}")
    hf.write(tmp_path / "out", params, config)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    ids = _ids((2, 40), seed=1)
    ours = np.asarray(GPT(config).apply({"params": params}, ids))
    np.testing.assert_allclose(_torch_logits(reloaded, ids), ours, atol=1e-4, rtol=0)


def test_export_cli_writes_a_bias_free_model_with_zero_biases(tiny_config, tmp_path):
    from conftest import require_parity_libs

    require_parity_libs()
    from transformers import GPT2LMHeadModel

    tiny_config.max_steps, tiny_config.model.bias = 10, False  # the CPU recipe has no biases
    trainer.run(tiny_config)
    out = tmp_path / "exported"
    result = run_cli("-m", "gpt_jax.export", "--checkpoint", tiny_config.out_dir, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "char tokenizer of 65 tokens" in result.stderr
    reloaded = GPT2LMHeadModel.from_pretrained(out).eval()
    assert float(reloaded.transformer.h[0].attn.c_attn.bias.detach().abs().sum()) == 0.0
    _, config, params, _ = checkpoint.load_model(tiny_config.out_dir)
    ids = np.random.default_rng(2).integers(0, 65, (2, 16))
    ours = np.asarray(GPT(config).apply({"params": params}, ids))
    np.testing.assert_allclose(_torch_logits(reloaded, ids), ours, atol=1e-4, rtol=0)


def test_export_refuses_models_gpt2_cannot_express(tmp_path):
    out = tmp_path / "run"
    result = run_cli("train.py", "--config", "configs/shakespeare_cpu.py", *tiny_flags(out),
                     "--config.max_steps=1", "--config.model.pos_encoding=sinusoidal")
    assert result.returncode == 0, result.stderr
    result = run_cli("-m", "gpt_jax.export", "--checkpoint", out, "--out", tmp_path / "hf")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "pos_encoding='sinusoidal'" in result.stderr
    assert not (tmp_path / "hf").exists()
    untied = GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=32,
                       tie_embeddings=False)
    assert hf.export_blockers(untied) == [
        "tie_embeddings=False (GPT-2's head is tied to the token embedding)"]


@pytest.mark.parametrize("damage, message", [
    ("drop", "missing tensor transformer.h.1.mlp.c_fc.weight"),
    ("extra", "unexpected tensor transformer.h.2.ln_1.weight"),
    ("shape", "tensor transformer.wpe.weight has shape (64, 16), expected (64, 32)"),
])
def test_tensor_mismatches_name_the_tensor(torch_model, tmp_path, damage, message):
    from safetensors.numpy import load_file

    _, directory = torch_model
    tensors = load_file(directory / "model.safetensors")
    if damage == "drop":
        del tensors["transformer.h.1.mlp.c_fc.weight"]
    elif damage == "extra":
        tensors["transformer.h.2.ln_1.weight"] = np.ones(32, np.float32)
    else:
        tensors["transformer.wpe.weight"] = np.zeros((64, 16), np.float32)
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(UserError) as err:
        hf.load(f"hf:{tmp_path}")
    assert message.replace("transformer.", "") in str(err.value)


def test_unsupported_hf_configs_are_refused(torch_model, tmp_path):
    _, directory = torch_model
    hf_config = json.loads((directory / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(hf_config, activation_function="relu")))
    with pytest.raises(UserError, match="activation_function='relu' cannot be imported"):
        hf.read_config(tmp_path)


def test_bare_name_offline_is_one_line(tmp_path):
    result = run_cli("sample.py", "--init_from", "hf:gpt2", env={
        "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "'gpt2'" in result.stderr
    missing = run_cli("sample.py", "--init_from", f"hf:{tmp_path}/nothing")
    assert missing.returncode == 2 and "is not a directory" in missing.stderr


def test_fine_tune_from_hf_starts_at_the_imported_loss(torch_model, tiny_config):
    _, directory = torch_model
    tiny_config.init_from = f"hf:{directory}"
    tiny_config.data.tokenizer = "gpt2"
    tiny_config.model.block_size = 32  # crops the 64-position table
    tiny_config.max_steps, tiny_config.eval_interval = 10, 10
    first = trainer.run(tiny_config)
    metrics_file = Path(tiny_config.out_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    _, config, params, tokenizer = checkpoint.load_model(tiny_config.out_dir)
    assert (config.n_layer, config.n_embd, config.block_size) == (2, 32, 32)
    assert tokenizer.to_json() == {"kind": "tiktoken", "encoding": "gpt2"}
    # The step-0 estimate is exactly the imported model's loss on the same eval batches.
    imported_cfg, imported = hf.load(f"hf:{directory}", block_size=32)
    dataset = data.load_dataset(tiny_config.data)
    before = trainer.estimate_loss(trainer.make_eval_step(GPT(imported_cfg)), imported, dataset,
                                   tiny_config, step=0)
    assert records[0]["step"] == 0
    assert records[0]["val_loss"] == pytest.approx(before["val"], abs=1e-5)
    assert first["val_loss"] < records[0]["val_loss"]  # fine-tuning lowers it
    assert not jax.tree.all(jax.tree.map(np.array_equal, params, imported))
    # A resume reads the checkpoint's shape and never the HF directory again.
    tiny_config.max_steps = 12
    tiny_config.init_from = f"hf:{directory}/gone"
    assert trainer.run(tiny_config)["step"] == 12


@pytest.mark.parametrize("size, total", [
    ("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080),
    ("gpt2-xl", 1_557_611_200),
])
def test_gpt2_config_sizes_have_the_published_counts(size, total):
    from configs.gpt2 import get_config

    config = get_config(size)
    assert count_params(config_lib.model_config(config, 50257))["total"] == total
