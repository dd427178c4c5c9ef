"""The loss, and the per-step records written to stdout and OUT_DIR/metrics.jsonl."""

import json
import math
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

    def __init__(self, out_dir, resume_step: int | None = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # Records logged after the checkpoint we resume from will be written again.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


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
    return " | ".join(parts)
