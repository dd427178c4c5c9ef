"""The ablation tools: a sweep of variants and seeds, then its report."""

import argparse
import json

import pytest
from conftest import TINY_OVERRIDES, run_cli

from gpt_jax import sweep
from gpt_jax.errors import UserError

TINY = [f"--set={k}={v}" for k, v in TINY_OVERRIDES.items()] + ["--set=max_steps=10",
                                                                  "--set=eval_interval=5"]


def test_plan_crosses_grids_with_listed_variants():
    variants = sweep.plan(["model.dropout=0.0,0.2", "seed=1,2"], ["", "model.qkv_bias=False"])
    assert len(variants) == 8
    assert variants[1].overrides == [("model.dropout", "0.0"), ("seed", "1"),
                                     ("model.qkv_bias", "False")]
    assert variants[1].name == "dropout=0.0__seed=1__qkv_bias=False"
    assert sweep.plan([], [""]) == [("baseline", [])]


def test_a_label_names_a_variant():
    variants = sweep.plan([], ["modern: model.norm=rmsnorm model.qk_norm=True",
                               "optimizer=muon learning_rate=4e-3",
                               "lr=2e-3: learning_rate=2e-3", "init_from=hf:gpt2"])
    assert variants == [("modern", [("model.norm", "rmsnorm"), ("model.qk_norm", "True")]),
                        ("optimizer=muon__learning_rate=4e-3",
                         [("optimizer", "muon"), ("learning_rate", "4e-3")]),
                        ("lr=2e-3", [("learning_rate", "2e-3")]),
                        ("init_from=hf:gpt2", [("init_from", "hf:gpt2")])]
    crossed = sweep.plan(["learning_rate=1e-3,2e-3"], ["modern: model.norm=rmsnorm"])
    assert [v.name for v in crossed] == ["learning_rate=1e-3__modern", "learning_rate=2e-3__modern"]
    with pytest.raises(UserError, match="variant label 'a/b' is not a directory name"):
        sweep.plan([], ["a/b: model.norm=rmsnorm"])


def test_overrides_are_typed_and_checked():
    config = sweep.load_config("configs/shakespeare_cpu.py")
    sweep.apply_override(config, "model.dropout", "0.2")
    sweep.apply_override(config, "model.tie_embeddings", "false")
    sweep.apply_override(config, "max_steps", "1000")
    assert (config.model.dropout, config.model.tie_embeddings, config.max_steps) == (
        0.2, False, 1000)
    with pytest.raises(UserError, match="unknown field 'model.n_lyer'"):
        sweep.apply_override(config, "model.n_lyer", "2")
    with pytest.raises(UserError, match="expected a int"):
        sweep.apply_override(config, "max_steps", "many")
    # Fields whose default is None (the source's choice) take their declared type.
    sweep.apply_override(config, "model.embed_scale", "2")
    sweep.apply_override(config, "model.final_norm", "false")
    assert (config.model.embed_scale, config.model.final_norm) == (2.0, False)


def test_planned_runs_type_placeholder_fields_of_every_variant(tmp_path):
    args = argparse.Namespace(config="configs/shakespeare_cpu.py", set=[], grid=[], seeds=2,
                              vmap_seeds=True, out=str(tmp_path),
                              variant=["model.n_kv_head=2 model.mlp_hidden=96"])
    (_, joint, seeds), = sweep.planned_runs(args)
    assert [(c.model.n_kv_head, c.model.mlp_hidden) for c in (joint, *seeds)] == [(2, 96)] * 3


def test_sweep_runs_skips_finished_and_reports(tmp_path):
    out = tmp_path / "sweep"
    args = ["-m", "gpt_jax.sweep", "--config", "configs/shakespeare_cpu.py", *TINY,
            "--variant=", "--variant=model.tie_embeddings=False", "--seeds", "2", "--out", out,
            "--vmap_seeds"]
    first = run_cli(*args, timeout=600)
    assert first.returncode == 0, first.stderr + first.stdout
    assert "sweep: 4 runs (2 variants x 2 seeds, seeds in one vmapped step)" in first.stdout
    runs = sorted(p.relative_to(out).as_posix() for p in out.glob("*/seed_*"))
    assert runs == ["baseline/seed_1337", "baseline/seed_1338",
                    "tie_embeddings=False/seed_1337", "tie_embeddings=False/seed_1338"]
    saved = json.loads((out / "tie_embeddings=False" / "seed_1338" / "config.json").read_text())
    assert saved["model"]["tie_embeddings"] is False and saved["seed"] == 1338

    again = run_cli(*args, timeout=600)
    assert again.returncode == 0 and again.stdout.count("finished before, skipped") == 2

    report = run_cli("-m", "gpt_jax.report", *sorted(out.glob("*/seed_*")), "--out",
                     out / "report")
    assert report.returncode == 0, report.stderr
    table = (out / "report" / "table.md").read_text()
    rows = [line for line in table.splitlines()
            if line.startswith(("| baseline", "| tie_embeddings"))]
    assert len(rows) == 2
    cells = [c.strip() for c in rows[1].split("|")]
    # 1-layer, 32-wide, vocab 65: an untied head adds 65 x 32 parameters.
    assert cells[2] == f"{_tied_params() + 65 * 32:,}" and cells[-2] == "10"
    png = (out / "report" / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def _tied_params() -> int:
    from gpt_jax.model import GPTConfig, count_params

    return count_params(GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=32,
                                  bias=False))["total"]


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path):
    result = run_cli("-m", "gpt_jax.report", tmp_path, "--out", tmp_path / "r")
    assert result.returncode == 2 and "is not a run directory" in result.stderr
    assert "Traceback" not in result.stderr
