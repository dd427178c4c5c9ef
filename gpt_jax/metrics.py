"""The loss, the per-step records (stdout, metrics.jsonl, TensorBoard), FLOPs and MFU."""

import contextlib
import functools
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import tqdm

from gpt_jax.model import count_params


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Returns the mean next-token cross-entropy in float32."""
    return token_losses(logits_BTV, targets_BT).mean()


def token_losses(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Returns each token's next-token cross-entropy in nats, float32 (B, T)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32),
                                                           targets_BT)


# Wall-clock figures: they go to timing.jsonl, so that metrics.jsonl stays reproducible.
TIMING_KEYS = ("ms_per_step", "tokens_per_sec", "mfu", "elapsed_s", "eval_s", "save_s", "eta_s",
               "host_rss_mib")


class LoopClock:
    """The training loop's wall clock, split into steps, evaluations and checkpoint saves.

    `lap()` ends one logged interval and starts the next at the same instant, so the intervals
    tile the loop's time with no gap: whatever runs at a log line (building and writing the
    record, fetching norms) counts in the next interval. Evaluations and saves run `aside()`
    and are subtracted from the interval they fall in; their seconds are logged on their own.
    """

    def __init__(self):
        self.start = self._mark = time.perf_counter()
        self._aside = 0.0  # seconds of evaluations and saves since the last lap
        self.totals = {"eval_s": 0.0, "save_s": 0.0}

    @contextlib.contextmanager
    def aside(self, key: str, into: dict) -> Iterator[None]:
        """Times the block as `key` ("eval_s" or "save_s"), added to `into[key]`."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - t0
            self._aside += seconds
            self.totals[key] += seconds
            into[key] = into.get(key, 0.0) + seconds

    def lap(self) -> float:
        """Returns the seconds of steps since the last lap (evaluations and saves left out)."""
        now = time.perf_counter()
        seconds, self._mark, self._aside = now - self._mark - self._aside, now, 0.0
        return seconds

    def elapsed(self) -> float:
        """Returns the seconds since the loop started."""
        return time.perf_counter() - self.start


def step_timing(seconds: float, steps: int, steps_left: int, tokens_per_step: int,
                flops_per_token: float, peak: float, eval_s: float, evals_left: int) -> dict:
    """Returns the wall-clock part of a record: ms/step, tokens/s, MFU and the time left.

    The time left (eta_s) is the steps left at this interval's pace plus the evaluations
    left at the last evaluation's length.
    """
    tokens_per_sec = tokens_per_step * steps / seconds
    return {"ms_per_step": 1000 * seconds / steps, "tokens_per_sec": tokens_per_sec,
            "mfu": tokens_per_sec * flops_per_token / peak,
            "eta_s": steps_left * seconds / steps + evals_left * eval_s}


def format_duration(seconds: float) -> str:
    """Returns seconds as a short duration: 42s, 3m05s, 7h02m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class _JsonLines:
    """One JSON object per line, flushed per line; on resume, lines past the step are dropped."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if path.exists():
            # Records logged after the checkpoint we resume from (all of them on a fresh start)
            # will be written again; a line cut short by a kill is dropped.
            kept = [line for line in path.read_text().splitlines()
                    if resume_step and _step_of(line) is not None
                    and _step_of(line) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class MetricsWriter:
    """Writes each logged step's record to OUT_DIR: metrics.jsonl, timing.jsonl, TensorBoard.

    metrics.jsonl holds what the run computes (losses, lr, norms): the same config and seed
    give the same file, byte for byte. Wall-clock figures (ms/step, tokens/s, MFU) go to
    timing.jsonl. Every number also goes to TensorBoard event files in OUT_DIR/tensorboard,
    and to Weights & Biases when a project is named and wandb is installed.
    """

    def __init__(self, out_dir, resume_step: int | None = None, enabled: bool = True,
                 wandb_project: str = "", run_config: dict | None = None):
        self.enabled = enabled  # only process 0 writes in multi-process runs
        if not enabled:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._metrics = _JsonLines(out / "metrics.jsonl", resume_step)
        self._timing = _JsonLines(out / "timing.jsonl", resume_step)
        self._tensorboard = _summary_writer_class()(str(out / "tensorboard"), flush_secs=10)
        self._wandb = _start_wandb(wandb_project, out, run_config) if wandb_project else None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._metrics.write({k: v for k, v in record.items() if k not in TIMING_KEYS})
        timing = {k: v for k, v in record.items() if k in TIMING_KEYS}
        if timing:
            self._timing.write({"step": record["step"], **timing})
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tensorboard.add_scalar(key, value, record["step"])
        if self._wandb is not None:
            self._wandb.log(record, step=record["step"])

    def close(self) -> None:
        if self.enabled:
            self._metrics.close()
            self._timing.close()
            self._tensorboard.close()
            if self._wandb is not None:
                self._wandb.finish()


def _summary_writer_class():
    """Returns tensorboardX's SummaryWriter, imported without PyTorch.

    tensorboardX imports torch whenever it is installed (for tensors; we log floats only),
    which adds 180 MiB to the process's resident memory (benchmarks/memory.py). A None in
    sys.modules makes that one import fail as if torch were not installed; a process that has
    already imported either package keeps it as it is.
    """
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def _start_wandb(project: str, out: Path, run_config: dict | None):
    try:
        import wandb
    except ImportError:
        print(f"warning: wandb.project={project!r} but wandb is not installed (pip install "
              "wandb); logging to metrics.jsonl and TensorBoard only", flush=True)
        return None
    return wandb.init(project=project, name=out.name, dir=str(out), config=run_config,
                      resume="allow")


def read_records(out_dir) -> list[dict]:
    """Returns metrics.jsonl's records with timing.jsonl's figures merged in, by step."""
    out = Path(out_dir)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
               if _step_of(line) is not None]
    if (out / "timing.jsonl").exists():
        timing = {_step_of(line): json.loads(line)
                  for line in (out / "timing.jsonl").read_text().splitlines()
                  if _step_of(line) is not None}
        records = [{**timing.get(r["step"], {}), **r} for r in records]
    return records


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def format_record(record: dict) -> str:
    """Returns the readable log line for one record."""
    parts = [f"step {record['step']}"]
    if "train_loss" in record and "ms_per_step" in record:
        parts.append(f"loss {record['train_loss']:.4f}")
    if "val_loss" in record:
        parts.append(f"train {record['eval_train_loss']:.4f} val {record['val_loss']:.4f}")
    if "val_bpb" in record:
        parts.append(f"val bpb {record['val_bpb']:.4f}")
    parts.append(f"lr {record['lr']:.3e}")
    if "ms_per_step" in record:
        parts.append(f"{record['ms_per_step']:.1f} ms/step")
        parts.append(f"{record['tokens_per_sec']:,.0f} tokens/s")
    if math.isfinite(record.get("mfu", math.nan)):  # no MFU where the peak is unknown
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    if "eval_s" in record:
        parts.append(f"eval {record['eval_s']:.1f} s")
    if "save_s" in record:
        parts.append(f"save {record['save_s']:.2f} s")
    if "eta_s" in record:
        parts.append(f"eta {format_duration(record['eta_s'])}")
    return " | ".join(parts)


# --------------------------------------------------------------------------- FLOPs and MFU

# Dense bf16 peak FLOP/s per chip, by a substring of jax's device_kind (lower case).
PEAK_FLOPS = {
    "a100": 312e12,
    "h100": 989e12,
    "h200": 989e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
}


def flops_per_token(n_non_embedding: int, n_layer: int, n_embd: int, block_size: int) -> int:
    """Returns training FLOPs per token: 6N + 12 * n_layer * n_embd * block_size.

    The PaLM paper's appendix B convention (nanoGPT's estimate_mfu): 6N for the forward and
    backward matmuls with the parameters, plus the attention's score and value matmuls.
    """
    return 6 * n_non_embedding + 12 * n_layer * n_embd * block_size


def peak_flops_per_device(device) -> tuple[float, str]:
    """Returns (peak FLOP/s of one device, where the figure comes from).

    Accelerators are looked up in PEAK_FLOPS (bf16 dense); a CPU is measured once with a
    float32 matmul probe, since its peak depends on the machine and the cores it may use.
    """
    kind = device.device_kind.lower()
    for name, peak in PEAK_FLOPS.items():
        if name in kind:
            return peak, f"{device.device_kind} bf16 peak"
    if device.platform == "cpu":
        return cpu_matmul_peak(), "float32 matmul probe"
    return float("nan"), f"unknown peak for {device.device_kind}"


def peak_flops(devices) -> tuple[float, str]:
    """Returns (peak FLOP/s of all these devices together, where the figure comes from).

    Accelerators add up. Simulated CPU devices (--xla_force_host_platform_device_count) share
    their host's cores, which the probe already measures whole, so CPUs count once per host.
    """
    devices = list(devices)
    peak, source = peak_flops_per_device(devices[0])
    if devices[0].platform == "cpu":
        count, unit = len({d.process_index for d in devices}), "hosts"
    else:
        count, unit = len(devices), "devices"
    return peak * count, source + (f", x {count} {unit}" if count > 1 else "")


@functools.cache
def cpu_matmul_peak(n: int = 1024, repeats: int = 10) -> float:
    """Returns the FLOP/s of the best of `repeats` float32 (n, n) @ (n, n) matmuls on the CPU."""
    x = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def xla_flops(compiled) -> float | None:
    """Returns the FLOPs XLA's cost analysis counts for a compiled function, when it has one."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 (not every backend implements it)
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops else None


def log(message: str) -> None:
    """Prints a progress line (from process 0 only in multi-process runs)."""
    if jax.process_index() == 0:
        print(message, flush=True)


def warn(message: str) -> None:
    """Prints a one-line notice on standard error, above a progress bar (from process 0)."""
    if jax.process_index() == 0:
        tqdm.tqdm.write(message, file=sys.stderr)


class Progress:
    """A progress bar (steps, ETA, loss) on an interactive terminal, plain log lines otherwise."""

    def __init__(self, enabled: bool, total: int, initial: int):
        on = enabled and sys.stderr.isatty() and jax.process_index() == 0
        self._bar = tqdm.tqdm(total=total, initial=initial, unit="step", disable=not on,
                              dynamic_ncols=True)
        self.say = self._bar.write if on else log  # a line above the bar, or a log line

    def show_loss(self, loss: float) -> None:
        self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def update(self) -> None:
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def model_flops_per_token(model_cfg) -> int:
    """Returns flops_per_token for a GPTConfig (its non-embedding parameters, shape, context)."""
    return flops_per_token(count_params(model_cfg)["non_embedding"], model_cfg.n_layer,
                           model_cfg.n_embd, model_cfg.block_size)


def flops_report(formula: float, xla: float | None, peak: float, peak_source: str) -> str:
    """Returns one line: FLOPs per train step by the 6N + 12LDT formula and by XLA, and the peak."""
    line = f"FLOPs per step: {formula / 1e9:,.2f} G by 6N + 12·n_layer·n_embd·block_size"
    if xla is not None:
        total = xla * jax.device_count()
        line += f", {total / 1e9:,.2f} G by XLA's cost analysis ({total / formula:.2f}x)"
    return line + f"; MFU against {peak / 1e12:,.3f} TFLOP/s ({peak_source})"


class CacheHits:
    """Counts persistent compilation cache hits while the `with` block runs."""

    EVENT = "/jax/compilation_cache/cache_hits"

    def __enter__(self):
        self.count = 0
        jax.monitoring.register_event_listener(self._listen)
        return self

    def _listen(self, event, **kwargs):
        if event == self.EVENT:
            self.count += 1

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_listener(self._listen)


def elapsed_before(out_dir, start: int) -> float:
    """Returns the training seconds logged up to `start` by earlier runs of this out_dir."""
    if not start or not (Path(out_dir) / "metrics.jsonl").exists():
        return 0.0
    times = [r.get("elapsed_s", 0.0) for r in read_records(out_dir) if r["step"] <= start]
    return max(times, default=0.0)


def step_memory_report(compiled) -> str | None:
    """Returns a line of XLA's memory plan for a compiled step: its arguments (state and
    batch), its temporaries (the activations kept for the backward pass and workspace) and its
    outputs; None where the backend makes no plan."""
    plan = compiled.memory_analysis()
    if plan is None:
        return None
    mib = {key: getattr(plan, f"{key}_size_in_bytes") / 2**20
           for key in ("argument", "temp", "output")}
    return (f"train step memory (XLA's plan): {mib['argument']:,.1f} MiB state and batch, "
            f"{mib['temp']:,.1f} MiB temporaries (activations, workspace), "
            f"{mib['output']:,.1f} MiB outputs")
