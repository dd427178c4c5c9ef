import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import tiktoken
from conftest import run_cli
from ml_collections import ConfigDict

from gpt_jax import data, prepare, tokenization
from gpt_jax.errors import UserError

ENC = tiktoken.get_encoding("gpt2")
EOT = ENC.eot_token

# Every way whitespace meets text: blank lines, indents, trailing spaces, tabs, CRLF, NBSP,
# ideographic spaces, multi-byte letters, digits, contractions and long unbroken runs.
ADVERSARIAL = (
    "First line\n\n\nSecond  line with  two spaces \n   indented\n\tTabbed\t\tthing\n"
    "trailing   \n\n \n  \nCRLF line\r\nnext\r\n\r\nafter blank\r\n"
    "caf\u00e9 na\u00efve \u00a0nbsp\u00a0 \u3000\u5b57\u3000\u5b57 \U0001f600 emoji\n"
    "it's they're we'll I'd 12345 678,90 3.14 ...!!! ??\n"
    + "x" * 300 + " " + "y\u00e9" * 100 + "\n"
    "\x1c sep \x0b vt \x0c ff \x85 nel \u2028 ls\n"
    "literal <|endoftext|> stays text\n\n\n\n   \n"
)


def _tokens(out: Path) -> tuple[np.ndarray, np.ndarray]:
    return (np.fromfile(out / "train.bin", dtype=data.TOKEN_DTYPE),
            np.fromfile(out / "val.bin", dtype=data.TOKEN_DTYPE))


def _prepare(source, out, **kwargs) -> dict:
    return prepare.prepare_bpe_corpus(source, out, show_progress=False, **kwargs)


def test_shakespeare_tokens_equal_the_whole_text_encoding(tmp_path):
    path = Path(os.environ[data.SHAKESPEARE_ENV])
    expected = ENC.encode_ordinary(path.read_text(encoding="utf-8")) + [EOT]
    meta = _prepare(path, tmp_path / "bpe")
    train, val = _tokens(tmp_path / "bpe")
    print(f"tiny-shakespeare: {len(train):,} train + {len(val):,} val = {len(expected):,}")
    assert len(expected) == 338_026  # nanoGPT's 301,966 + 36,059 without the EOT, split apart
    assert np.concatenate([train, val]).tolist() == expected  # the split cut changes nothing
    # The split byte 1,003,854 falls in "here?"; val starts at the "\n" after it.
    assert (len(train), len(val)) == (301_967, 36_059)
    assert 0.08 < len(val) / len(expected) < 0.12
    assert ENC.decode(val[:6].tolist()).startswith("\n\nGREMIO:")
    assert meta == {"tokenizer": {"kind": "tiktoken", "encoding": "gpt2"}, "vocab_size": 50257,
                    "train_tokens": 301_967, "val_tokens": 36_059, "documents": 1,
                    "source": str(path), "input_bytes": 1_115_394, "val_fraction": 0.1}
    ds = data.read_prepared(tmp_path / "bpe")
    assert ds.tokenizer == tokenization.TiktokenTokenizer("gpt2") and len(ds.val) == 36_059
    assert sorted(os.listdir(tmp_path)) == ["bpe"]  # no temporary directory left behind


@pytest.mark.parametrize("chunk_bytes", [1, 5, 16, 64])
def test_chunks_encode_like_the_whole_text(chunk_bytes, tmp_path):
    path = tmp_path / "adversarial.txt"
    path.write_text(ADVERSARIAL * 3, encoding="utf-8")
    chunks = [text for _, _, text in prepare._read_chunks(path, chunk_bytes)]
    assert len(chunks) >= 10 and "".join(chunks) == ADVERSARIAL * 3
    assert [t for c in chunks for t in ENC.encode_ordinary(c)] == ENC.encode_ordinary(
        ADVERSARIAL * 3)
    _prepare(path, tmp_path / "out", chunk_bytes=chunk_bytes, val_fraction=0.3)
    assert np.concatenate(_tokens(tmp_path / "out")).tolist() == ENC.encode_ordinary(
        ADVERSARIAL * 3) + [EOT]


def test_cutting_after_a_newline_would_change_the_tokens():
    # Why chunks end before whitespace: "\n\n" at the end of a chunk is one token (628).
    assert ENC.encode_ordinary("a\n\n") + ENC.encode_ordinary("b") != ENC.encode_ordinary(
        "a\n\nb")


def test_random_texts_encode_like_the_whole_text(tmp_path):
    rng = random.Random(0)
    alphabet = ["a", "Z", "é", "字", "7", ".", "'", "s", " ", "  ", "\n", "\n\n", "\t", "\r\n",
                "\u00a0", "\u3000", "\U0001f600", "<|endoftext|>"]
    path = tmp_path / "random.txt"
    for _ in range(200):
        text = "".join(rng.choices(alphabet, k=rng.randint(1, 60)))
        path.write_text(text, encoding="utf-8")
        chunks = [t for _, _, t in prepare._read_chunks(path, rng.randint(1, 12),
                                                         cut_at=rng.randint(0, 80))]
        assert "".join(chunks) == text
        assert [t for c in chunks for t in ENC.encode_ordinary(c)] == ENC.encode_ordinary(text)


def test_a_pool_of_workers_writes_the_same_bytes(tmp_path):
    path = tmp_path / "adversarial.txt"
    path.write_text(ADVERSARIAL * 20, encoding="utf-8")
    one = _prepare(path, tmp_path / "one", chunk_bytes=256, workers=1)
    two = _prepare(path, tmp_path / "two", chunk_bytes=256, workers=2)  # a real spawn Pool
    assert one == two
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_directory_documents_in_sorted_order(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "b").mkdir(parents=True)
    (corpus / ".git").mkdir()
    texts = {"a.txt": "Alpha doc.\n", "b/c.md": "Beta\n\ndoc", "b/d": "Gamma  ", "e.txt": "Delta"}
    for name, text in texts.items():
        (corpus / name).write_text(text, encoding="utf-8")
    (corpus / ".hidden.txt").write_text("skipped")
    (corpus / ".git" / "HEAD").write_text("skipped")
    (corpus / "empty.txt").write_text("")
    meta = _prepare(corpus, tmp_path / "out", chunk_bytes=4, val_fraction=0.2)
    train, val = _tokens(tmp_path / "out")
    expected = [ENC.encode_ordinary(t) + [EOT] for t in texts.values()]  # already sorted
    assert train.tolist() == [t for doc in expected[:3] for t in doc] and val.tolist() == expected[3]
    assert meta["documents"] == 4 and meta["input_bytes"] == sum(map(len, texts.values()))


def test_directory_whose_last_document_starts_before_the_split(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "1.txt").write_text("short")
    (corpus / "2.txt").write_text("a much longer document than the first one")
    with pytest.raises(UserError, match="val split is empty.*raise --val_fraction"):
        _prepare(corpus, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_jsonl_records_are_documents(tmp_path):
    records = [{"text": "One, the first and longest record of them all.\n\n", "id": 1},
               {"text": "  Two  "}, {"text": ""}, {"text": "Three."}]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n\n"
                    + "\n".join(json.dumps(r) for r in records[2:]) + "\n")
    last_line = len(json.dumps(records[3])) + 1
    meta = _prepare(path, tmp_path / "out", val_fraction=1.5 * last_line / path.stat().st_size)
    train, val = _tokens(tmp_path / "out")
    expected = [ENC.encode_ordinary(r["text"]) + [EOT] for r in records]
    assert train.tolist() == [t for doc in expected[:3] for t in doc]
    assert val.tolist() == expected[3]
    assert meta["documents"] == 4

    (tmp_path / "other.jsonl").write_text(json.dumps({"body": "Hello there."}) + "\n"
                                          + json.dumps({"body": "General Kenobi."}) + "\n")
    meta = _prepare(tmp_path / "other.jsonl", tmp_path / "other", text_field="body",
                    val_fraction=0.6)
    assert (meta["documents"], meta["val_tokens"]) == (2, len(ENC.encode_ordinary(
        "General Kenobi.")) + 1)


def test_streaming_encodes_bounded_chunks(tmp_path, monkeypatch):
    rng = random.Random(1)
    words = ["the", "king", "queen", "\n", "\n\n", "  ", "é", "字字", "1984,"]
    path = tmp_path / "big.txt"
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < 2_000_000:
            f.write(" ".join(rng.choices(words, k=1000)))
    sizes = []
    encode = tiktoken.Encoding.encode_ordinary
    monkeypatch.setattr(tiktoken.Encoding, "encode_ordinary",
                        lambda self, text: sizes.append(len(text)) or encode(self, text))
    meta = _prepare(path, tmp_path / "out", chunk_bytes=64 << 10, workers=1)
    assert len(sizes) >= 30 and max(sizes) <= 2 * (64 << 10)
    assert meta["train_tokens"] + meta["val_tokens"] == len(
        encode(ENC, path.read_text(encoding="utf-8"))) + 1


def test_a_failed_run_leaves_no_output(tmp_path):
    path = tmp_path / "late_error.txt"
    path.write_bytes(b"fine text here\n" * 1000 + b"caf\xe9\n")
    with pytest.raises(UserError, match=r"not UTF-8 text \(byte 0xe9 at offset 15003\)"):
        _prepare(path, tmp_path / "out", chunk_bytes=100)
    assert sorted(os.listdir(tmp_path)) == ["late_error.txt"]


def test_overwrite_replaces_a_prepared_corpus(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("Some words.\nMore words here.\n")
    _prepare(path, tmp_path / "out", val_fraction=0.5)
    with pytest.raises(UserError, match="already holds a prepared corpus: pass --overwrite"):
        _prepare(path, tmp_path / "out", val_fraction=0.5)
    meta = _prepare(path, tmp_path / "out", val_fraction=0.3, overwrite=True)
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta
    assert sorted(os.listdir(tmp_path)) == ["c.txt", "out"]


def _data_config(path="", cache_dir="", tokenizer="gpt2"):
    return ConfigDict({"path": str(path), "cache_dir": str(cache_dir), "val_fraction": 0.1,
                       "tokenizer": tokenizer})


def test_load_dataset_prepares_bpe_in_the_cache(tmp_path, monkeypatch):
    ds = data.load_dataset(_data_config(cache_dir=tmp_path))
    assert isinstance(ds.tokenizer, tokenization.TiktokenTokenizer)
    assert ds.tokenizer.vocab_size == 50257
    assert (len(ds.train), len(ds.val)) == (301_967, 36_059)
    assert ds.directory.parent == tmp_path / "gpt2"  # keyed by hash, not beside the text
    assert ds.tokenizer.decode(ds.train[:3]) == "First Citizen:"

    def fail(*args, **kwargs):
        raise AssertionError("prepared twice")

    monkeypatch.setattr(prepare, "prepare_bpe_corpus", fail)
    assert data.load_dataset(_data_config(cache_dir=tmp_path)).directory == ds.directory


def test_load_dataset_reads_jsonl_with_gpt2(tmp_path):
    path = tmp_path / "user" / "docs.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps({"text": f"Document number {i}."}) + "\n"
                            for i in range(20)))
    ds = data.load_dataset(_data_config(path, tmp_path / "cache"))
    assert os.listdir(path.parent) == ["docs.jsonl"]
    assert ds.tokenizer.decode(ds.train[:5]) == "Document number 0.<|endoftext|>"
    assert json.loads((ds.directory / "meta.json").read_text())["documents"] == 20


def test_unknown_tokenizer_is_a_user_error():
    with pytest.raises(UserError, match=r"data.tokenizer='xyz' is unknown: use 'char' or 'gpt2'"):
        data.load_dataset(_data_config(tokenizer="xyz"))


def test_cli_prepares_and_prints_a_summary(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("Hello world.\n" * 100)
    result = run_cli("-m", "gpt_jax.prepare", path, "--out", tmp_path / "out", timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"prepared {tmp_path / 'out'}: 361 train + 40 val tokens "
                                    "(401 total) from 1 document(s) in ")
    assert data.read_prepared(tmp_path / "out").tokenizer == tokenization.TiktokenTokenizer("gpt2")


@pytest.mark.parametrize("case, message", [
    ("missing", "nope.txt does not exist"),
    ("bad_json", "bad.jsonl line 2 is not JSON"),
    ("no_field", "bad.jsonl line 1 has no 'text' field: pass --text_field"),
    ("latin1", "bad.txt is not UTF-8 text (byte 0xe9 at offset 3)"),
    ("empty", "bad.txt is empty"),
    ("prepared", "already holds a prepared corpus: pass --overwrite"),
    ("val_fraction", "val_fraction must be in (0, 1), got 1.5"),
])
def test_cli_errors_are_one_line(tmp_path, case, message):
    out, extra = tmp_path / "out", []
    source = tmp_path / ("bad.jsonl" if case in ("bad_json", "no_field") else "bad.txt")
    if case == "missing":
        source = tmp_path / "nope.txt"
    elif case == "bad_json":
        source.write_text('{"text": "fine"}\n{"text": oops}\n')
    elif case == "no_field":
        source.write_text('{"body": "fine"}\n')
    elif case == "latin1":
        source.write_bytes(b"caf\xe9 au lait\n")
    elif case == "empty":
        source.write_text(" \n\n ")
    else:
        source.write_text("Some words.\nMore words here.\n")
        if case == "prepared":
            _prepare(source, out, val_fraction=0.5)
        else:
            extra = ["--val_fraction", "1.5"]
    result = run_cli("-m", "gpt_jax.prepare", source, "--out", out, *extra, timeout=60)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and len(errors) == 1, result.stderr
    assert message in errors[0] and "Traceback" not in result.stderr


def test_text_without_a_cut_after_the_split_has_no_val(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("a few words " * 10 + "x" * 200)
    with pytest.raises(UserError, match="val split is empty: in .* there is no cut point"):
        _prepare(path, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["c.txt"]
