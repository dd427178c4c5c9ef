"""Corpora: preparation into uint16 token files, loading, and reproducible batch sampling."""

import dataclasses
import functools
import hashlib
import json
import os
import pickle
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import jax
import ml_collections
import numpy as np

from gpt_jax import sharding, shards, tokenization
from gpt_jax.errors import UserError
from gpt_jax.prepare import TOKEN_DTYPE, prepare_cached

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_ENV = "GPT_JAX_SHAKESPEARE"  # path of a local tinyshakespeare.txt
CACHE_ENV = "GPT_JAX_CACHE"  # default root of prepared corpora and downloads


# --------------------------------------------------------------------------- datasets


@dataclasses.dataclass
class Dataset:
    """Train and val tokens (shards.ShardedTokens: uint16, read a batch at a time from one
    train.bin/val.bin or from several shards) with the tokenizer that made them."""

    train: shards.ShardedTokens
    val: shards.ShardedTokens
    tokenizer: object
    directory: Path

    @functools.cached_property
    def token_bytes(self) -> np.ndarray:
        """The UTF-8 byte length of each token id (for bits per byte)."""
        return self.tokenizer.token_bytes()

    def check_fits(self, block_size: int) -> None:
        """Raises UserError if a split is too short for one crop of block_size + 1 tokens."""
        for split in ("train", "val"):
            n = len(getattr(self, split))
            if n < block_size + 1:
                raise UserError(
                    f"the {split} split of {self.directory} has {n} tokens but a crop needs "
                    f"block_size+1 = {block_size + 1}: use a longer corpus or lower "
                    "--config.model.block_size"
                )


def cache_root(data_config=None) -> Path:
    """Returns where downloads and prepared corpora live (data.cache_dir, else $GPT_JAX_CACHE,
    else ~/.cache/gpt_jax)."""
    root = (data_config.cache_dir if data_config else "") or os.environ.get(CACHE_ENV)
    return Path(root or "~/.cache/gpt_jax").expanduser()


def compile_cache_dir(data_config=None) -> Path:
    """Returns the default home of JAX's persistent compilation cache: <cache root>/jax_compile."""
    return cache_root(data_config) / "jax_compile"


def load_dataset(data_config) -> Dataset:
    """Returns the dataset the config names, preparing a text corpus on first use."""
    kind = data_config.get("tokenizer", "char")
    if kind not in ("char", "gpt2"):
        raise UserError(f"data.tokenizer={kind!r} is unknown: use 'char' or 'gpt2'")
    path = corpus_path(data_config)
    if path.is_dir():
        return read_prepared(path)
    if kind == "gpt2":
        prepared = prepare_cached(path, cache_root(data_config), data_config.val_fraction)
    else:
        prepared = prepare_char_corpus(path, cache_root(data_config), data_config.val_fraction)
    return read_prepared(prepared)


def corpus_path(data_config) -> Path:
    """Returns the path of the corpus: data.path, $GPT_JAX_SHAKESPEARE, or a download."""
    if data_config.path:
        path = Path(data_config.path).expanduser()
        if not path.exists():
            raise UserError(f"data.path {path} does not exist: point --config.data.path at a "
                            "UTF-8 text file or a prepared directory")
        return path
    env = os.environ.get(SHAKESPEARE_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise UserError(f"${SHAKESPEARE_ENV}={env} is not a file: point it at "
                            "tinyshakespeare.txt")
        _verify_shakespeare(path, f"${SHAKESPEARE_ENV}")
        return path
    return download_shakespeare(cache_root(data_config))


def _verify_shakespeare(path: Path, origin: str) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise UserError(
            f"{path} (from {origin}) is not tiny-shakespeare (sha256 {digest[:12]}…, expected "
            f"{SHAKESPEARE_SHA256[:12]}…): use the file from {SHAKESPEARE_URL}, or pass another "
            "corpus as --config.data.path"
        )


def download_shakespeare(root: Path) -> Path:
    """Returns the path of tiny-shakespeare under root, downloading and verifying it once."""
    path = root / "tinyshakespeare.txt"
    if path.is_file():
        _verify_shakespeare(path, "the download cache")
        return path
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response:
            payload = response.read()
    except OSError as err:
        raise UserError(
            f"tiny-shakespeare is not in {root} and could not be downloaded "
            f"({getattr(err, 'reason', err)}): download {SHAKESPEARE_URL} yourself and set "
            f"{SHAKESPEARE_ENV}=/path/to/input.txt, or pass --config.data.path=/path/to/input.txt"
        ) from None
    digest = hashlib.sha256(payload).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise UserError(f"the download from {SHAKESPEARE_URL} has sha256 {digest}, expected "
                        f"{SHAKESPEARE_SHA256}: try again later or supply the file yourself")
    root.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(path, payload)
    return path


def prepare_char_corpus(text_path: Path, root: Path, val_fraction: float = 0.1) -> Path:
    """Returns a directory with train.bin, val.bin and meta.json for a character-level corpus.

    The directory sits under root, keyed by the file's sha256 and the split, so the user's
    own folder is never written to and a second run reuses the first run's work.
    """
    raw = text_path.read_bytes()
    if not raw.strip():
        raise UserError(f"corpus {text_path} is empty: give a UTF-8 text file with some text in it")
    if b"\x00" in raw[: 1 << 20]:
        raise UserError(f"corpus {text_path} looks binary (it has NUL bytes): give a UTF-8 text "
                        "file, or a prepared directory with train.bin/val.bin")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"corpus {text_path} is not UTF-8 text (byte {raw[err.start]:#04x} at offset "
            f"{err.start}): convert it, e.g. iconv -f latin1 -t utf-8 IN > OUT"
        ) from None
    key = hashlib.sha256(raw + f"|val_fraction={val_fraction}".encode()).hexdigest()[:16]
    dest = root / "char" / key
    if (dest / "meta.json").is_file():
        return dest
    tokenizer = tokenization.CharTokenizer.from_text(text)
    if tokenizer.vocab_size > np.iinfo(TOKEN_DTYPE).max:
        raise UserError(f"corpus {text_path} has {tokenizer.vocab_size} distinct characters; "
                        "at most 65535 fit the uint16 token format")
    lookup = np.zeros(max(map(ord, tokenizer.chars)) + 1, dtype=TOKEN_DTYPE)
    lookup[[ord(ch) for ch in tokenizer.chars]] = np.arange(tokenizer.vocab_size)
    ids = lookup[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)]
    n_train = int(len(ids) * (1.0 - val_fraction))
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".prepare-"))
    try:
        ids[:n_train].tofile(tmp / "train.bin")
        ids[n_train:].tofile(tmp / "val.bin")
        meta = {"tokenizer": tokenizer.to_json(), "vocab_size": tokenizer.vocab_size,
                "source": str(text_path), "sha256": hashlib.sha256(raw).hexdigest()}
        (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1))
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest) if not dest.exists() else shutil.rmtree(tmp)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def read_prepared(directory: Path) -> Dataset:
    """Returns the dataset of a prepared directory: ours (meta.json) or nanoGPT's (meta.pkl),
    train.bin and val.bin, or a directory of llm.c token shards (gpt_jax/shards.py; GPT-2's
    BPE unless a meta.json says otherwise)."""
    missing = [n for n in ("train.bin", "val.bin") if not (directory / n).is_file()]
    if missing and shards.has_shards(directory):
        tokenizer = tokenization.TiktokenTokenizer("gpt2")
        if (directory / "meta.json").is_file():
            meta = json.loads((directory / "meta.json").read_text())
            tokenizer = tokenization.tokenizer_from_json(meta["tokenizer"])
        train, val = (shards.ShardedTokens(shards.split_files(directory, split))
                      for split in ("train", "val"))
        return Dataset(train=train, val=val, tokenizer=tokenizer, directory=directory)
    if missing:
        raise UserError(f"{directory} is not a prepared corpus (no {', '.join(missing)}, and no "
                        "llm.c shards of both splits): point --config.data.path at a text file, "
                        "a directory with train.bin/val.bin, or one of *_train_*.bin and "
                        "*_val_*.bin shards")
    if (directory / "meta.json").is_file():
        meta = json.loads((directory / "meta.json").read_text())
        tokenizer = tokenization.tokenizer_from_json(meta["tokenizer"])
    elif (directory / "meta.pkl").is_file():
        with open(directory / "meta.pkl", "rb") as f:
            meta = pickle.load(f)
        itos = meta["itos"]
        tokenizer = tokenization.CharTokenizer("".join(itos[i] for i in range(len(itos))))
    else:  # nanoGPT's BPE corpora (openwebtext, shakespeare) carry no meta file.
        tokenizer = tokenization.TiktokenTokenizer("gpt2")
    train, val = (shards.ShardedTokens([directory / f"{split}.bin"], header_bytes=0)
                  for split in ("train", "val"))
    return Dataset(train=train, val=val, tokenizer=tokenizer, directory=directory)


ALIGNS = ("none", "bos")
DOCUMENT_CHECK_TOKENS = 1 << 22  # align=bos: the train split must hold a separator this early


def resolve_documents(config, dataset: Dataset):
    """Returns `config` with model.doc_sep set from data.doc_mask (the corpus tokenizer's
    <|endoftext|>); raises UserError when data.align or data.doc_mask cannot work on it."""
    align, doc_mask = config.data.get("align", "none"), config.data.get("doc_mask", False)
    if align not in ALIGNS:
        raise UserError(f"data.align={align!r} is unknown: use one of {', '.join(ALIGNS)}")
    if align == "none" and not doc_mask:
        return config
    sep = tokenization.end_of_text(dataset.tokenizer)
    wanted = "data.align=bos" if align == "bos" else "data.doc_mask"
    if sep is None:
        raise UserError(f"{wanted} needs documents separated by <|endoftext|>, but the "
                        f"corpus's {type(dataset.tokenizer).__name__} has no such token: use a "
                        "BPE corpus (data.tokenizer=gpt2), or leave data.align=none and "
                        "data.doc_mask=False")
    head = np.asarray(dataset.train[: min(len(dataset.train), DOCUMENT_CHECK_TOKENS)])
    if align == "bos" and not (head == sep).any():
        raise UserError(f"data.align=bos found no <|endoftext|> ({sep}) in the first "
                        f"{len(head):,} tokens of {dataset.directory}'s train split: its "
                        "documents are not separated (prepare them with python -m "
                        "gpt_jax.prepare, which ends each with one), or use data.align=none")
    if doc_mask:
        config = ml_collections.ConfigDict(config.to_dict())
        config.model.doc_sep = sep
    return config


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- batches

SPLIT_STREAMS = {"train": 0, "val": 1}


def get_batch(tokens: np.ndarray, *, batch_size: int, block_size: int, seed: int, step: int,
              stream: int = 0, rows: slice | None = None, align_to: int | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Returns (inputs, targets), each int32 (batch_size, block_size), for one training step.

    Each row is a random contiguous crop of block_size + 1 tokens whose start is a pure
    function of (seed, stream, step), so any step's batch can be rebuilt after a restart, on
    any number of devices. `rows` reads only those rows of the batch (one process's share).
    With align_to (a separator token, data.align=bos) each crop starts instead at the start of
    the document holding the drawn token (see document_starts).
    """
    rng = np.random.default_rng((seed, stream, step))
    starts_B = rng.integers(0, len(tokens) - block_size, size=batch_size)
    if rows is not None:
        starts_B = starts_B[rows]
    if align_to is not None:
        starts_B = document_starts(tokens, starts_B, align_to)
    return _crops(tokens, starts_B, block_size)


DOCUMENT_SEARCH = 4096  # tokens read per step of document_starts' backward search


def document_starts(tokens: np.ndarray, at_B: np.ndarray, sep: int) -> np.ndarray:
    """Returns the start of the document holding each token at_B: the position after the last
    `sep` before it, or 0 in the corpus's first document.

    Only the tokens between the two are read (backwards, DOCUMENT_SEARCH at a time), so no
    index of the corpus is built. A document is drawn in proportion to its length, as an
    unaligned crop is, and a crop from its start fits wherever at_B's did.
    """
    starts_B = np.zeros_like(at_B)
    for b, end in enumerate(at_B.tolist()):
        while end > 0:
            lo = max(0, end - DOCUMENT_SEARCH)
            hits = np.flatnonzero(np.asarray(tokens[lo:end]) == sep)
            if hits.size:
                starts_B[b] = lo + hits[-1] + 1
                break
            end = lo
    return starts_B


def _crops(tokens: np.ndarray, starts_B: np.ndarray, block_size: int):
    """Returns (inputs, targets), int32 (B, block_size), of the crops starting at starts_B."""
    if isinstance(tokens, shards.ShardedTokens):  # a read per crop, nothing kept mapped
        crops_BT = tokens.crops(starts_B, block_size + 1).astype(np.int32)
    else:
        crops_BT = np.asarray(tokens[starts_B[:, None] + np.arange(block_size + 1)], np.int32)
    return crops_BT[:, :-1], crops_BT[:, 1:]


def train_batch(dataset: Dataset, config, step: int, mesh=None):
    """Returns the batch of update number step + 1 (a pure function of seed and step).

    With a mesh, the batch comes back split over it; in a multi-process run each process
    reads only the rows its devices hold.
    """
    bos = config.data.get("align") == "bos"
    align_to = tokenization.end_of_text(dataset.tokenizer) if bos else None
    batch = get_batch(dataset.train, batch_size=config.batch_size,
                      block_size=config.model.block_size, seed=config.seed, step=step,
                      rows=_process_rows(mesh, config.batch_size), align_to=align_to)
    return batch if mesh is None else sharding.put_batch(batch, mesh, config.batch_size)


def eval_starts(n_tokens: int, block_size: int, max_tokens: int) -> np.ndarray:
    """Returns the start of each window of the fixed evaluation of a split of n_tokens.

    The windows are the split's non-overlapping block_size crops (each with its next-token
    targets); when max_tokens holds fewer than all of them, that many spread evenly over the
    split. They depend on nothing but the split and these two numbers.
    """
    n_all = (n_tokens - 1) // block_size
    n = max(1, min(n_all, max_tokens // block_size))
    return np.arange(n) * n_all // n * block_size


def eval_batches(dataset: Dataset, config, split: str, step: int, mesh=None
                 ) -> Iterator[tuple[tuple, int, int]]:
    """Yields the batches of one loss evaluation of `split` ("train" or "val") at `step`,
    each as (batch, tokens scored, UTF-8 bytes of their text).

    A batch is (inputs_BT, targets_BT, weights_BT, bytes_BT): weights are 1 on the tokens
    scored and 0 on padding rows; bytes_BT is each scored target's byte length (0 for
    special tokens), for bits per byte. Batches have one micro-batch's rows (batch_size /
    grad_accum_steps). eval_mode "fixed" scores eval_starts' windows, the same in every run
    of the corpus (the last batch padded); "random" scores eval_iters random crops drawn
    from a stream of their own (nanoGPT's estimate, which changes with seed and step).
    """
    tokens, block_size = getattr(dataset, split), config.model.block_size
    rows = config.batch_size // config.grad_accum_steps
    token_bytes = dataset.token_bytes
    if config.eval_mode == "random":
        crops = (get_batch(tokens, batch_size=rows, block_size=block_size, seed=config.seed,
                           stream=2 + SPLIT_STREAMS[split], step=step * config.eval_iters + i)
                 for i in range(config.eval_iters))
        real = [rows] * config.eval_iters
    else:
        starts = eval_starts(len(tokens), block_size, config.eval_tokens)
        chunks = [starts[i:i + rows] for i in range(0, len(starts), rows)]
        real = [len(c) for c in chunks]
        # The last chunk is padded with copies of its first window, weighted 0.
        crops = (_crops(tokens, np.pad(c, (0, rows - len(c)), mode="edge"), block_size)
                 for c in chunks)
    local = _process_rows(mesh, rows)
    for (inputs_BT, targets_BT), n in zip(crops, real, strict=True):
        weights_BT = np.zeros(targets_BT.shape, np.float32)
        weights_BT[:n] = 1.0
        bytes_BT = (token_bytes[targets_BT] * weights_BT).astype(np.int32)
        batch = (inputs_BT, targets_BT, weights_BT, bytes_BT)
        if local is not None:
            batch = tuple(x[local] for x in batch)
        yield ((batch if mesh is None else sharding.put_batch(batch, mesh, rows)),
               n * block_size, int(bytes_BT.sum()))


def _process_rows(mesh, batch_size: int) -> slice | None:
    if mesh is None or jax.process_count() == 1:
        return None
    return sharding.local_rows(mesh, batch_size)
