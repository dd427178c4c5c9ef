"""Checkpoints: out_dir checks, the metadata a resume reads, and what may change between runs."""

import json
import os

import jax
import pytest

from gpt_jax import checkpoint, sampling, trainer
from gpt_jax import config as config_lib
from gpt_jax.errors import UserError
from gpt_jax.kernels import sets as kernels


def test_out_dir_must_be_a_writable_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file: choose a directory"):
        checkpoint.check_out_dir(str(tmp_path / "file"))
    checkpoint.check_out_dir(str(tmp_path / "new" / "deeper"))  # creatable: fine
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UserError, match="cannot be written"):
            checkpoint.check_out_dir(str(locked / "run"))


def _saved(tiny_config):
    trainer.run(tiny_config)
    step, meta = checkpoint.latest_metadata(tiny_config.out_dir)
    assert step == tiny_config.max_steps
    return meta


def test_latest_metadata_and_what_may_change_between_runs(tiny_config, tmp_path):
    assert checkpoint.latest_metadata(tmp_path / "none") == (None, None)
    meta = _saved(tiny_config)
    saved_config, tokenizer = meta
    # saved resolved, like the dtype
    assert saved_config["model"]["kernels"] == kernels.resolve("auto", jax.default_backend())
    config = config_lib.resolve_backend_fields(tiny_config, jax.default_backend())
    for field, value in (("kernels", "reference"), ("attention", "einsum"), ("dropout", 0.3),
                         ("dtype", "bfloat16")):
        changed = config.copy_and_resolve_references()
        changed.model[field] = value
        checkpoint.check_compatible(changed, meta, tokenizer)  # the parameters are the same
    changed = config.copy_and_resolve_references()
    changed.model.n_layer = 2
    with pytest.raises(UserError, match=r"different model \(model.n_layer 1 vs 2\)"):
        checkpoint.check_compatible(changed, meta, tokenizer)
    with pytest.raises(UserError, match="another tokenizer"):
        checkpoint.check_compatible(config, meta, {**tokenizer, "kind": "other"})
    changed = config.copy_and_resolve_references()
    changed.optimizer = "muon"  # its state has another tree: orbax could not restore it
    with pytest.raises(UserError, match="trained with optimizer=adamw.*--config.optimizer=adamw"):
        checkpoint.check_compatible(changed, meta, tokenizer)
    older = ({k: v for k, v in meta[0].items() if k != "optimizer"}, tokenizer)
    checkpoint.check_compatible(config, older, tokenizer)  # before the field: AdamW


def test_a_loaded_model_runs_on_this_machines_kernels(tiny_config):
    _saved(tiny_config)
    step, model_cfg, _, _ = checkpoint.load_model(tiny_config.out_dir)
    assert (step, model_cfg.kernels) == (tiny_config.max_steps, "auto")


def test_damaged_metadata_is_set_aside_and_the_previous_checkpoint_read(tiny_config, capsys):
    _saved(tiny_config)
    newest = checkpoint.checkpoint_dir(tiny_config.out_dir) / str(tiny_config.max_steps)
    (newest / "config" / "metadata").write_text("{not json")
    step, _ = checkpoint.latest_metadata(tiny_config.out_dir)
    assert step == tiny_config.max_steps - tiny_config.checkpoint_interval
    assert "is damaged" in capsys.readouterr().out


def test_a_checkpoint_from_before_embed_scale_and_final_norm_loads_as_trained(tiny_config):
    # Before these fields existed, sinusoidal runs had no embedding scale and post-LN runs an
    # ln_f on top; a saved config without the fields reads as that model.
    tiny_config.model.pos_encoding, tiny_config.model.norm_position = "sinusoidal", "post"
    tiny_config.model.embed_scale, tiny_config.model.final_norm = 1.0, True
    trainer.run(tiny_config)
    step = tiny_config.max_steps
    metadata = checkpoint.checkpoint_dir(tiny_config.out_dir) / str(step) / "config" / "metadata"
    saved = json.loads(metadata.read_text())
    for field in ("embed_scale", "final_norm"):
        del saved["model"][field]
    metadata.write_text(json.dumps(saved))
    _, model_cfg, params, _ = checkpoint.load_model(tiny_config.out_dir)
    assert (model_cfg.token_scale, model_cfg.has_final_norm) == (1.0, True) and "ln_f" in params
    tokens = sampling.generate(params, model_cfg, [[1, 2, 3]], max_new_tokens=4,
                               temperature=0.0)
    assert len(tokens[0]) == 4
    # A resume with the settings it was trained with passes; the new defaults are refused.
    config = config_lib.resolve_backend_fields(tiny_config, jax.default_backend())
    _, (saved_config, tokenizer) = checkpoint.latest_metadata(tiny_config.out_dir)
    assert "embed_scale" not in saved_config["model"]
    checkpoint.check_compatible(config, (saved_config, tokenizer), tokenizer)
    config.model.embed_scale, config.model.final_norm = None, None
    with pytest.raises(UserError, match="embed_scale 1.0 vs 5.65"):
        checkpoint.check_compatible(config, (saved_config, tokenizer), tokenizer)
