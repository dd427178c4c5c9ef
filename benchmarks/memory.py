"""Measures the host memory of a whole training run: peak resident set, and where it goes.

    python benchmarks/memory.py --config configs/shakespeare_cpu.py
    python benchmarks/memory.py --config configs/shakespeare_cpu.py --mode phases
    python benchmarks/memory.py --config configs/shakespeare.py --mode phases \
        --config.max_steps=6 --config.eval_interval=3 --config.eval_tokens=16384

--mode peak (the default) runs `train.py` with the config (and its --config.* overrides) in a
fresh process, into a temporary out_dir, then nanoGPT's equivalent run when torch is
installed: the same model, batch, steps, evaluations (eval_iters random batches of each split,
nanoGPT's estimate) and checkpoint saves (torch.save of model and optimizer), through
nanoGPT's training loop in PyTorch eager mode (benchmarks/torch_nanogpt.py; that process
imports neither JAX nor gpt-jax's library). The runs go one after the other; each one's peak
resident set is the kernel's own count (wait4's ru_maxrss), ending with a line
`gptjax_peak_mib=N nanogpt_peak_mib=N ratio=N.NN`.

--mode phases runs train.py's run in a fresh process and prints its resident set (VmRSS), its
peak so far (VmHWM) and glibc's heap (bytes in use, and bytes free but kept by the process)
after each phase: each import (jax, flax, optax, orbax, then the rest of gpt-jax), the data,
the state's init, the compiled step, the first evaluation, the first steps, the first
checkpoint save, the first log record, and the end. `files` is the part of the resident set
that maps files (mostly jaxlib's shared libraries); `heap kept` is memory glibc holds free
for reuse (host_memory.py keeps it rather than unmapping it). It also prints what importing
each of jax, flax, optax, orbax, tensorboardX, matplotlib and torch alone costs, each in a
fresh process. The phases are found by wrapping gpt-jax's functions from this script: the
trainer is not changed.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("peak", "phases", "_phases", "_nanogpt"),
                        default="peak")
    parser.add_argument("--shapes", help=argparse.SUPPRESS)  # --mode _nanogpt: the run, JSON
    args, config_argv = parser.parse_known_args()
    if args.mode == "_phases":
        _phases_child(config_argv)
    elif args.mode == "_nanogpt":
        _nanogpt_child(json.loads(args.shapes))
    elif args.mode == "phases":
        _phases(config_argv)
    else:
        _peak(config_argv)


# --------------------------------------------------------------------------- measuring


def _run(command: list[str], quiet: bool = True) -> float:
    """Runs `command` in a fresh process; returns its peak resident set in MiB."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    process = subprocess.Popen(command, cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL if quiet else None)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.exit(f"error: {' '.join(command[:4])} ... exited with {process.returncode}")
    return usage.ru_maxrss * 1024 / MIB  # ru_maxrss is in KiB on Linux


def _run_flags(tmp: str, config_argv: list[str]) -> list[str]:
    """Returns train.py's flags for a measured run: the config's, then a fresh out_dir, no
    progress bar and a fresh compilation cache, so that XLA's compilation is counted (unless
    the config's flags name a --config.compile_cache_dir)."""
    own = {"out_dir": f"{tmp}/jax", "progress_bar": "False",
           "compile_cache_dir": f"{tmp}/jax_compile"}
    given = {arg.split("=")[0] for arg in config_argv}
    return [*config_argv, *(f"--config.{key}={value}" for key, value in own.items()
                            if key == "out_dir" or f"--config.{key}" not in given)]


def _status() -> dict[str, float]:
    """Returns this process's VmRSS, VmHWM and RssFile (mapped files: libraries) in MiB."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssFile"):
                fields[key] = int(value.split()[0]) / 1024
    return fields


# --------------------------------------------------------------------------- peak


def _peak(config_argv: list[str]) -> None:
    sys.path.insert(0, str(ROOT))
    from gpt_jax import cli, data

    config = cli.parse_config([sys.argv[0], *config_argv])
    dataset = data.load_dataset(config.data)  # prepared once here, before either run
    with tempfile.TemporaryDirectory(prefix="gpt_jax_memory_") as tmp:
        gptjax = _run([sys.executable, "train.py", *_run_flags(tmp, config_argv)])
        print(f"gpt-jax  train.py: peak resident {gptjax:,.0f} MiB", flush=True)
        try:
            import torch  # noqa: F401 (only whether it is there)
        except ImportError:
            print("nanoGPT: torch is not installed (pip install torch); skipped")
            print(f"gptjax_peak_mib={gptjax:.0f}")
            return
        shapes = {key: config[key] for key in (
            "batch_size", "max_steps", "eval_interval", "eval_iters", "learning_rate", "min_lr",
            "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "seed")}
        shapes.update({key: config.model[key] for key in (
            "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias")})
        shapes.update(vocab_size=dataset.tokenizer.vocab_size, data=str(dataset.directory),
                      out_dir=f"{tmp}/nanogpt")
        nanogpt = _run([sys.executable, __file__, "--mode", "_nanogpt", "--shapes",
                        json.dumps(shapes)])
    print(f"nanoGPT  (PyTorch eager): peak resident {nanogpt:,.0f} MiB")
    print(f"gptjax_peak_mib={gptjax:.0f} nanogpt_peak_mib={nanogpt:.0f} "
          f"ratio={gptjax / nanogpt:.2f}")


def _nanogpt_child(run: dict) -> None:
    """nanoGPT's train.py loop at `run`'s shapes: evaluations, saves, AdamW, cosine lr."""
    import math
    import types

    import numpy as np
    import torch

    from benchmarks import torch_nanogpt

    config = types.SimpleNamespace(**run)
    torch.manual_seed(config.seed)
    model = torch_nanogpt.nanogpt_model(config)
    optimizer = torch_nanogpt.make_optimizer(model, config)
    Path(config.out_dir).mkdir(parents=True)

    def get_batch(split):  # nanoGPT's: a fresh memmap per batch, crops at random starts
        tokens = np.memmap(Path(config.data) / f"{split}.bin", dtype=np.uint16, mode="r")
        ix = torch.randint(len(tokens) - config.block_size, (config.batch_size,))
        x = torch.stack([torch.from_numpy(tokens[i:i + config.block_size].astype(np.int64))
                         for i in ix])
        y = torch.stack([torch.from_numpy(tokens[i + 1:i + 1 + config.block_size]
                                          .astype(np.int64)) for i in ix])
        return x, y

    @torch.no_grad()
    def estimate_loss():
        model.eval()
        out = {split: torch.stack([model(*get_batch(split)) for _ in range(config.eval_iters)])
               .mean().item() for split in ("train", "val")}
        model.train()
        return out

    def get_lr(it):
        if it < config.warmup_steps:
            return config.learning_rate * (it + 1) / (config.warmup_steps + 1)
        ratio = (it - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
        coeff = 0.5 * (1.0 + math.cos(math.pi * min(1.0, ratio)))
        return config.min_lr + coeff * (config.learning_rate - config.min_lr)

    for step in range(config.max_steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step)
        if step % config.eval_interval == 0 or step == config.max_steps:
            estimate_loss()
            if step > 0:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "iter_num": step}, Path(config.out_dir) / "ckpt.pt")
        if step == config.max_steps:
            break
        torch_nanogpt.train_step(model, optimizer, *get_batch("train"), config.grad_clip).item()


# --------------------------------------------------------------------------- phases

# Imported alone, each in a fresh process: what the package itself costs.
ALONE = ("jax", "flax.linen", "optax", "orbax.checkpoint", "tensorboardX", "matplotlib.pyplot",
         "torch")


def _phases(config_argv: list[str]) -> None:
    base = _run([sys.executable, "-c", "pass"])
    print(f"a bare python process: {base:,.0f} MiB peak resident")
    print("each package imported alone (peak resident over a bare python process):")
    for module in ALONE:
        try:
            mib = _run([sys.executable, "-c", f"import {module}"], quiet=True)
        except SystemExit:
            print(f"  {module:<18} not installed")
            continue
        print(f"  {module:<18} +{mib - base:6,.0f} MiB")
    with tempfile.TemporaryDirectory(prefix="gpt_jax_memory_") as tmp:
        peak = _run([sys.executable, __file__, "--mode", "_phases", *_run_flags(tmp, config_argv)],
                    quiet=False)
    print(f"peak resident of the run (wait4): {peak:,.0f} MiB")


class _PhaseLog:
    """Prints the resident set and glibc's heap after each phase of a run."""

    def __init__(self):
        self.last_rss = 0.0
        self.heap = None
        print(f"{'phase':<44} {'rss':>7} {'+rss':>7} {'peak':>7} {'files':>7} {'heap used':>10} "
              f"{'heap kept':>10}   (MiB)", flush=True)

    def __call__(self, phase: str) -> None:
        status = _status()
        heap = ""
        if self.heap is not None:
            info = self.heap()
            heap = f"{info.uordblks / MIB:10,.0f} {info.fordblks / MIB:10,.0f}"
        print(f"{phase:<44} {status['VmRSS']:7,.0f} {status['VmRSS'] - self.last_rss:+7,.0f} "
              f"{status['VmHWM']:7,.0f} {status['RssFile']:7,.0f} {heap}", flush=True)
        self.last_rss = status["VmRSS"]


def _phases_child(config_argv: list[str]) -> None:
    phase = _PhaseLog()
    phase("python started")
    import jax  # noqa: F401

    phase("import jax")
    import flax.linen  # noqa: F401

    phase("import flax")
    import optax  # noqa: F401

    phase("import optax")
    import orbax.checkpoint  # noqa: F401

    phase("import orbax.checkpoint")
    sys.path.insert(0, str(ROOT))
    import train
    from gpt_jax import data, host_memory, loop, seeds, trainer

    phase("import train (the rest of gpt-jax)")
    heavy = [m for m in ("matplotlib", "tensorboardX", "torch", "scipy") if m in sys.modules]
    print(f"  imported by now among matplotlib, tensorboardX, torch, scipy: {heavy or 'none'}")

    def after(owner, name: str, label, times: int = 1):
        """Wraps owner.name to log a phase after its first `times` calls."""
        original, calls = getattr(owner, name), [0]

        def wrapped(*args, **kwargs):
            out = original(*args, **kwargs)
            calls[0] += 1
            if calls[0] <= times:
                phase(label(calls[0]) if callable(label) else label)
            return out

        setattr(owner, name, wrapped)

    after(data, "load_dataset", "data loaded")
    after(seeds.Lanes, "initial_state", "train state initialized")
    after(seeds.Lanes, "open_writers", "metrics writers opened (tensorboardX)")
    after(trainer, "_compile", "train step compiled")
    after(loop.Loop, "begin", "step 0 evaluated (eval step compiled)")
    after(loop.StepPacer, "__call__", lambda n: f"after step {n}", times=2)
    after(loop.Loop, "save", "first checkpoint save started")
    after(loop.Loop, "record", lambda n: f"log record {n}", times=3)
    after(loop.Loop, "close", "loop closed (last save written)")

    compile_original = trainer._compile

    def compile_and_report(*args, **kwargs):
        compiled = compile_original(*args, **kwargs)
        temp = compiled.memory_analysis().temp_size_in_bytes
        print(f"  the compiled step's temporary buffer: {temp / MIB:,.1f} MiB", flush=True)
        return compiled

    trainer._compile = compile_and_report
    original_retain = host_memory.retain_freed_memory

    def retain():  # train.py sets glibc up here; the heap figures start from then
        out = original_retain()
        phase.heap = _heap_info()
        return out

    host_memory.retain_freed_memory = retain
    train.main([sys.argv[0], *config_argv])
    phase("end of run")


def _heap_info():
    """Returns a function giving glibc's mallinfo2, or None off glibc."""
    from gpt_jax import host_memory

    libc = host_memory._glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = host_memory._MallInfo2
    return libc.mallinfo2


if __name__ == "__main__":
    main()
