"""Tokenising a large parquet corpus: `python -m gpt_jax.prepare` against a plain tiktoken loop.

    python benchmarks/prepare_speed.py                    # 50 and 200 MB of text
    python benchmarks/prepare_speed.py --mb 200 --rounds 2

For each size it writes a parquet corpus (tiny-shakespeare's paragraphs as documents, cycled
with a counter until the text column holds --mb MB; row groups of 1000 rows, FineWeb's `text`
column) and then, alternating over --rounds rounds, times two whole processes on it:
- gpt-jax: `python -m gpt_jax.prepare CORPUS --out DIR --shard_tokens 100000000`;
- plain: one Python process reading the same column a row group at a time with pyarrow and
  encoding each with tiktoken's `encode_ordinary_batch` (threaded inside tiktoken), appending
  the ids and the end-of-text token to one file.
Each line gives tokens/s and the peak resident memory of the largest process of the run
(the kernel's ru_maxrss over the run's processes, workers included), and each size ends with
`mb=N prepare_tokens_per_sec=N plain_tokens_per_sec=N ratio=N.NN prepare_peak_mib=N`
(medians over rounds). Needs pyarrow (the `data` extra).
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from gpt_jax import config, data, entry  # noqa: E402
from gpt_jax.errors import UserError  # noqa: E402

PLAIN = """
import sys, numpy as np, pyarrow.parquet as pq, tiktoken
enc, tokens = tiktoken.get_encoding("gpt2"), 0
with open(sys.argv[2], "wb") as out:
    for batch in pq.ParquetFile(sys.argv[1]).iter_batches(batch_size=1000, columns=["text"]):
        for ids in enc.encode_ordinary_batch(batch.column(0).to_pylist()):
            ids.append(enc.eot_token)
            out.write(np.asarray(ids, np.uint16).tobytes())
            tokens += len(ids)
print(tokens)
"""


def write_corpus(path: Path, megabytes: int) -> int:
    """Writes the parquet corpus; returns the UTF-8 bytes of its text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = data.corpus_path(config.base_config().data).read_text(encoding="utf-8")
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    target, written, i = megabytes << 20, 0, 0
    with pq.ParquetWriter(path, pa.schema([("text", pa.string())])) as writer:
        while written < target:
            rows = [f"{i + k}. {paragraphs[(i + k) % len(paragraphs)]}\n" for k in range(1000)]
            i += 1000
            written += sum(len(r.encode()) for r in rows)
            writer.write_table(pa.table({"text": rows}))
    return written


def run(command: list[str]) -> tuple[float, float, str]:
    """Returns (seconds, peak resident MiB of its largest process, stdout) of a command, run
    in a fresh process whose own children count too."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "s = time.perf_counter() - t; "
             "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss; "
             "print(r.returncode, s, peak, sep='\\n'); print(r.stdout[-2000:] + r.stderr[-2000:])")
    out = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True,
                         text=True, check=True).stdout.split("\n", 3)
    if out[0] != "0":
        raise UserError(f"{' '.join(command[:4])} failed: {out[3][-500:]}")
    return float(out[1]), int(out[2]) / 1024, out[3]


def measure(args) -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise UserError("the benchmark needs pyarrow: pip install -e \".[data]\"") from None
    for megabytes in args.mb:
        with tempfile.TemporaryDirectory(prefix="gpt_jax_prepare_") as tmp:
            corpus = Path(tmp) / "corpus.parquet"
            text_bytes = write_corpus(corpus, megabytes)
            print(f"corpus: {text_bytes / 2**20:.0f} MB of text in "
                  f"{corpus.stat().st_size / 2**20:.0f} MB of parquet; {os.cpu_count()} CPUs",
                  flush=True)
            rates = {"prepare": [], "plain": []}
            peaks = []
            for r in range(args.rounds):
                order = ["prepare", "plain"] if r % 2 == 0 else ["plain", "prepare"]
                for name in order:
                    out = Path(tmp) / f"out{r}"
                    if name == "prepare":
                        seconds, peak, _ = run([sys.executable, "-m", "gpt_jax.prepare",
                                                str(corpus), "--out", str(out),
                                                "--shard_tokens", "100000000"])
                        meta = json.loads((out / "meta.json").read_text())
                        tokens = meta["train_tokens"] + meta["val_tokens"]
                        peaks.append(peak)
                    else:
                        seconds, peak, stdout = run([sys.executable, "-c", PLAIN, str(corpus),
                                                     str(out) + ".bin"])
                        tokens = int(stdout.split()[0])
                    rates[name].append(tokens / seconds)
                    print(f"  round {r + 1} {name:<8} {tokens:,} tokens in {seconds:6.1f} s: "
                          f"{tokens / seconds:10,.0f} tokens/s, peak resident {peak:,.0f} MiB",
                          flush=True)
            ours, plain = (float(np.median(rates[k])) for k in ("prepare", "plain"))
            print(f"mb={megabytes} prepare_tokens_per_sec={ours:.0f} "
                  f"plain_tokens_per_sec={plain:.0f} ratio={ours / plain:.2f} "
                  f"prepare_peak_mib={float(np.median(peaks)):.0f}", flush=True)


def main(argv: list[str]) -> None:
    p = entry.ArgumentParser(command="python benchmarks/prepare_speed.py", description=__doc__)
    p.add_argument("--mb", type=lambda s: [int(m) for m in s.split(",")], default=[50, 200],
                   help="corpus sizes in MB of text, comma-separated (default 50,200)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    entry.main(lambda: measure(args))


if __name__ == "__main__":
    main(sys.argv[1:])
