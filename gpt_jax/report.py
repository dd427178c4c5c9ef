"""Compares training runs: a markdown table and a plot of their loss curves.

    python -m gpt_jax.report sweeps/pos_norm/*/seed_* --out sweeps/pos_norm/report

Writes OUT/table.md (one row per variant: parameters, final and best val loss as mean ± std
over seeds, tokens/s, wall time, steps, and the difference to the baseline flagged when it is
within the seed spread) and OUT/loss.png (train and val loss against step, one colour per
variant, the seeds' range as a band). Run directories named seed_N under a common parent are
seeds of one variant (the parent's name); any other run directory is its own variant.
"""

import json
import re
import statistics
import sys
from pathlib import Path

import numpy as np

from gpt_jax import entry, metrics
from gpt_jax.errors import UserError

BASELINE = "baseline"


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


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _params(run: Path) -> int | None:
    """Returns the parameter count of a run's model, from its newest checkpoint's config."""
    from gpt_jax import checkpoint, data
    from gpt_jax.model import GPTConfig, count_params, saved_model_fields

    if not checkpoint.has_checkpoint(run):
        return None
    manager = checkpoint.open_for_reading(run)
    saved, tokenizer = checkpoint.read_metadata(manager, manager.latest_step())
    manager.close()
    vocab = data.tokenizer_from_json(tokenizer).vocab_size
    return count_params(GPTConfig(vocab_size=vocab, **saved_model_fields(saved["model"])))["total"]


def summarize(name: str, runs: list[Path]) -> dict:
    """Returns one variant's row: losses over seeds, speed, time, steps."""
    finals, bests, speeds, times, steps = [], [], [], [], []
    for run in runs:
        records = metrics.read_records(run)
        evals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
        if not evals:
            raise UserError(f"{run} has no val_loss yet: let it reach its first eval")
        finals.append(evals[-1])
        bests.append(min(evals))
        timed = [r["tokens_per_sec"] for r in records if r.get("tokens_per_sec")]
        speeds.append(statistics.median(timed) if timed else float("nan"))
        times.append(max((r.get("elapsed_s", 0.0) for r in records), default=0.0))
        steps.append(records[-1]["step"])
    return {"variant": name, "seeds": len(runs), "params": _params(runs[0]),
            "final": _mean_std(finals), "best": _mean_std(bests), "finals": finals,
            "tokens_per_sec": statistics.fmean(speeds), "wall_s": statistics.fmean(times),
            "steps": max(steps)}


def table(rows: list[dict]) -> str:
    """Returns the markdown table; differences to the baseline inside the seed spread are
    marked as noise (|Δ| < the larger of the two variants' std over seeds, or 0.01 with one
    seed)."""
    base = next((r for r in rows if r["variant"] == BASELINE), rows[0])
    lines = [("| variant | params | final val loss | best val loss | Δ final vs "
             f"{base['variant']} | tokens/s | wall time | steps |"),
             "|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        delta = r["final"][0] - base["final"][0]
        spread = max(r["final"][1], base["final"][1]) if r["seeds"] > 1 else 0.01
        if r is base:
            verdict = "—"
        else:
            verdict = f"{delta:+.4f}" + (" (within seed spread)" if abs(delta) < spread else "")
        params = f"{r['params']:,}" if r["params"] else "?"
        lines.append(
            f"| {r['variant']} | {params} | {r['final'][0]:.4f} ± {r['final'][1]:.4f} | "
            f"{r['best'][0]:.4f} ± {r['best'][1]:.4f} | {verdict} | {r['tokens_per_sec']:,.0f} "
            f"| {r['wall_s']:.0f} s | {r['steps']} |")
    seeds = sorted({r["seeds"] for r in rows})
    lines.append("")
    lines.append(f"Mean ± std over {'/'.join(map(str, seeds))} seed(s); final = the last "
                 "evaluation. tokens/s is the median over logged steps; wall time is the "
                 "training loop's (start-up and compile excluded).")
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


def report(run_dirs: list[Path], out: Path) -> None:
    """Writes the table, the plot and runs.json of run_dirs under out, and prints the table."""
    groups = group_runs(run_dirs)
    if BASELINE in groups:  # the reference row and colour come first
        groups = {BASELINE: groups.pop(BASELINE), **groups}
    rows = [summarize(name, runs) for name, runs in groups.items()]
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table(rows))
    plot(groups, out / "loss.png")
    (out / "runs.json").write_text(json.dumps(
        {name: [str(r) for r in runs] for name, runs in groups.items()}, indent=1) + "\n")
    print((out / "table.md").read_text())
    print(f"wrote {out / 'table.md'} and {out / 'loss.png'}")


def main(argv: list[str]) -> None:
    p = entry.ArgumentParser(command="python -m gpt_jax.report", description=__doc__)
    p.add_argument("runs", nargs="+", help="run directories (out_dirs)")
    p.add_argument("--out", required=True, help="directory for table.md and loss.png")
    args = p.parse_args(argv)
    entry.main(lambda: report([Path(r) for r in args.runs], Path(args.out)))


if __name__ == "__main__":
    main(sys.argv[1:])
