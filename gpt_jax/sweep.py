"""Runs an ablation: every variant of a config, for several seeds, one run after another.

    python -m gpt_jax.sweep --config configs/shakespeare_cpu.py \\
        --grid model.pos_encoding=learned,sinusoidal --grid model.norm_position=pre,post \\
        --seeds 2 --set max_steps=1000 --out sweeps/pos_norm

Variants are the product of the --grid options, or the list given by repeated --variant
options ("model.activation=relu model.dropout=0.2"; "" is the config as it is), or both (the
grid is crossed with the list). A variant is named by its overrides (activation=relu__dropout=
0.2, or baseline), or by a label before a colon: "modern: model.norm=rmsnorm model.qk_norm=True".
--set applies to every run. Each run has its own out_dir, OUT/<variant>/seed_<seed>/, holding
its resolved config (config.json) next to the usual checkpoints and metrics; re-running the
same command skips finished runs and resumes unfinished ones. Runs go one at a time (one
accelerator, one run), each in a fresh `python train.py` process. Afterwards:
python -m gpt_jax.report OUT/*/seed_* --out OUT/report
"""

import copy
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import ml_collections

from gpt_jax import config as config_lib
from gpt_jax import entry
from gpt_jax.errors import UserError, exit_with

REPO = Path(__file__).resolve().parents[1]


def parse_override(text: str) -> tuple[str, str]:
    """Returns (field, value) of `field=value`."""
    field, sep, value = text.partition("=")
    if not sep or not field:
        raise UserError(f"{text!r} is not FIELD=VALUE (e.g. model.dropout=0.2)")
    return field.strip(), value.strip()


def apply_override(config: ml_collections.ConfigDict, field: str, value: str) -> None:
    """Sets config.<field> from its text, typed like the field's default; names bad fields."""
    *parents, leaf = field.split(".")
    holder = config
    for name in parents:
        if name not in holder or not isinstance(holder[name], ml_collections.ConfigDict):
            raise UserError(f"unknown field {field!r}: see gpt_jax/config.py for the fields")
        holder = holder[name]
    if leaf not in holder:
        raise UserError(f"unknown field {field!r}: see gpt_jax/config.py for the fields")
    default = holder[leaf]
    if default is None:  # a placeholder (None: the source's choice): typed as declared
        if value.lower() == "none":
            holder[leaf] = None
            return
        default = holder.get_ref(leaf).get_type()()
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            typed = value.lower() in ("true", "1")
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            typed = type(default)(float(value)) if isinstance(default, float) else int(value)
        else:
            typed = value
    except ValueError:
        raise UserError(f"{field}={value!r}: expected a {type(default).__name__}") from None
    holder[leaf] = typed


class Variant(NamedTuple):
    name: str  # its directory under the sweep's out and its row in the report
    overrides: list[tuple[str, str]]  # (field, value) pairs


def variant_name(overrides: list[tuple[str, str]]) -> str:
    """Returns a directory name for a variant: `pos_encoding=sinusoidal__dropout=0.2`."""
    if not overrides:
        return "baseline"
    return "__".join(f"{field.split('.')[-1]}={value}" for field, value in overrides)


def parse_variant(text: str) -> tuple[str | None, list[tuple[str, str]]]:
    """Returns (label or None, overrides) of `[LABEL: ]FIELD=VALUE ...`: a label ends in a colon
    and a space (a value may hold a colon, as in init_from=hf:gpt2)."""
    label, sep, rest = text.strip().partition(": ")
    if not sep or " " in label.strip():
        return None, [parse_override(t) for t in text.split()]
    if not label.strip() or "/" in label:
        raise UserError(f"variant label {label!r} is not a directory name: use letters, "
                        "digits, '=', '-', '_' or '.' before the colon")
    return label.strip(), [parse_override(t) for t in rest.split()]


def plan(grid: list[str], variants: list[str]) -> list[Variant]:
    """Returns the list of variants: the grid's product crossed with the listed ones."""
    axes = []
    for option in grid:
        field, values = parse_override(option)
        axes.append([(field, v.strip()) for v in values.split(",") if v.strip()])
    listed = [parse_variant(v) for v in variants] or [(None, [])]
    planned = []
    for g in itertools.product(*axes):
        for label, overrides in listed:
            name = variant_name(list(g) + overrides) if label is None else (
                "__".join([variant_name(list(g))] * bool(g) + [label]))
            planned.append(Variant(name, list(g) + overrides))
    return planned


def load_config(path: str) -> ml_collections.ConfigDict:
    """Returns get_config() of a config file, the way train.py would load it."""
    import importlib.util

    file, _, arg = path.partition(":")
    if not Path(file).is_file():
        raise UserError(f"config file {file} does not exist: pick one of configs/*.py")
    sys.path.insert(0, str(Path(file).resolve().parents[1]))
    spec = importlib.util.spec_from_file_location("sweep_config", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def is_finished(out_dir: Path, max_steps: int) -> bool:
    return (out_dir / "checkpoints" / str(max_steps)).is_dir()


def planned_runs(args) -> list[tuple]:
    """Returns (variant name, config of the process, configs of its seeds) for each process."""
    if args.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {args.seeds}")
    base = load_config(args.config)
    common = [parse_override(t) for t in args.set]
    runs = []
    for name, overrides in plan(args.grid, args.variant):
        seeds = []
        for i in range(args.seeds):
            config = copy.deepcopy(base)  # keeps placeholders (n_kv_head: None) typed
            for field, value in common + overrides:
                apply_override(config, field, value)
            config.seed += i
            config.out_dir = str(Path(args.out) / name / f"seed_{config.seed}")
            config_lib.validate(config)
            seeds.append(config)
        if args.vmap_seeds:
            joint = copy.deepcopy(seeds[0])
            joint.vmap_seeds, joint.out_dir = args.seeds, str(Path(seeds[0].out_dir).parent)
            runs.append((name, joint, seeds))
        else:
            runs.extend((name, c, [c]) for c in seeds)
    return runs


def sweep(args) -> None:
    """Trains every run of the sweep that has not finished, one `train.py` process at a time."""
    runs = planned_runs(args)
    n_runs = sum(len(seeds) for _, _, seeds in runs)
    print(f"sweep: {n_runs} runs ({n_runs // args.seeds} variants x {args.seeds} seeds"
          f"{', seeds in one vmapped step' if args.vmap_seeds else ''}) into {args.out}",
          flush=True)
    t_start = time.perf_counter()
    for n, (name, config, seeds) in enumerate(runs, 1):
        label = (f"[{n}/{len(runs)}] {name} seed "
                 f"{'+'.join(str(c.seed) for c in seeds)}")
        if all(is_finished(Path(c.out_dir), c.max_steps) for c in seeds):
            print(f"{label}: finished before, skipped", flush=True)
            continue
        if args.dry_run:
            print(f"{label}: would run in {config.out_dir}", flush=True)
            continue
        for c in seeds:
            Path(c.out_dir).mkdir(parents=True, exist_ok=True)
            (Path(c.out_dir) / "config.json").write_text(json.dumps(c.to_dict(), indent=1) + "\n")
        # None is a placeholder's default, which a flag cannot spell: leave it unset.
        flags = [f"--config.{k}={v}" for k, v in _flatten(config.to_dict()).items()
                 if v is not None]
        t0 = time.perf_counter()
        log = Path(config.out_dir) / "train.log"
        with open(log, "a") as f:
            result = subprocess.run([sys.executable, str(REPO / "train.py"), "--config",
                                     args.config, *flags], stdout=f, stderr=subprocess.STDOUT,
                                    check=False)
        took, total = time.perf_counter() - t0, time.perf_counter() - t_start
        if result.returncode != 0:
            tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
            exit_with(UserError(f"{label} failed ({tail[0]}); its log is {log}; fix it and "
                                "run the same command to resume the sweep"), result.returncode)
        print(f"{label}: done in {took:.0f} s ({total / 60:.1f} min so far)", flush=True)
    print(f"sweep finished in {(time.perf_counter() - t_start) / 60:.1f} min: python -m "
          f"gpt_jax.report {args.out}/*/seed_* --out {args.out}/report", flush=True)


def main(argv: list[str]) -> None:
    p = entry.ArgumentParser(command="python -m gpt_jax.sweep", description=__doc__)
    p.add_argument("--config", required=True, help="config file, as for train.py")
    p.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2",
                   help="a field and its values; several --grid options make a product")
    p.add_argument("--variant", action="append", default=[], metavar="'F=V F=V'",
                   help="one variant as space-separated overrides ('' for the config itself), "
                        "optionally named: 'LABEL: F=V F=V'")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="an override for every run")
    p.add_argument("--seeds", type=int, default=1, help="seeds per variant: seed, seed+1, ...")
    p.add_argument("--vmap_seeds", action="store_true",
                   help="train a variant's seeds at once in one compiled step (jax.vmap)")
    p.add_argument("--out", required=True, help="sweep directory")
    p.add_argument("--dry_run", action="store_true", help="list the runs and stop")
    args = p.parse_args(argv)
    entry.main(lambda: sweep(args))


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


if __name__ == "__main__":
    main(sys.argv[1:])
