import json
import os
import pickle
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from ml_collections import ConfigDict

from gpt_jax import data, shards, tokenization
from gpt_jax.errors import UserError


def _data_config(path="", cache_dir=""):
    return ConfigDict({"path": str(path), "cache_dir": str(cache_dir), "val_fraction": 0.1})


def test_char_tokenizer_round_trip_and_table():
    tok = tokenization.CharTokenizer.from_text("hello, world")
    assert tok.chars == " ,dehlorw"
    assert tok.decode(tok.encode("hold")) == "hold"
    assert tokenization.tokenizer_from_json(json.loads(json.dumps(tok.to_json()))) == tok


def test_unknown_character_is_a_user_error():
    with pytest.raises(UserError, match=r"outside the model's vocabulary \('Z'\)"):
        tokenization.CharTokenizer("abc").encode("abZ")


def test_shakespeare_prepares_like_nanogpt(tmp_path):
    ds = data.load_dataset(_data_config(cache_dir=tmp_path))
    # nanoGPT's shakespeare_char/prepare.py: 65 characters, 1,003,854 train / 111,540 val.
    assert ds.tokenizer.vocab_size == 65
    assert (len(ds.train), len(ds.val)) == (1_003_854, 111_540)
    assert ds.train.dtype == np.uint16 and isinstance(ds.train, shards.ShardedTokens)
    assert ds.tokenizer.decode(ds.train[:14]) == "First Citizen:"
    assert ds.directory.parent.parent == tmp_path  # under the cache, keyed by hash
    again = data.load_dataset(_data_config(cache_dir=tmp_path))
    assert again.directory == ds.directory


def test_any_text_file_is_prepared_in_the_cache_not_beside_it(tmp_path):
    corpus = tmp_path / "user" / "corpus.txt"
    corpus.parent.mkdir()
    corpus.write_text("ab" * 500 + "ç\n", encoding="utf-8")
    ds = data.load_dataset(_data_config(corpus, tmp_path / "cache"))
    assert os.listdir(corpus.parent) == ["corpus.txt"]
    assert ds.tokenizer.chars == "\nabç"
    assert len(ds.train) + len(ds.val) == 1002 and len(ds.val) == 1002 - int(1002 * 0.9)
    meta = json.loads((ds.directory / "meta.json").read_text())
    assert meta["tokenizer"] == {"kind": "char", "chars": "\nabç"}


def test_nanogpt_prepared_directory_is_read_as_is(tmp_path):
    chars = sorted(set("to be or not"))
    np.array([1, 2, 3, 4], dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.array([4, 3], dtype=np.uint16).tofile(tmp_path / "val.bin")
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)),
            "stoi": {c: i for i, c in enumerate(chars)}}
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    ds = data.load_dataset(_data_config(tmp_path))
    assert ds.tokenizer.chars == "".join(chars)
    np.testing.assert_array_equal(ds.train, [1, 2, 3, 4])


def test_batches_are_a_pure_function_of_seed_and_step():
    tokens = np.arange(1000, dtype=np.uint16)
    kwargs = {"batch_size": 4, "block_size": 8, "seed": 3}
    x1, y1 = data.get_batch(tokens, step=7, **kwargs)
    x2, y2 = data.get_batch(tokens, step=7, **kwargs)
    x3, _ = data.get_batch(tokens, step=8, **kwargs)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    assert x1.shape == (4, 8) and x1.dtype == np.int32
    np.testing.assert_array_equal(x1[:, 1:], y1[:, :-1])  # targets are inputs shifted by one
    np.testing.assert_array_equal(np.diff(x1, axis=1), 1)  # contiguous crops


def test_crops_reach_the_last_token():
    tokens = np.arange(10, dtype=np.uint16)
    ends = {int(data.get_batch(tokens, batch_size=8, block_size=8, seed=0, step=s)[1].max())
            for s in range(20)}
    assert ends == {8, 9}


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"  \n", "is empty"),
    (b"caf\xe9 latin-1", "is not UTF-8 text (byte 0xe9 at offset 3)"),
])
def test_bad_corpora_are_user_errors(tmp_path, content, message):
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(content)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        data.load_dataset(_data_config(corpus, tmp_path / "cache"))


def test_corpus_too_short_for_the_block(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcdefghij" * 10)
    ds = data.load_dataset(_data_config(corpus, tmp_path / "cache"))
    with pytest.raises(UserError, match="val split .* has 10 tokens but a crop needs "
                                        "block_size\\+1 = 17"):
        ds.check_fits(16)


def test_missing_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.load_dataset(_data_config(tmp_path / "nope.txt"))


def test_offline_without_a_copy_says_how_to_supply_it(tmp_path, monkeypatch):
    monkeypatch.delenv(data.SHAKESPEARE_ENV, raising=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match=f"could not be downloaded .* {data.SHAKESPEARE_ENV}="):
        data.load_dataset(_data_config(cache_dir=tmp_path))


def test_download_is_verified_and_kept(tmp_path, monkeypatch):
    payload = Path(os.environ[data.SHAKESPEARE_ENV])  # the offline copy plays the server
    monkeypatch.delenv(data.SHAKESPEARE_ENV)
    calls = []

    class Response:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            pass

        def read(self):
            return payload.read_bytes()

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: calls.append(a) or Response())
    path = data.corpus_path(_data_config(cache_dir=tmp_path))
    assert path == tmp_path / "tinyshakespeare.txt" and path.stat().st_size == 1_115_394
    data.corpus_path(_data_config(cache_dir=tmp_path))
    assert len(calls) == 1  # the second call reuses the verified download


def test_env_copy_with_wrong_hash_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "input.txt"
    fake.write_text("not shakespeare")
    monkeypatch.setenv(data.SHAKESPEARE_ENV, str(fake))
    with pytest.raises(UserError, match="is not tiny-shakespeare"):
        data.load_dataset(_data_config(cache_dir=tmp_path))
