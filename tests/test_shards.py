"""llm.c token shards: read as one array (batches equal the concatenated reading), bad shards."""

import json
from pathlib import Path

import numpy as np
import pytest

from gpt_jax import data, shards, tokenization, trainer
from gpt_jax.errors import UserError

TRAIN_LENGTHS = (1000, 777, 1, 1500)  # 777 and 1 are no multiple of any block size


def _write_corpus(directory, seed=0):
    """Writes train shards of TRAIN_LENGTHS and two val shards; returns the concatenations."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    train = [rng.integers(0, 50257, n).astype(np.uint16) for n in TRAIN_LENGTHS]
    val = [rng.integers(0, 50257, n).astype(np.uint16) for n in (300, 450)]
    for i, tokens in enumerate(val):
        shards.write_shard(directory / f"fineweb_val_{i:06d}.bin", tokens)
    for i, tokens in enumerate(train):
        shards.write_shard(directory / f"fineweb_train_{i + 1:06d}.bin", tokens)
    return np.concatenate(train), np.concatenate(val)


def test_a_shard_has_llm_c_header_and_uint16_tokens(tmp_path):
    tokens = np.array([50256, 0, 65535, 7], np.uint16)
    shards.write_shard(tmp_path / "x_train_000000.bin", tokens)
    raw = (tmp_path / "x_train_000000.bin").read_bytes()
    header = np.frombuffer(raw[:1024], "<i4")
    assert header[:3].tolist() == [20240520, 1, 4] and not header[3:].any()
    assert np.frombuffer(raw[1024:], "<u2").tolist() == tokens.tolist()
    assert shards.read_header(tmp_path / "x_train_000000.bin") == 4


def test_batches_from_shards_equal_the_concatenated_tokens(tmp_path):
    train, val = _write_corpus(tmp_path / "fineweb")
    ds = data.read_prepared(tmp_path / "fineweb")
    assert len(ds.train) == len(train) and len(ds.val) == len(val)
    assert ds.tokenizer.vocab_size == 50257  # llm.c shards are GPT-2 tokens
    spans = 0
    for step in range(30):
        kwargs = {"batch_size": 8, "block_size": 64, "seed": 5, "step": step}
        for got, want in zip(data.get_batch(ds.train, **kwargs), data.get_batch(train, **kwargs)):
            np.testing.assert_array_equal(got, want)
        starts = np.random.default_rng((5, 0, step)).integers(0, len(train) - 64, size=8)
        spans += int(np.sum((starts < 1000) & (starts + 64 >= 1000)))
    assert spans > 0  # some crops read across a shard boundary
    maps = Path("/proc/self/maps").read_text()
    assert not any(str(p) in maps for p in ds.train.paths)  # no shard stays mapped
    np.testing.assert_array_equal(ds.val[np.arange(len(val))], val)
    np.testing.assert_array_equal(ds.train[995:1010], train[995:1010])
    np.testing.assert_array_equal(ds.train[-5:], train[-5:])
    np.testing.assert_array_equal(ds.train[1800:1700:-7], train[1800:1700:-7])
    assert int(ds.train[-1]) == int(train[-1])


def test_bad_shards_are_one_line_errors_naming_the_file(tmp_path):
    _write_corpus(tmp_path / "c")
    bad = tmp_path / "c" / "fineweb_train_000002.bin"
    raw = bytearray(bad.read_bytes())
    raw[:4] = np.array([12345], "<i4").tobytes()
    bad.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"fineweb_train_000002\.bin is not an llm\.c token shard"):
        data.read_prepared(tmp_path / "c")
    raw[:4] = np.array([20240520], "<i4").tobytes()
    bad.write_bytes(bytes(raw[:-2]))
    with pytest.raises(UserError, match=r"fineweb_train_000002\.bin is .* bytes but its header "):
        data.read_prepared(tmp_path / "c")
    raw[4:8] = np.array([2], "<i4").tobytes()
    bad.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="of version 2; only version 1"):
        data.read_prepared(tmp_path / "c")
    (tmp_path / "d").mkdir()
    shards.write_shard(tmp_path / "d" / "x_train_0.bin", np.zeros(10, np.uint16))
    with pytest.raises(UserError, match="no train.bin, val.bin, and no llm.c shards of both"):
        data.read_prepared(tmp_path / "d")


def test_training_reads_a_shard_directory(tmp_path, tiny_config):
    directory = tmp_path / "fineweb"
    _write_corpus(directory)
    vocab = {"kind": "char", "chars": "".join(chr(48 + i) for i in range(64))}
    (directory / "meta.json").write_text(json.dumps({"tokenizer": vocab}))  # a small vocabulary
    for path in directory.glob("*.bin"):  # ids below 64, for the tiny char model
        tokens = np.asarray(shards.ShardedTokens([path])[np.arange(shards.read_header(path))])
        shards.write_shard(path, tokens % 64)
    tiny_config.data.path = str(directory)
    tiny_config.max_steps = 4
    last = trainer.run(tiny_config)
    assert last["step"] == 4 and np.isfinite(last["val_loss"])


def test_prepare_writes_llm_c_shards_holding_the_same_tokens(tmp_path):
    from conftest import SHARED

    from gpt_jax import prepare

    source = SHARED / "data" / "tinyshakespeare.txt"
    plain = prepare.prepare_bpe_corpus(source, tmp_path / "plain", show_progress=False)
    meta = prepare.prepare_bpe_corpus(source, tmp_path / "shk", show_progress=False,
                                      shard_tokens=100_000)
    assert meta["shard_tokens"] == 100_000 and meta["train_tokens"] == plain["train_tokens"]
    names = sorted(p.name for p in (tmp_path / "shk").glob("*.bin"))
    n_train = -(-plain["train_tokens"] // 100_000)
    assert names == ["shk_train_%06d.bin" % i for i in range(1, n_train + 1)] + [
        "shk_val_000000.bin"]  # llm.c's numbering: val first, train from 1
    counts = [shards.read_header(tmp_path / "shk" / n) for n in names[:-1]]
    assert counts[:-1] == [100_000] * (n_train - 1) and sum(counts) == plain["train_tokens"]
    ds, reference = data.read_prepared(tmp_path / "shk"), data.read_prepared(tmp_path / "plain")
    for split in ("train", "val"):
        tokens = getattr(ds, split)
        np.testing.assert_array_equal(tokens[np.arange(len(tokens))], getattr(reference, split))
    assert ds.tokenizer == reference.tokenizer
    with pytest.raises(UserError, match="shard_tokens must be at least 1"):
        prepare.prepare_bpe_corpus(source, tmp_path / "bad", shard_tokens=0)


def test_prepare_reads_parquet_rows_as_documents(tmp_path):
    from conftest import require_pyarrow

    from gpt_jax import prepare

    pq = require_pyarrow()
    import pyarrow as pa

    texts = [f"Document {i}: " + "the quick brown fox " * (i % 7 + 1) for i in range(50)]
    (tmp_path / "pq").mkdir()
    for part, rows in enumerate((texts[:30], texts[30:])):  # FineWeb: a directory of files
        table = pa.table({"id": list(range(len(rows))), "text": rows})
        pq.write_table(table, tmp_path / "pq" / f"{part:03d}.parquet", row_group_size=8)
    meta = prepare.prepare_bpe_corpus(tmp_path / "pq", tmp_path / "out", val_fraction=0.1,
                                      show_progress=False, shard_tokens=500)
    enc = tokenization.TiktokenTokenizer("gpt2")
    expected = [enc.encode(t) + [50256] for t in texts]  # one document per row; the last 10% val
    ds = data.read_prepared(tmp_path / "out")
    for split, rows in (("train", expected[:45]), ("val", expected[45:])):
        tokens = getattr(ds, split)
        assert tokens[np.arange(len(tokens))].tolist() == [t for row in rows for t in row]
    assert meta["documents"] == 50
    with pytest.raises(UserError, match=r"has no 'body' column \(it has id, text\)"):
        prepare.prepare_bpe_corpus(tmp_path / "pq", tmp_path / "out2", text_field="body",
                                   show_progress=False)


def test_training_from_shards_larger_than_its_memory_limit_keeps_resident_memory_flat(tmp_path):
    # 832 MiB of shards under a 768 MiB memory cgroup (where one can be made: root, as in CI),
    # which also charges the shards' page cache: the loader reading 300 MiB of aligned crops
    # and a 40-step run both keep resident memory flat (benchmarks/shard_memory.py, small).
    from benchmarks import shard_memory

    shard_memory.write_shards(tmp_path / "s", 416 << 20, 100_000_000)
    limit = 768 << 20
    read = shard_memory.loader(tmp_path / "s", limit, n_tokens=150 << 20, batch=256,
                               block_size=1024)
    loader_rss = list(read["rss_by_batch"].values())
    assert len(loader_rss) >= 20 and max(loader_rss) - loader_rss[0] < 4, read
    model = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 64}
    figures = shard_memory.run(tmp_path / "s", tmp_path / "run", limit, 40, model, 8)
    flat = shard_memory.flat_figures(figures["rss_by_step"])
    assert len(figures["rss_by_step"]) >= 18 and flat["rss_growth_mib"] < 4, figures
    if figures["limited"]:
        assert read["cgroup_peak_mib"] <= 768 and figures["cgroup_peak_mib"] <= 768
