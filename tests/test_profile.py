"""profile_steps: a jax.profiler trace of chosen steps, the run's numbers unchanged."""

import gzip

import pytest

from gpt_jax import config as config_lib
from gpt_jax import profile, trainer
from gpt_jax.errors import UserError


def test_a_profiled_run_writes_a_trace_naming_the_step_and_trains_alike(tiny_config, tmp_path,
                                                                           capsys):
    runs = {}
    for spec in ("", "2:4"):
        config = tiny_config.copy_and_resolve_references()
        config.out_dir, config.profile_steps, config.max_steps = (
            str(tmp_path / f"run{spec.replace(':', '_')}"), spec, 6)
        trainer.run(config)
        runs[spec] = tmp_path / f"run{spec.replace(':', '_')}"
    assert (runs[""] / "metrics.jsonl").read_bytes() == (
        runs["2:4"] / "metrics.jsonl").read_bytes()
    assert not (runs[""] / "profile").exists()
    traces = list((runs["2:4"] / "profile").rglob("*.xplane.pb"))
    assert traces, "no trace written"
    assert any(profile.STEP_NAME.encode() in t.read_bytes() for t in traces)
    for trace in (runs["2:4"] / "profile").rglob("*.trace.json.gz"):
        assert profile.STEP_NAME.encode() in gzip.decompress(trace.read_bytes())
    assert "profile of steps 3-4 written to" in capsys.readouterr().out


@pytest.mark.parametrize("spec, message", [
    ("10", "profile_steps='10' is not A:B"),
    ("a:b", "profile_steps='a:b' is not A:B"),
    ("5:5", "profile_steps='5:5' traces no step: A must be below B"),
    ("-1:3", "profile_steps='-1:3' is not A:B"),
    ("3:30", "profile_steps='3:30' ends after max_steps=20: choose B <= 20"),
])
def test_a_bad_profile_steps_is_one_line_naming_it(tiny_config, spec, message):
    tiny_config.profile_steps = spec
    with pytest.raises(UserError) as err:
        config_lib.validate(tiny_config)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
