"""Token shards in llm.c's format, the one modded-nanogpt's FineWeb shards also use.

A shard is a header of 256 little-endian int32 (magic 20240520, version 1, the token count,
the rest zero) followed by that many uint16 tokens. A corpus is a directory of them, each split
named by a `train` or `val` word in the file name (`fineweb_train_000001.bin`,
`fineweb_val_000000.bin`, `tiny_shakespeare_val.bin`), in name order.

`ShardedTokens` shows a split's shards (or a prepared train.bin) as one token array without
reading any of them whole: a batch's crops (which may span two shards) gather only their own
tokens, through maps that last one read, so a batch is the same function of (seed, step) as on
one file and resident memory stays flat however much of the corpus a run reads.
"""

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gpt_jax.errors import UserError

MAGIC = 20240520
VERSION = 1  # uint16 tokens (llm.c's version 2 holds uint32 Llama 3 tokens)
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.uint16
_SPLIT_WORD = {split: re.compile(rf"(^|[_\-.]){split}([_\-.]|$)") for split in ("train", "val")}


def read_header(path: Path) -> int:
    """Returns the token count of the shard at `path`; raises UserError naming what is wrong."""
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    if len(header) < HEADER_INTS or header[0] != MAGIC:
        raise UserError(f"{path} is not an llm.c token shard (its header does not start with "
                        f"the magic number {MAGIC}): give a directory of shards, or prepare "
                        "the text with python -m gpt_jax.prepare")
    if header[1] != VERSION:
        raise UserError(f"{path} is an llm.c shard of version {header[1]}; only version "
                        f"{VERSION} (GPT-2 tokens as uint16) is read")
    n_tokens = int(header[2])
    size = os.path.getsize(path)
    if size != HEADER_BYTES + 2 * n_tokens:
        raise UserError(f"{path} is {size:,} bytes but its header announces {n_tokens:,} tokens "
                        f"({HEADER_BYTES + 2 * n_tokens:,} bytes): the shard is truncated or "
                        "damaged; download or write it again")
    return n_tokens


def _header(n_tokens: int) -> bytes:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, n_tokens)
    return header.tobytes()


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """Writes `tokens` (ids below 65536) as one shard at `path`, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_header(len(tokens)))
        f.write(np.asarray(tokens, dtype="<u2").tobytes())
    os.replace(tmp, path)


class SplitWriter:
    """Appends a split's tokens to shards of `shard_tokens` tokens (the last one shorter):
    {prefix}_{split}_{index:06d}.bin in `directory`, the index counting from `first_index`.
    Nothing is held but the open shard's file; its header is written when it is full."""

    def __init__(self, directory: Path, prefix: str, split: str, shard_tokens: int,
                 first_index: int = 0):
        self._directory, self._prefix, self._split = directory, prefix, split
        self._shard_tokens, self._index = shard_tokens, first_index
        self._file, self._in_file = None, 0

    def write(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype="<u2")
        while len(ids):
            if self._file is None:
                name = f"{self._prefix}_{self._split}_{self._index:06d}.bin"
                self._file = open(self._directory / name, "wb")  # noqa: SIM115 (closed below)
                self._file.write(_header(0))
            take = ids[: self._shard_tokens - self._in_file]
            self._file.write(take.tobytes())
            self._in_file += len(take)
            ids = ids[len(take):]
            if self._in_file == self._shard_tokens:
                self.close()

    def close(self) -> None:
        """Finishes the open shard: its header gets the token count."""
        if self._file is not None:
            self._file.seek(0)
            self._file.write(_header(self._in_file))
            self._file.close()
            self._file, self._in_file, self._index = None, 0, self._index + 1


def split_files(directory: Path, split: str) -> list[Path]:
    """Returns the shards of `split` ("train" or "val") in `directory`, in name order."""
    return sorted(p for p in directory.glob("*.bin")
                  if p.is_file() and _SPLIT_WORD[split].search(p.stem)
                  and p.name not in ("train.bin", "val.bin"))


def has_shards(directory: Path) -> bool:
    """Returns whether `directory` holds shards of both splits."""
    return all(split_files(directory, split) for split in ("train", "val"))


class ShardedTokens:
    """The tokens of several files as one read-only array: len(), and indexing by an int, a
    slice or an integer array (each element read from the file that holds it).

    Nothing of the files is kept in the process: ranges and crops are read with pread into
    fresh arrays, and an integer array is gathered through maps that last that one read
    (nanoGPT's fresh memmap per batch). So the process's resident memory does not grow with
    the tokens it has read; only the kernel's page cache does, which it hands back under
    memory pressure. `header_bytes` is where the tokens start in each file (0 for a
    train.bin); with a header, each file's is checked and gives its token count.
    """

    dtype = TOKEN_DTYPE

    def __init__(self, paths: Sequence[Path], header_bytes: int = HEADER_BYTES):
        if not paths:
            raise UserError("no token shards were given")
        self.paths, self._header_bytes = list(paths), header_bytes
        self._counts = [read_header(p) if header_bytes else _headerless_count(p)
                        for p in self.paths]
        self._starts = np.concatenate([[0], np.cumsum(self._counts)]).astype(np.int64)
        self._fds: dict[int, int] = {}  # file index -> descriptor, opened on first read

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """Returns every token (an explicit whole read, e.g. np.asarray(tokens))."""
        return self._range(0, len(self)).astype(dtype or TOKEN_DTYPE, copy=False)

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)

    def __getitem__(self, index):
        if isinstance(index, slice):
            span = range(len(self))[index]
            if span.step == 1:
                return self._range(span.start, max(span.start, span.stop))
            return self[np.arange(span.start, span.stop, span.step, dtype=np.int64)]
        at = np.asarray(index)
        if not np.issubdtype(at.dtype, np.integer):
            raise TypeError(f"shards are indexed by integers, not {at.dtype}")
        at = np.where(at < 0, at + len(self), at)
        if at.size and (at.min() < 0 or at.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} tokens")
        out = np.empty(at.shape, TOKEN_DTYPE)
        shard_of = np.searchsorted(self._starts, at, side="right") - 1
        for s in np.unique(shard_of):
            mask = shard_of == s
            mapped = np.memmap(self.paths[s], dtype=TOKEN_DTYPE, mode="r",
                               offset=self._header_bytes, shape=(self._counts[s],))
            out[mask] = mapped[at[mask] - self._starts[s]]
        return out if out.ndim else out[()]

    def crops(self, starts_B: np.ndarray, length: int) -> np.ndarray:
        """Returns the (B, length) tokens starting at each start, one read per crop."""
        out = np.empty((len(starts_B), length), TOKEN_DTYPE)
        for row, start in zip(out, np.asarray(starts_B).tolist()):
            if start < 0 or start + length > len(self):
                raise IndexError(f"crop {start}..{start + length} out of range for "
                                 f"{len(self)} tokens")
            self._range(start, start + length, into=row)
        return out

    def _range(self, start: int, stop: int, into: np.ndarray | None = None) -> np.ndarray:
        """Returns tokens start..stop-1, read file by file with pread."""
        out = np.empty(stop - start, TOKEN_DTYPE) if into is None else into
        s = int(np.searchsorted(self._starts, start, side="right")) - 1
        while start < stop:
            take = min(stop, int(self._starts[s + 1])) - start
            if take > 0:
                offset = self._header_bytes + 2 * (start - int(self._starts[s]))
                view = memoryview(out[len(out) - (stop - start):][:take]).cast("B")
                if os.preadv(self._fd(s), [view], offset) != view.nbytes:
                    raise UserError(f"{self.paths[s]} ended early: the file was truncated "
                                    "while training; write it again")
                start += take
            s += 1
        return out

    def _fd(self, s: int) -> int:
        if s not in self._fds:
            self._fds[s] = os.open(self.paths[s], os.O_RDONLY)
        return self._fds[s]


def _headerless_count(path: Path) -> int:
    size = os.path.getsize(path)
    if size % np.dtype(TOKEN_DTYPE).itemsize:
        raise UserError(f"{path} is {size:,} bytes, not a whole number of uint16 tokens: the "
                        "file is truncated or not a token file; prepare the corpus again")
    return size // np.dtype(TOKEN_DTYPE).itemsize
