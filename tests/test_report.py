"""The report: intervals over seeds, Welch's test against the baseline, the table's cells.

Expected numbers are worked out here by hand (textbook formulas, t-table quantiles), not by
calling the report's own statistics.
"""

import json
import math

import pytest
from scipy import stats

from gpt_jax import report
from gpt_jax.errors import UserError

T_975_DF2 = 4.302652729749462  # t_{0.975, 2}: the t table's 4.303
T_975_DF4 = 2.7764451051977934  # t_{0.975, 4}: the t table's 2.776


def _run(path, final, bpb=None):
    """Writes a fake run directory: two evaluations, the last one's val loss `final`."""
    path.mkdir(parents=True)
    records = [{"step": 50, "train_loss": final + 0.5, "val_loss": final + 0.3, "lr": 1e-3},
               {"step": 100, "train_loss": final + 0.1, "val_loss": final, "lr": 1e-4}]
    if bpb is not None:
        records[0]["val_bpb"], records[1]["val_bpb"] = bpb + 0.4, bpb
    timing = [{"step": 50, "tokens_per_sec": 1000.0, "elapsed_s": 5.0},
              {"step": 100, "tokens_per_sec": 1200.0, "elapsed_s": 10.0}]
    for name, lines in (("metrics.jsonl", records), ("timing.jsonl", timing)):
        (path / name).write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def _variant(root, name, finals, bpbs=None):
    """Returns the seed_N run directories of one fake variant."""
    bpbs = bpbs or [None] * len(finals)
    return [_run(root / name / f"seed_{i}", f, b) for i, (f, b) in enumerate(zip(finals, bpbs))]


def _rows(root, variants: dict) -> list[dict]:
    runs = [r for name, finals in variants.items() for r in _variant(root, name, *finals)]
    return [report.summarize(name, group) for name, group in report.group_runs(runs).items()]


def _cells(table: str) -> dict[str, dict[str, str]]:
    """Returns {variant: {column header: cell}} from the markdown table."""
    lines = [line for line in table.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return {row[0]: dict(zip(header, row, strict=True)) for row in rows}


def test_mean_ci_is_students_t_interval():
    mean, half = report.mean_ci([2.0, 2.1, 2.2])
    # s = 0.1 over three seeds: t_{0.975,2} * 0.1 / sqrt(3).
    assert mean == pytest.approx(2.1)
    assert half == pytest.approx(T_975_DF2 * 0.1 / math.sqrt(3), rel=1e-9)
    assert round(half, 4) == 0.2484
    assert report.mean_ci([2.0]) == (2.0, None)  # one seed: no interval


def test_welch_interval_and_p_for_equal_spreads():
    delta, half, p = report.welch([2.0, 2.1, 2.2], [2.3, 2.4, 2.5])
    # Equal variances (0.01) and sizes (3): Welch-Satterthwaite gives df = 4 exactly.
    se = math.sqrt(0.01 / 3 + 0.01 / 3)
    assert delta == pytest.approx(-0.3)
    assert half == pytest.approx(T_975_DF4 * se, rel=1e-9)
    # Two-sided p from the closed-form t CDF for 4 degrees of freedom.
    t = abs(delta) / se
    x = t * t
    cdf = 0.5 + 3 / 8 * t / math.sqrt(1 + x / 4) * (1 - x / (12 * (1 + x / 4)))
    assert p == pytest.approx(2 * (1 - cdf), rel=1e-9)
    assert p == pytest.approx(stats.ttest_ind([2.0, 2.1, 2.2], [2.3, 2.4, 2.5],
                                              equal_var=False).pvalue, rel=1e-12)


def test_welch_uses_welch_satterthwaite_degrees_of_freedom():
    a, b = [2.1, 2.2, 2.4, 2.7], [2.3, 2.4, 2.5]
    delta, half, p = report.welch(a, b)
    mean_a, mean_b = sum(a) / 4, sum(b) / 3
    var_a = sum((v - mean_a) ** 2 for v in a) / 3
    var_b = sum((v - mean_b) ** 2 for v in b) / 2
    se2 = var_a / 4 + var_b / 3
    df = se2**2 / ((var_a / 4) ** 2 / 3 + (var_b / 3) ** 2 / 2)
    assert 3 < df < 5  # not the pooled test's 5
    assert delta == pytest.approx(mean_a - mean_b)
    assert half == pytest.approx(stats.t.ppf(0.975, df) * math.sqrt(se2), rel=1e-9)
    assert p == pytest.approx(2 * stats.t.sf(abs(delta) / math.sqrt(se2), df), rel=1e-9)
    assert p == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-12)


def test_welch_with_one_seed_on_either_side_gives_no_interval():
    assert report.welch([2.0], [2.3, 2.4, 2.5]) == (pytest.approx(-0.4), None, None)
    assert report.welch([2.0, 2.1], [2.3]) == (pytest.approx(-0.25), None, None)


def test_holm_steps_down_through_sorted_p_values():
    # Sorted: 0.01 <= 0.05/3 passes; 0.03 > 0.05/2 fails, and so does everything after it.
    assert report.holm([0.04, 0.01, 0.03], 0.05) == [False, True, False]
    # 0.01 <= 0.05/3, 0.02 <= 0.05/2, 0.04 <= 0.05/1: all pass.
    assert report.holm([0.04, 0.01, 0.02], 0.05) == [True, True, True]
    assert report.holm([], 0.05) == []


def test_table_cells(tmp_path):
    rows = _rows(tmp_path, {"baseline": ([2.3, 2.4, 2.5],), "relu": ([2.0, 2.1, 2.2],),
                            "wide": ([2.35, 2.45, 2.55],)})
    text = report.table(rows)
    cells = _cells(text)
    assert list(cells) == ["baseline", "relu", "wide"]
    relu = cells["relu"]
    assert relu["final val loss (mean ± 95% CI)"] == "2.1000 ± 0.2484"
    half = T_975_DF4 * math.sqrt(0.01 / 3 + 0.01 / 3)
    assert relu["Δ final vs baseline (± 95% CI)"] == f"-0.3000 ± {half:.4f}"
    assert relu["p (Welch)"] == "0.021"
    # Two comparisons: relu's p = 0.021 passes Holm's 0.05/2 = 0.025 too.
    assert relu["significant (α = 0.05)"] == "yes"
    wide_p = stats.ttest_ind([2.35, 2.45, 2.55], [2.3, 2.4, 2.5], equal_var=False).pvalue
    assert cells["wide"]["p (Welch)"] == f"{wide_p:.3f}"
    assert cells["wide"]["significant (α = 0.05)"] == "no"
    assert cells["baseline"]["Δ final vs baseline (± 95% CI)"] == "—"
    assert (relu["params"], relu["tokens/s"], relu["wall time"], relu["steps"]) == (
        "?", "1,100", "10 s", "100")
    assert "final val bpb" not in text  # no run logged it
    assert "α = 0.05 two-sided" in text and "one comparison in 20" in text and "Holm" in text
    assert "final val loss" in text.split("\n\n")[1]  # the footnote names what is tested


def test_alpha_sets_the_level_of_intervals_and_verdicts(tmp_path):
    rows = _rows(tmp_path, {"baseline": ([2.3, 2.4, 2.5],), "relu": ([2.0, 2.1, 2.2],)})
    relu = _cells(report.table(rows, alpha=0.01))["relu"]
    assert relu["final val loss (mean ± 99% CI)"] == (
        f"2.1000 ± {stats.t.ppf(0.995, 2) * 0.1 / math.sqrt(3):.4f}")
    assert relu["significant (α = 0.01)"] == "no"  # p = 0.021


def test_holm_verdict_in_the_table(tmp_path):
    # Two variants whose p lies between 0.025 and 0.05: each passes alone, neither after Holm.
    base = [2.3, 2.4, 2.5]
    a, b = [2.06, 2.16, 2.26], [2.04, 2.14, 2.24]
    ps = [stats.ttest_ind(v, base, equal_var=False).pvalue for v in (a, b)]
    assert all(0.025 < p < 0.05 for p in ps)
    cells = _cells(report.table(_rows(tmp_path, {"baseline": (base,), "a": (a,), "b": (b,)})))
    assert cells["a"]["significant (α = 0.05)"] == "yes (not after Holm)"
    assert cells["b"]["significant (α = 0.05)"] == "yes (not after Holm)"


def test_one_seed_gives_no_interval(tmp_path):
    rows = _rows(tmp_path, {"baseline": ([2.3, 2.4, 2.5],), "relu": ([2.0],)})
    relu = _cells(report.table(rows))["relu"]
    assert relu["final val loss (mean ± 95% CI)"] == "2.0000 ± n/a (1 seed)"
    assert relu["Δ final vs baseline (± 95% CI)"] == "-0.4000 ± n/a (1 seed)"
    assert relu["p (Welch)"] == "n/a (1 seed)"
    assert relu["significant (α = 0.05)"] == "n/a (1 seed)"
    # A baseline of one seed leaves every comparison without an interval.
    rows = _rows(tmp_path / "single", {"baseline": ([2.3],), "relu": ([2.0, 2.1, 2.2],)})
    cells = _cells(report.table(rows))
    assert cells["relu"]["final val loss (mean ± 95% CI)"] == "2.1000 ± 0.2484"
    assert cells["baseline"]["final val loss (mean ± 95% CI)"] == "2.3000 ± n/a (1 seed)"
    assert cells["relu"]["Δ final vs baseline (± 95% CI)"] == "-0.2000 ± n/a (1 seed)"
    assert cells["relu"]["p (Welch)"] == "n/a (1 seed)"


def test_val_bpb_column_when_runs_log_it(tmp_path):
    rows = _rows(tmp_path, {"baseline": ([2.3, 2.4, 2.5], [3.3, 3.4, 3.5]),
                            "relu": ([2.0, 2.1, 2.2], [3.0, 3.2, 3.4]), "old": ([2.4, 2.5],)})
    cells = _cells(report.table(rows))
    column = "final val bpb (mean ± 95% CI)"
    assert cells["baseline"][column] == "3.4000 ± 0.2484"
    assert cells["relu"][column] == f"3.2000 ± {T_975_DF2 * 0.2 / math.sqrt(3):.4f}"
    assert cells["old"][column] == "—"  # logged before val bpb existed
    # The test stays on val loss.
    assert cells["relu"]["Δ final vs baseline (± 95% CI)"].startswith("-0.3000 ± ")


def test_report_writes_table_plot_and_runs_with_alpha_flag(tmp_path, capsys):
    runs = _variant(tmp_path, "baseline", [2.3, 2.4, 2.5]) + _variant(tmp_path, "relu",
                                                                     [2.0, 2.1, 2.2])
    out = tmp_path / "report"
    report.main([*map(str, runs), "--out", str(out), "--alpha", "0.01"])
    cells = _cells((out / "table.md").read_text())
    assert cells["relu"]["significant (α = 0.01)"] == "no"
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((out / "runs.json").read_text())["relu"] == list(map(str, runs[3:]))
    assert "significant (α = 0.01)" in capsys.readouterr().out


@pytest.mark.parametrize("alpha", ["0", "1", "-0.1"])
def test_alpha_outside_0_1_is_refused(tmp_path, alpha, capsys):
    runs = _variant(tmp_path, "baseline", [2.3, 2.4])
    with pytest.raises(SystemExit) as stop:
        report.main([*map(str, runs), "--out", str(tmp_path / "r"), "--alpha", alpha])
    assert stop.value.code == 2 and "--alpha" in capsys.readouterr().err


def test_summarize_refuses_a_run_without_evaluations(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 5, "train_loss": 3.0}) + "\n")
    with pytest.raises(UserError, match="no val_loss yet"):
        report.summarize("run", [run])


def test_baseline_flag_picks_the_reference(tmp_path, capsys):
    runs = (_variant(tmp_path, "baseline", [2.3, 2.4, 2.5])
            + _variant(tmp_path, "lr=4e-3", [2.0, 2.1, 2.2])
            + _variant(tmp_path, "relu", [2.0, 2.1, 2.2]))
    out = tmp_path / "report"
    report.main([*map(str, runs), "--out", str(out), "--baseline", "lr=4e-3"])
    cells = _cells((out / "table.md").read_text())
    assert list(cells)[0] == "lr=4e-3" and cells["lr=4e-3"]["p (Welch)"] == "—"
    assert cells["relu"]["p (Welch)"] == "1.000" and cells["baseline"]["p (Welch)"] != "—"
    with pytest.raises(SystemExit) as stop:
        report.main([*map(str, runs), "--out", str(out), "--baseline", "nope"])
    assert stop.value.code == 2
    assert "--baseline nope is not among the runs' variants" in capsys.readouterr().err
