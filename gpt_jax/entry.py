"""How the command-line entry points start and fail: one-line errors, never a traceback."""

import argparse
from collections.abc import Callable
from pathlib import Path

from gpt_jax import host_memory
from gpt_jax.errors import UserError, exit_with


def main(body: Callable[[], None], *, keep_freed_memory: bool = False,
         interrupted: str | None = None) -> None:
    """Runs an entry point's body and turns the ways it ends by design into exit statuses.

    A UserError prints one line and exits 2. An exception that carries an `exit_code` (a
    deliberate stop, such as TrainingStopped after a signal) prints one line and exits
    with that code.

    Args:
      body: the entry point's work.
      keep_freed_memory: call host_memory.retain_freed_memory() first. Scripts that run JAX
        computations ask for it: it must come before JAX starts its thread pools, which is at
        the first computation, not at `import jax`.
      interrupted: the one line printed for Ctrl-C (exit 130); None lets KeyboardInterrupt
        end the process as Python does.
    """
    try:
        if keep_freed_memory:
            host_memory.retain_freed_memory()
        body()
    except UserError as err:
        exit_with(err)
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        exit_with(UserError(interrupted), 130)
    except Exception as err:
        if not isinstance(getattr(err, "exit_code", None), int):
            raise
        exit_with(err, err.exit_code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, `error: <message> (see <command> --help)`.

    `command` is how the user runs the script ("python sample.py"; default: `prog`). The
    description keeps its line breaks: it is usually the module's docstring.
    """

    def __init__(self, *, command: str | None = None, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)
        self._command = command or self.prog

    def error(self, message: str):
        exit_with(UserError(f"{message} (see {self._command} --help)"))


def enable_compile_cache(directory) -> None:
    """Turns on JAX's persistent compilation cache in `directory`: a rerun of the same program
    (a config's train step, a sampler's decode loop) loads it instead of compiling."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(Path(directory).expanduser()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
