"""FLOPs per token and the peak that MFU divides by."""

import subprocess
import sys
from types import SimpleNamespace

import pytest

from gpt_jax import metrics
from gpt_jax.model import GPTConfig, count_params


def test_flops_per_token_of_gpt2_is_nanogpts_estimate():
    # nanoGPT's estimate_mfu: N = 123.65M (position embeddings out), 6N + 12 L (H Q) T.
    n = count_params(GPTConfig())["non_embedding"]
    assert n == 123_653_376
    assert metrics.flops_per_token(n, 12, 768, 1024) == 6 * 123_653_376 + 12 * 12 * 768 * 1024


def _devices(kind, platform, processes):
    return [SimpleNamespace(device_kind=kind, platform=platform, process_index=p)
            for p in processes]


def test_accelerator_peaks_add_up_over_devices():
    peak, source = metrics.peak_flops(_devices("NVIDIA H100 80GB HBM3", "gpu", [0] * 8))
    assert peak == 8 * 989e12
    assert source == "NVIDIA H100 80GB HBM3 bf16 peak, x 8 devices"
    peak, source = metrics.peak_flops(_devices("TPU v5 lite", "tpu", [0, 0, 1, 1]))
    assert (peak, source) == (4 * 197e12, "TPU v5 lite bf16 peak, x 4 devices")


@pytest.mark.parametrize("processes, hosts", [([0] * 8, 1), ([0, 0, 1, 1], 2)])
def test_simulated_cpu_devices_share_their_hosts_probe(processes, hosts):
    # Eight simulated devices on one host share its cores: the probe already measured them all.
    peak, source = metrics.peak_flops(_devices("cpu", "cpu", processes))
    assert peak == hosts * metrics.cpu_matmul_peak()
    assert source.startswith("float32 matmul probe")
    assert ("x 2 hosts" in source) == (hosts == 2)


def test_unknown_accelerators_have_no_peak():
    peak, source = metrics.peak_flops(_devices("Mystery Chip", "gpu", [0]))
    assert peak != peak  # NaN: never an invented figure
    assert source == "unknown peak for Mystery Chip"
    record = {"step": 10, "loss": 2.5, "lr": 1e-3, "ms_per_step": 50.0,
              "tokens_per_sec": 15360.0, "mfu": 15360.0 * 1e9 / peak}
    assert "MFU" not in metrics.format_record(record)  # rather than "MFU nan%"
    assert "MFU 50.0%" in metrics.format_record({**record, "mfu": 0.5})


def test_the_metrics_writer_does_not_import_torch(tmp_path):
    # tensorboardX imports torch when it is installed: 180 MiB resident in a run that only
    # logs floats. Nor does the trainer import matplotlib (gpt_jax.report plots, lazily).
    probe = f"""
import importlib.util, sys
from gpt_jax import metrics, trainer
writer = metrics.MetricsWriter({str(tmp_path)!r})
writer.write({{"step": 1, "train_loss": 2.5}})
writer.close()
heavy = [m for m in ("torch", "matplotlib") if m in sys.modules]
assert not heavy, heavy
if importlib.util.find_spec("torch") is not None:
    import torch  # still importable afterwards
"""
    subprocess.run([sys.executable, "-c", probe], check=True)
    assert list((tmp_path / "tensorboard").iterdir())
