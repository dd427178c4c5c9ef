"""Profiles on demand: a jax.profiler trace of chosen train steps (config.profile_steps)."""

import contextlib
from pathlib import Path

import jax

from gpt_jax.errors import UserError
from gpt_jax.metrics import log

PROFILE_SUBDIR = "profile"
STEP_NAME = "train_step"  # how each traced step is named in the trace


def parse_steps(spec: str, max_steps: int) -> tuple[int, int] | None:
    """Returns (A, B) of profile_steps "A:B" (steps A + 1 ... B are traced), None when empty;
    raises UserError naming the problem."""
    if not spec:
        return None
    first, sep, last = spec.partition(":")
    if not sep or not first.strip().isdigit() or not last.strip().isdigit():
        raise UserError(f"profile_steps={spec!r} is not A:B: pass two step numbers, e.g. "
                        "--config.profile_steps=10:15 traces steps 11 to 15")
    a, b = int(first), int(last)
    if a >= b:
        raise UserError(f"profile_steps={spec!r} traces no step: A must be below B, e.g. "
                        f"--config.profile_steps={a}:{a + 5}")
    if b > max_steps:
        raise UserError(f"profile_steps={spec!r} ends after max_steps={max_steps}: choose B "
                        f"<= {max_steps}")
    return a, b


class StepProfiler:
    """Traces steps A + 1 ... B of a run into out_dir/profile/ (TensorBoard's profile tab or
    ui.perfetto.dev read it), each step named `train_step` with its number.

    The loop calls `step(k)` around the dispatch of step k (numbered from 1) and `done(k,
    outputs)` after it; the trace starts before step A + 1 and stops once step B's outputs are
    ready. Without profile_steps both do nothing.
    """

    def __init__(self, config):
        self._span = parse_steps(config.profile_steps, config.max_steps)
        self._directory = Path(config.out_dir).expanduser().absolute() / PROFILE_SUBDIR
        self._tracing = False

    def step(self, step: int):
        """Returns the context to dispatch step `step` in: a named step while tracing."""
        if self._span is not None and not self._tracing and self._span[0] < step <= self._span[1]:
            self._directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self._directory))
            self._tracing = True
        if self._tracing:
            return jax.profiler.StepTraceAnnotation(STEP_NAME, step_num=step)
        return contextlib.nullcontext()

    def done(self, step: int, outputs) -> None:
        """Stops the trace once step B's outputs are ready."""
        if self._tracing and step >= self._span[1]:
            jax.block_until_ready(outputs)
            self.close()
            log(f"profile of steps {self._span[0] + 1}-{self._span[1]} written to "
                f"{self._directory} (tensorboard --logdir {self._directory}, or "
                "ui.perfetto.dev)")

    def close(self) -> None:
        """Stops a trace still running (a run stopped inside the span)."""
        if self._tracing:
            jax.profiler.stop_trace()
            self._tracing = False
