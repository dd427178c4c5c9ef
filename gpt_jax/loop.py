"""What the training loop does between steps: log records, evaluations, checkpoint saves,
stop requests and pacing. The loop itself is trainer.run."""

import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from gpt_jax import checkpoint, host_memory, metrics, seeds
from gpt_jax.errors import UserError
from gpt_jax.metrics import warn

PyTree = Any  # a train state (trainer.TrainState), or lanes of them stacked


class TrainingStopped(Exception):
    """Raised when a signal asked the run to stop; the checkpoint is already saved."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# An evaluation this long (all seeds) is announced before the next one starts.
LONG_EVAL_S = 5.0
EVAL_KEYS = ("step", "lr", "eval_train_loss", "val_loss", "val_bpb")  # what run() returns
SLOW_RUN_S = 3600  # a CPU run with more left than this is pointed at the CPU recipe


class Loop:
    """The training loop's log lines, evaluations and saves, and what they keep between steps."""

    def __init__(self, config, lanes: seeds.Lanes, dataset, mesh, *, start: int, schedule,
                 estimate_loss, tokenizer_table: dict, flops_per_token: float, peak: float,
                 model_config=None):
        """Starts the loop's clock (and progress bar) at step `start`.

        estimate_loss(params, dataset, config, step, mesh) -> {"train": loss, "val": loss,
        "val_bpb": bits per byte}; peak: the mesh's FLOP/s, which MFU is measured against;
        model_config: the GPTConfig the harness tasks (config.eval_tasks) are scored with.
        """
        self.config, self.lanes, self.dataset, self.mesh = config, lanes, dataset, mesh
        self.estimate_loss, self.schedule = estimate_loss, schedule
        self.model_config = model_config
        self.tokenizer_table = tokenizer_table
        self.flops_per_token, self.peak = flops_per_token, peak
        # saved_at, logged_at: the newest step saved, and logged
        self.start = self.saved_at = self.logged_at = start
        self.tokens_per_step = config.batch_size * config.model.block_size
        self.progress = metrics.Progress(config.progress_bar, config.max_steps, start)
        self.clock = metrics.LoopClock()
        self.elapsed_before = [metrics.elapsed_before(c.out_dir, start) for c in lanes.configs]
        self.eval_steps = {s for s in range(start + 1, config.max_steps + 1)
                           if s % config.eval_interval == 0} | {config.max_steps}
        self.saves = [{} for _ in lanes.configs]  # save seconds since each lane's last record
        self.last_eval, self.eval_round_s = {}, None  # eval_round_s: the last one, all seeds
        # The loop's wall time at its last record, and the evaluations' and saves' share of it.
        self.loop_s, self.aside, self.finishing = 0.0, dict(self.clock.totals), {}
        self.clipped_at_log = None  # each lane's count of clipped steps at the last record

    def begin(self, state: PyTree) -> None:
        """Evaluates and logs step 0 when the run is fresh; notes where the counts start."""
        if self.start == 0:
            self._first_record(state)
        self.clipped_at_log = np.asarray(state.clipped_steps)

    def _first_record(self, state: PyTree) -> None:
        for k in range(len(self.lanes)):
            record = {"step": 0, "lr": float(self.schedule(0))}
            self._evaluate(state, 0, k, record)
            self.lanes.write(k, dict(record, train_loss=record["eval_train_loss"],
                                     elapsed_s=self.clock.elapsed()), self.progress.say)
        self.eval_round_s = self.clock.totals["eval_s"]

    def save(self, state: PyTree, step: int) -> None:
        jax.block_until_ready(state)  # the step's own time is not the save's
        for k, c in enumerate(self.lanes.configs):
            with self.clock.aside("save_s", self.saves[k]):
                _check_finite(self.lanes.part(state, k), c)  # never save after a bad step
                self.lanes.save(k, step, state, self.tokenizer_table)
        self.saved_at = step

    def stop(self, state: PyTree, step: int, signum: int) -> None:
        """Saves the state (unless just saved) and raises TrainingStopped."""
        if step > self.saved_at:
            for k, c in enumerate(self.lanes.configs):
                _check_finite(self.lanes.part(state, k), c)
                self.lanes.save(k, step, state, self.tokenizer_table)
        self.lanes.wait()
        raise TrainingStopped(
            f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved in "
            f"{checkpoint.checkpoint_dir(self.config.out_dir)}: run the same command to resume",
            128 + signum)

    def record(self, state: PyTree, step_metrics: dict, step: int) -> None:
        """Logs step `step` for every lane: its figures, timing and (when due) evaluation."""
        lanes, steps = self.lanes, step - self.logged_at
        # The interval ends when its work is done and its figures are fetched.
        records = [_step_record(step, lanes.part(step_metrics, k), lanes.part(state, k), c,
                                self.schedule, int(lanes.part(self.clipped_at_log, k)), steps)
                   for k, c in enumerate(lanes.configs)]
        seconds = self.clock.lap()
        is_eval = step in self.eval_steps
        evals_left = sum(s > step for s in self.eval_steps)
        evals_before = self.clock.totals["eval_s"]
        for k, record in enumerate(records):
            record.update(metrics.step_timing(
                seconds, steps, self.config.max_steps - step, self.tokens_per_step,
                self.flops_per_token, self.peak / len(lanes), eval_s=self.eval_round_s or 0.0,
                evals_left=evals_left), **self.saves[k])
            self.saves[k] = {}
            if is_eval:
                self._evaluate(state, step, k, record)
            self.loop_s, self.aside = self.clock.elapsed(), dict(self.clock.totals)
            record["elapsed_s"] = self.loop_s + self.elapsed_before[k]
            if (rss := host_memory.resident_bytes()) is not None:
                record["host_rss_mib"] = rss / 2**20  # the process's, shared by its lanes
            lanes.write(k, record, self.progress.say)
        if is_eval:
            self.eval_round_s = self.clock.totals["eval_s"] - evals_before
        if self.logged_at == self.start:  # the first interval of this process
            _suggest_cpu_recipe(record["eta_s"])
        self.progress.show_loss(record["train_loss"])
        self.clipped_at_log = np.asarray(state.clipped_steps)
        self.logged_at = step

    def _evaluate(self, state: PyTree, step: int, k: int, record: dict) -> None:
        # Say what is coming before an evaluation that may take a while: the first one (its
        # length is unknown; on a CPU the baby GPT's takes a minute) and any after a long one.
        if k == 0 and (self.eval_round_s is None or self.eval_round_s >= LONG_EVAL_S):
            self.progress.say(f"evaluating {_eval_size(self.config)} of train and val"
                              + (f" for each of {len(self.lanes)} seeds"
                                 if self.lanes.vmapped else "") + "...")
        with self.clock.aside("eval_s", record):
            losses = self.estimate_loss(self.lanes.part(state.params, k), self.dataset,
                                        self.lanes.configs[k], step, self.mesh)
            record.update(eval_train_loss=losses["train"], val_loss=losses["val"],
                          val_bpb=losses["val_bpb"])
            if self.config.eval_tasks:
                record.update(self._task_metrics(self.lanes.part(state.params, k)))
            host_memory.release_freed_memory()  # the evaluation's buffers
        self.last_eval = {key: record[key] for key in EVAL_KEYS}

    def _task_metrics(self, params: PyTree) -> dict[str, float]:
        """Returns {"eval/<task>/<metric>": value} of config.eval_tasks, scored on process 0
        (the others only help gather the parameters)."""
        from gpt_jax import lm_eval

        if jax.process_count() > 1:
            params = multihost_utils.process_allgather(params)
        if jax.process_index() != 0:
            return {}
        tasks = [t.strip() for t in self.config.eval_tasks.split(",") if t.strip()]
        results = lm_eval.evaluate(
            params, self.model_config, self.dataset.tokenizer, tasks,
            limit=self.config.eval_tasks_limit or None,
            batch_size=self.config.batch_size // self.config.grad_accum_steps)
        return {f"eval/{task}/{name}": value
                for task, values in results.items() for name, value in values.items()}

    def close(self) -> None:
        self.progress.close()
        with self.clock.aside("save_s", self.finishing):  # the last checkpoint's files
            self.lanes.close()

    def summary(self, step: int) -> str:
        loop_s, aside = self.loop_s, self.aside
        return (f"trained {step - self.start} steps in {loop_s:.2f} s "
                f"({metrics.format_duration(loop_s)}): {loop_s - sum(aside.values()):.2f} s of "
                f"steps, {aside['eval_s']:.2f} s evaluating, {aside['save_s']:.2f} s saving; the "
                f"last checkpoint's writes took another {self.finishing['save_s']:.2f} s")


def _eval_size(config) -> str:
    if config.eval_mode == "random":
        return f"{config.eval_iters} random batches"
    return f"up to {config.eval_tokens:,} tokens"


def _suggest_cpu_recipe(eta_s: float) -> None:
    """Points a CPU run that will take hours at the CPU recipe (once, after its first interval)."""
    if jax.default_backend() == "cpu" and eta_s > SLOW_RUN_S:
        warn(f"note: at this pace the run needs about {metrics.format_duration(eta_s)} more on "
             "this CPU; for a CPU try python train.py --config configs/shakespeare_cpu.py "
             "(nanoGPT's CPU recipe: a 0.8M-parameter GPT, minutes on 2 cores)")


def _step_record(step: int, step_metrics: dict, state: PyTree, config, schedule,
                 clipped_at_last_log: int, steps: int) -> dict:
    """Returns the deterministic part of a logged step's record (losses, lr, norms, counts)."""
    skipped = _check_finite(state, config)
    record = {"step": step, "train_loss": float(step_metrics["loss"]),
              "lr": float(schedule(step))}
    record.update({k: float(v) for k, v in step_metrics.items() if k != "loss"})
    record["clip_fraction"] = (int(state.clipped_steps) - clipped_at_last_log) / steps
    if config.skip_nonfinite:
        record["skipped_steps"] = skipped
    return record


def _check_finite(state: PyTree, config: ml_collections.ConfigDict) -> int:
    """Returns the number of non-finite steps so far; raises UserError at the first one unless
    config.skip_nonfinite (the update of such a step was never applied either way)."""
    first = int(state.first_nonfinite_step)
    if first > 0 and not config.skip_nonfinite:
        raise UserError(
            f"the loss or gradient norm became NaN/Inf at step {first}: lower "
            "--config.learning_rate or raise --config.warmup_steps (or pass "
            "--config.skip_nonfinite=True to skip such steps); no parameters from that step "
            f"were saved, the checkpoints in {checkpoint.checkpoint_dir(config.out_dir)} are good")
    return int(state.nonfinite_steps)


class StopRequests:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# Steps whose temporary buffer is at least this large wait for its release (see StepPacer).
# The CPU recipe's (47 MiB) is: waiting left its 2000-step run's peak resident memory about
# 100 MiB lower (benchmarks/memory.py: ~440 against ~540 MiB) at the same ms/step, within the
# noise of three alternating 300-step runs each; smaller steps (tests' models) stay one ahead.
LARGE_TEMP_BYTES = 16 << 20
_RELEASE_TIMEOUT_S = 0.1


class StepPacer:
    """Paces a loop of compiled steps on a CPU; does nothing on accelerators.

    Call `pacer(outputs)` after dispatching each step. On XLA:CPU it waits for the previous
    step's outputs, so one step is in flight while Python prepares and dispatches the next
    (waiting on this step's own outputs left both cores idle ~2 ms a step, about 3% of a
    CPU-recipe step). When the step's temporary buffer is large (`LARGE_TEMP_BYTES`) and the
    heap is kept (`retain_freed_memory`), it waits for this step's outputs instead, and then
    until XLA has freed that buffer, watched through glibc's count of bytes in use (at most
    0.1 s, then it goes on). Numerics are untouched.
    """

    def __init__(self, compiled):
        self._on_cpu = jax.default_backend() == "cpu"
        self._block_until_ready = jax.block_until_ready
        temp = compiled.memory_analysis().temp_size_in_bytes if self._on_cpu else 0
        large = host_memory.retained() and temp >= LARGE_TEMP_BYTES
        self._in_use = host_memory.heap_in_use_counter() if large else None
        self._half_temp = temp // 2
        self._settled = self._in_use() if self._in_use else 0  # bytes in use between steps
        self._in_flight = None  # the outputs of the step still running (small temp only)

    def __call__(self, outputs) -> None:
        if not self._on_cpu:
            return
        if self._in_use is None:
            previous, self._in_flight = self._in_flight, outputs
            if previous is not None:
                self._block_until_ready(previous)
            return
        self._block_until_ready(outputs)
        deadline = time.perf_counter() + _RELEASE_TIMEOUT_S
        while (self._in_use() > self._settled + self._half_temp
               and time.perf_counter() < deadline):
            time.sleep(0.0002)  # yield the core to the XLA thread that frees the buffer
        self._settled = self._in_use()
