"""The loss, and the per-step records written to stdout and OUT_DIR/metrics.jsonl."""

import functools
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Returns the mean next-token cross-entropy in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_BTV.astype(jnp.float32), targets_BT).mean()


class MetricsWriter:
    """Appends one JSON object per logged step to OUT_DIR/metrics.jsonl, flushed per line."""

    def __init__(self, out_dir, resume_step: int | None = None, enabled: bool = True):
        self.enabled = enabled  # only process 0 writes in multi-process runs
        if not enabled:
            return
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            # Records logged after the checkpoint we resume from (all of them on a fresh start)
            # will be written again; a line cut short by a kill is dropped.
            kept = [line for line in self.path.read_text().splitlines()
                    if resume_step and _step_of(line) is not None
                    and _step_of(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()


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
    parts.append(f"lr {record['lr']:.3e}")
    if "ms_per_step" in record:
        parts.append(f"{record['ms_per_step']:.1f} ms/step")
        parts.append(f"{record['tokens_per_sec']:,.0f} tokens/s")
    if "mfu" in record:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
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


def peak_flops_per_device(device=None) -> tuple[float, str]:
    """Returns (peak FLOP/s of one device, where the figure comes from).

    Accelerators are looked up in PEAK_FLOPS (bf16 dense); a CPU is measured once with a
    float32 matmul probe, since its peak depends on the machine and the cores it may use.
    """
    device = device or jax.devices()[0]
    kind = device.device_kind.lower()
    for name, peak in PEAK_FLOPS.items():
        if name in kind:
            return peak, f"{device.device_kind} bf16 peak"
    if device.platform == "cpu":
        return cpu_matmul_peak(), "float32 matmul probe"
    return float("nan"), f"unknown peak for {device.device_kind}"


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
