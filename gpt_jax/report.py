"""Compares training runs: a markdown table, with significance, and a plot of their loss curves.

    python -m gpt_jax.report sweeps/pos_norm/*/seed_* --out sweeps/pos_norm/report [--alpha 0.05]

Writes OUT/table.md, OUT/loss.png and OUT/runs.json. Run directories named seed_N under a
common parent are seeds of one variant (the parent's name); any other run directory is its own
variant. The variant named "baseline" (else the first one; --baseline NAME picks another) is
the reference.

The table has one row per variant: parameters; the final val loss (the last evaluation's) as
the mean over seeds ± the half-width of its Student t confidence interval (mean ± t·s/√n,
n − 1 degrees of freedom); the final val bpb alike when the runs log it; the difference of
mean final val loss to the baseline ± the half-width of Welch's interval (Welch–Satterthwaite
degrees of freedom); the two-sided p-value of Welch's t-test on the seeds' final val losses
(scipy.stats.ttest_ind, equal_var=False); the verdict; tokens/s, wall time and steps.

Significance: a difference is significant when p < α, two-sided, α = 0.05 unless --alpha says
otherwise; the intervals are at the matching level, 1 − α (95% by default), so a difference is
significant exactly when its interval leaves out zero. Only val loss is tested; val bpb is
shown beside it. At α = 0.05 one comparison in twenty comes out significant by chance when
nothing differs: a table of 9 variants makes 8 comparisons, and at least one of them is
flagged by luck alone with probability 1 − 0.95⁸ ≈ 34%. So the verdict also says when a
difference does not survive the Holm–Bonferroni correction for all the table's comparisons.
One seed, of the variant or of the baseline, gives no interval and no test: those cells say
"n/a (1 seed)".

OUT/loss.png plots train and val loss against step, one colour per variant, the seeds' range as
a band; OUT/runs.json lists each variant's run directories.
"""

import json
import math
import re
import statistics
import sys
from pathlib import Path

import numpy as np
from scipy import stats

from gpt_jax import entry, metrics
from gpt_jax.errors import UserError

BASELINE = "baseline"
ALPHA = 0.05
ONE_SEED = "n/a (1 seed)"


def group_runs(run_dirs: list[Path]) -> dict[str, list[Path]]:
    """Returns {variant: [run dirs]} in first-seen order; seed_N dirs group under their parent."""
    groups: dict[str, list[Path]] = {}
    for run in run_dirs:
        if not (run / "metrics.jsonl").is_file():
            raise UserError(f"{run} is not a run directory (no metrics.jsonl): pass the "
                            "out_dir of training runs")
        name = run.parent.name if re.fullmatch(r"seed_\d+", run.name) else run.name
        groups.setdefault(name, []).append(run)
    return groups


def mean_ci(values: list[float], alpha: float = ALPHA) -> tuple[float, float | None]:
    """Returns (mean, half-width of its 1 − alpha Student t interval); None for one value."""
    mean = statistics.fmean(values)
    n = len(values)
    if n < 2:
        return mean, None
    return mean, stats.t.ppf(1 - alpha / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)


def welch(variant: list[float], baseline: list[float],
          alpha: float = ALPHA) -> tuple[float, float | None, float | None]:
    """Returns (difference of means, half-width of Welch's 1 − alpha interval, two-sided p).

    The interval uses the Welch–Satterthwaite degrees of freedom; p is Welch's t-test
    (scipy.stats.ttest_ind with equal_var=False). With one value on either side, or no
    spread on both, there is no interval and no p: both are None.
    """
    delta = statistics.fmean(variant) - statistics.fmean(baseline)
    if min(len(variant), len(baseline)) < 2:
        return delta, None, None
    se2_v = statistics.variance(variant) / len(variant)
    se2_b = statistics.variance(baseline) / len(baseline)
    if se2_v + se2_b == 0:
        return delta, None, None
    df = (se2_v + se2_b) ** 2 / (se2_v**2 / (len(variant) - 1) + se2_b**2 / (len(baseline) - 1))
    half = stats.t.ppf(1 - alpha / 2, df) * math.sqrt(se2_v + se2_b)
    p = stats.ttest_ind(variant, baseline, equal_var=False).pvalue
    return delta, half, float(p)


def holm(p_values: list[float], alpha: float) -> list[bool]:
    """Returns, for each p-value, whether it is significant after Holm–Bonferroni at alpha.

    The k-th smallest of m p-values passes when it is below alpha / (m − k + 1) and every
    smaller one passed; this keeps the chance of any false alarm among the m below alpha.
    """
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    passed = [False] * len(p_values)
    for k, i in enumerate(order):
        if p_values[i] >= alpha / (len(p_values) - k):
            break
        passed[i] = True
    return passed


def _params(run: Path) -> int | None:
    """Returns the parameter count of a run's model, from its newest checkpoint's config."""
    from gpt_jax import checkpoint, tokenization
    from gpt_jax.model import GPTConfig, count_params, saved_model_fields

    if not checkpoint.has_checkpoint(run):
        return None
    manager = checkpoint.open_for_reading(run)
    saved, tokenizer = checkpoint.read_metadata(manager, manager.latest_step())
    manager.close()
    vocab = tokenization.tokenizer_from_json(tokenizer).vocab_size
    return count_params(GPTConfig(vocab_size=vocab, **saved_model_fields(saved["model"])))["total"]


def summarize(name: str, runs: list[Path]) -> dict:
    """Returns one variant's row: final val loss (and val bpb) per seed, speed, time, steps."""
    finals, bpbs, speeds, times, steps = [], [], [], [], []
    for run in runs:
        records = metrics.read_records(run)
        evals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
        if not evals:
            raise UserError(f"{run} has no val_loss yet: let it reach its first eval")
        finals.append(evals[-1])
        bpb = [r["val_bpb"] for r in records if r.get("val_bpb") is not None]
        if bpb:
            bpbs.append(bpb[-1])
        timed = [r["tokens_per_sec"] for r in records if r.get("tokens_per_sec")]
        speeds.append(statistics.median(timed) if timed else float("nan"))
        times.append(max((r.get("elapsed_s", 0.0) for r in records), default=0.0))
        steps.append(records[-1]["step"])
    return {"variant": name, "seeds": len(runs), "params": _params(runs[0]), "finals": finals,
            # val bpb only when every seed logged it, so that its mean is over the same seeds
            "bpbs": bpbs if len(bpbs) == len(runs) else None,
            "tokens_per_sec": statistics.fmean(speeds), "wall_s": statistics.fmean(times),
            "steps": max(steps)}


def _with_ci(mean: float, half: float | None, sign: str = "") -> str:
    return f"{mean:{sign}.4f} ± " + (ONE_SEED if half is None else f"{half:.4f}")


def _p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def table(rows: list[dict], alpha: float = ALPHA, baseline: str = BASELINE) -> str:
    """Returns the markdown table: each variant's mean ± CI and its difference to the baseline,
    Welch's p-value and whether that difference is significant at alpha (and after Holm)."""
    base = next((r for r in rows if r["variant"] == baseline), rows[0])
    level = f"{100 * (1 - alpha):g}% CI"
    with_bpb = any(r["bpbs"] for r in rows)
    tests = {r["variant"]: welch(r["finals"], base["finals"], alpha) for r in rows if r is not base}
    tested = [name for name, (_, _, p) in tests.items() if p is not None]
    holm_ok = dict(zip(tested, holm([tests[n][2] for n in tested], alpha), strict=True))

    header = ["variant", "params", f"final val loss (mean ± {level})"]
    header += [f"final val bpb (mean ± {level})"] if with_bpb else []
    header += [f"Δ final vs {base['variant']} (± {level})", "p (Welch)",
               f"significant (α = {alpha:g})", "tokens/s", "wall time", "steps"]
    align = ["---", "---:", "---:"] + (["---:"] if with_bpb else []) + [
        "---:", "---:", "---", "---:", "---:", "---:"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for r in rows:
        cells = [r["variant"], f"{r['params']:,}" if r["params"] else "?",
                 _with_ci(*mean_ci(r["finals"], alpha))]
        if with_bpb:
            cells.append(_with_ci(*mean_ci(r["bpbs"], alpha)) if r["bpbs"] else "—")
        if r is base:
            cells += ["—", "—", "—"]
        else:
            delta, half, p = tests[r["variant"]]
            if p is None:
                why = ONE_SEED if min(r["seeds"], base["seeds"]) < 2 else "n/a (no spread)"
                cells += [f"{delta:+.4f} ± {why}", why, why]
            else:
                verdict = "no" if p >= alpha else (
                    "yes" if holm_ok[r["variant"]] else "yes (not after Holm)")
                cells += [_with_ci(delta, half, "+"), _p(p), verdict]
        cells += [f"{r['tokens_per_sec']:,.0f}", f"{r['wall_s']:.0f} s", str(r["steps"])]
        lines.append("| " + " | ".join(cells) + " |")

    seeds = "/".join(map(str, sorted({r["seeds"] for r in rows})))
    notes = [
        (f"Mean ± half-width of the {level} over {seeds} seed(s) (Student t, n − 1 degrees of "
         "freedom); final = the last evaluation."),
        (f"Δ: difference of mean final val loss to {base['variant']}, ± the half-width of "
         f"Welch's {level} (Welch–Satterthwaite degrees of freedom). p: Welch's two-sided "
         "t-test on the seeds' final val loss (val bpb is not tested)."),
        (f"Significant at α = {alpha:g} two-sided: p < α, which is when Δ's interval leaves "
         f"out zero. When nothing differs, one comparison in {1 / alpha:.0f} is significant by "
         "chance.")]
    if len(tested) > 1:
        notes.append(
            f"With {len(tested)} comparisons here, at least one such false alarm has probability "
            f"{1 - (1 - alpha) ** len(tested):.0%}; \"not after Holm\": not significant once "
            f"Holm–Bonferroni corrects for all {len(tested)}.")
    if min(r["seeds"] for r in rows) < 2:
        notes.append(f"{ONE_SEED}: one seed, on either side, gives no interval and no test.")
    notes.append("tokens/s is the median over logged steps; wall time is the training loop's "
                 "(start-up and compile excluded).")
    lines += ["", " ".join(notes)]
    return "\n".join(lines) + "\n"


def plot(groups: dict[str, list[Path]], path: Path) -> None:
    """Writes the train and val loss curves: one colour per variant, seeds as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    colours = plt.get_cmap("tab10")
    for i, (name, runs) in enumerate(groups.items()):
        for ax, key in zip(axes, ("train_loss", "val_loss"), strict=True):
            curves = []
            for run in runs:
                records = [r for r in metrics.read_records(run) if r.get(key) is not None]
                curves.append({r["step"]: r[key] for r in records})
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            values = np.array([[c[s] for s in steps] for c in curves])
            ax.plot(steps, values.mean(axis=0), color=colours(i % 10), label=name, lw=1.4)
            if len(runs) > 1:
                ax.fill_between(steps, values.min(axis=0), values.max(axis=0),
                                color=colours(i % 10), alpha=0.2, lw=0)
    for ax, title in zip(axes, ("train loss", "val loss"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cross-entropy")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(run_dirs: list[Path], out: Path, alpha: float = ALPHA,
           baseline: str = BASELINE) -> None:
    """Writes the table, the plot and runs.json of run_dirs under out, and prints the table."""
    groups = group_runs(run_dirs)
    if baseline != BASELINE and baseline not in groups:
        raise UserError(f"--baseline {baseline} is not among the runs' variants: use one of "
                        f"{', '.join(groups)}")
    if baseline in groups:  # the reference row and colour come first
        groups = {baseline: groups.pop(baseline), **groups}
    rows = [summarize(name, runs) for name, runs in groups.items()]
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table(rows, alpha, baseline))
    plot(groups, out / "loss.png")
    (out / "runs.json").write_text(json.dumps(
        {name: [str(r) for r in runs] for name, runs in groups.items()}, indent=1) + "\n")
    print((out / "table.md").read_text())
    print(f"wrote {out / 'table.md'} and {out / 'loss.png'}")


def main(argv: list[str]) -> None:
    p = entry.ArgumentParser(command="python -m gpt_jax.report", description=__doc__)
    p.add_argument("runs", nargs="+", help="run directories (out_dirs)")
    p.add_argument("--out", required=True, help="directory for table.md and loss.png")
    p.add_argument("--alpha", type=float, default=ALPHA,
                   help="two-sided significance level; the intervals are at 1 - alpha "
                        "(default: %(default)s)")
    p.add_argument("--baseline", default=BASELINE,
                   help="the reference variant (default: %(default)s, else the first)")
    args = p.parse_args(argv)
    if not 0 < args.alpha < 1:
        p.error(f"--alpha must lie between 0 and 1, got {args.alpha}")
    entry.main(lambda: report([Path(r) for r in args.runs], Path(args.out), args.alpha,
                              args.baseline))


if __name__ == "__main__":
    main(sys.argv[1:])
