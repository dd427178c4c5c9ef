"""Training from a shard set larger than the memory the run may use: resident memory stays flat.

    python benchmarks/shard_memory.py                       # 4 GiB of shards, a 1.5 GiB limit
    python benchmarks/shard_memory.py --gib 8 --limit_mib 1024 --steps 400

Writes --gib GiB of GPT-2 ids (random documents of 1 to 2000 tokens, each ended by
<|endoftext|>) as llm.c shards of 100M tokens. Then, each in a memory cgroup whose limit
(--limit_mib) is below the shards' size (the process may not hold the corpus, and the
kernel's page cache for the shards counts against the limit too):
- the loader alone builds document-aligned training batches of 512 x 1024 until it has read
  as many tokens as the shards hold, printing its resident memory as it goes;
- train.py trains a small GPT on them (GPT-2's vocabulary, 2 layers of 128, batch 8 x 128,
  aligned rows), and the process's resident memory at each log line of training steps is
  printed (timing.jsonl's host_rss_mib; the lines with the first and last evaluations and the
  final save are left out).
The last line is `shards_mib=N limit_mib=N loader_rss_growth_mib=N rss_first_mib=N
rss_last_mib=N rss_max_mib=N rss_growth_mib=N cgroup_peak_mib=N` (the training run's
steps; growth: the most above the first).

The limit needs a writable memory cgroup (v1 or v2; root on most machines); without one the
run goes unlimited and says so, and its resident memory still shows whether it stays flat.
"""

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt_jax import shards  # noqa: E402

EOT = 50256
CGROUP_V1 = Path("/sys/fs/cgroup/memory")
CGROUP_V2 = Path("/sys/fs/cgroup")


def write_shards(directory: Path, n_tokens: int, shard_tokens: int, seed: int = 0) -> None:
    """Writes n_tokens of documents as train shards of shard_tokens, and a small val shard, in
    `directory`: one random chunk of 16M tokens (documents of 1 to 2000 tokens, each ended by
    <|endoftext|>), written over and over, so the corpus is never held."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    chunk = rng.integers(0, EOT, 1 << 24).astype(np.uint16)
    chunk[np.cumsum(rng.integers(1, 2000, len(chunk) // 1000))[:-1] % len(chunk)] = EOT
    train = shards.SplitWriter(directory, "mem", "train", shard_tokens, first_index=1)
    for start in range(0, n_tokens, len(chunk)):
        train.write(chunk[: n_tokens - start])
    train.close()
    shards.write_shard(directory / "mem_val_000000.bin", chunk[: 1 << 16])


@contextlib.contextmanager
def memory_cgroup(limit_bytes: int):
    """Yields (a shell prefix that runs a command inside a new memory cgroup limited to
    limit_bytes, a function giving its peak usage in bytes), or (None, None) when no memory
    cgroup can be made here. The cgroup is removed afterwards."""
    name = f"gpt_jax_{uuid.uuid4().hex[:8]}"
    v1 = (CGROUP_V1 / "memory.limit_in_bytes").exists()
    path = (CGROUP_V1 if v1 else CGROUP_V2) / name
    try:
        path.mkdir()
        if v1:
            (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            peak_file = path / "memory.max_usage_in_bytes"
        else:
            (path / "memory.max").write_text(str(limit_bytes))
            (path / "memory.swap.max").write_text("0")
            peak_file = path / "memory.peak"
    except OSError:
        with contextlib.suppress(OSError):
            path.rmdir()
        yield None, None
        return
    try:
        prefix = f"echo $$ > {shlex.quote(str(path / 'cgroup.procs'))} && exec"
        yield prefix, lambda: int(peak_file.read_text()) if peak_file.exists() else None
    finally:
        with contextlib.suppress(OSError):
            path.rmdir()


def train_command(data_dir: Path, out_dir: Path, steps: int, model: dict, batch: int) -> list:
    flags = {"data.path": data_dir, "out_dir": out_dir, "max_steps": steps, "batch_size": batch,
             "grad_accum_steps": 1, "decay_steps": steps,
             "eval_interval": steps, "eval_tokens": 8 * model["block_size"],
             "checkpoint_interval": steps, "log_interval": max(1, steps // 20),
             "warmup_steps": 0, "data.align": "bos", "progress_bar": False,
             **{f"model.{k}": v for k, v in model.items()}}
    return [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/gpt2.py"),
            *[f"--config.{k}={v}" for k, v in flags.items()]]


def run(shards_dir: Path, out_dir: Path, limit_bytes: int, steps: int, model: dict, batch: int,
        env: dict | None = None) -> dict:
    """Trains on shards_dir under the limit; returns the figures (resident MiB per log line,
    the cgroup's peak, whether the limit applied) or raises with the run's output."""
    command = train_command(shards_dir, out_dir, steps, model, batch)
    with memory_cgroup(limit_bytes) as (prefix, peak):
        shell = f"{prefix or 'exec'} {shlex.join(map(str, command))}"
        proc = subprocess.run(["sh", "-c", shell], capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                              check=False)
        cgroup_peak = peak() if peak else None
    if proc.returncode:
        raise RuntimeError(f"train.py failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    timing = [json.loads(line) for line in (out_dir / "timing.jsonl").read_text().splitlines()]
    # the training steps' lines: the first and last evaluations and the save stand apart
    rss = {r["step"]: r["host_rss_mib"] for r in timing
           if "host_rss_mib" in r and "eval_s" not in r and "save_s" not in r}
    return {"rss_by_step": rss, "cgroup_peak_mib": cgroup_peak and cgroup_peak / 2**20,
            "limited": prefix is not None}


def read_batches(shards_dir: str, n_tokens: int, batch: int, block_size: int) -> None:
    """Builds training batches (document-aligned, as train.py would) until n_tokens have been
    read; prints `batch N rss_mib R` every few batches (run in a child process, see loader)."""
    from gpt_jax import config as config_lib
    from gpt_jax import data, host_memory

    config = config_lib.base_config()
    config.batch_size, config.model.block_size, config.data.align = batch, block_size, "bos"
    dataset = data.read_prepared(Path(shards_dir))
    steps = -(-n_tokens // (batch * (block_size + 1)))
    for step in range(steps):
        data.train_batch(dataset, config, step)
        if step % max(1, steps // 20) == 0 or step == steps - 1:
            print(f"batch {step} rss_mib {host_memory.resident_bytes() / 2**20:.2f}", flush=True)


def loader(shards_dir: Path, limit_bytes: int, n_tokens: int, batch: int = 512,
           block_size: int = 1024) -> dict:
    """Reads n_tokens of batches in a child process under the limit; returns its resident
    MiB by batch and the cgroup's peak."""
    code = (f"from benchmarks.shard_memory import read_batches; "
            f"read_batches({str(shards_dir)!r}, {n_tokens}, {batch}, {block_size})")
    with memory_cgroup(limit_bytes) as (prefix, peak):
        shell = f"{prefix or 'exec'} {shlex.join([sys.executable, '-c', code])}"
        proc = subprocess.run(["sh", "-c", shell], capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
        cgroup_peak = peak() if peak else None
    if proc.returncode:
        raise RuntimeError(f"the loader failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    rss = {int(w[1]): float(w[3]) for w in map(str.split, proc.stdout.splitlines())}
    return {"rss_by_batch": rss, "cgroup_peak_mib": cgroup_peak and cgroup_peak / 2**20}


def flat_figures(rss_by_step: dict) -> dict:
    """Returns resident memory over the training steps' log lines."""
    after = [rss_by_step[s] for s in sorted(rss_by_step)]
    return {"rss_first_mib": after[0], "rss_last_mib": after[-1], "rss_max_mib": max(after),
            "rss_growth_mib": max(after) - after[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=4.0, help="size of the train shards")
    parser.add_argument("--limit_mib", type=int, default=1536, help="the cgroup's memory limit")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--dir", default="", help="where the shards go (default: a temp dir)")
    args = parser.parse_args()
    model = {"n_layer": 2, "n_head": 2, "n_embd": 128, "block_size": 128}
    with tempfile.TemporaryDirectory(dir=args.dir or None) as tmp:
        shards_dir = Path(tmp) / "shards"
        n_tokens = int(args.gib * 2**30) // 2
        write_shards(shards_dir, n_tokens, 100_000_000)
        shards_mib = sum(p.stat().st_size for p in shards_dir.glob("*.bin")) / 2**20
        read = loader(shards_dir, args.limit_mib << 20, n_tokens)
        figures = run(shards_dir, Path(tmp) / "run", args.limit_mib << 20, args.steps, model, 8)
    if not figures["limited"]:
        print("no writable memory cgroup here: the run had no limit", file=sys.stderr)
    print(f"batches alone (512 x 1024, aligned), {shards_mib:,.0f} MiB of crops read: "
          "resident " + ", ".join(f"{v:.0f}" for v in read["rss_by_batch"].values())
          + f" MiB; cgroup peak {read['cgroup_peak_mib'] or 0:.0f} MiB")
    for step, rss in sorted(figures["rss_by_step"].items()):
        print(f"step {step:5d}: resident {rss:7.1f} MiB")
    loader_rss = list(read["rss_by_batch"].values())
    summary = {"shards_mib": shards_mib, "limit_mib": args.limit_mib if figures["limited"]
               else None, "loader_rss_growth_mib": max(loader_rss) - loader_rss[0],
               **flat_figures(figures["rss_by_step"]),
               "cgroup_peak_mib": figures["cgroup_peak_mib"]}
    print(" ".join(f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in summary.items()))


if __name__ == "__main__":
    main()
