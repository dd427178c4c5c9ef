r"""Tokenises a text corpus with GPT-2's BPE: python -m gpt_jax.prepare INPUT --out DIR

INPUT is one of
  * a UTF-8 text file: one document;
  * a directory: every non-empty regular file under it, recursively (names starting with "."
    skipped, whatever the suffix), in sorted order of relative path; each file one document;
  * a JSON Lines file (*.jsonl): one document per record, its text under --text_field
    (blank lines skipped);
  * a parquet file (*.parquet), or a directory holding only parquet files (FineWeb's): one
    document per row, its text in the --text_field column, read a batch of rows at a time
    (needs pyarrow: the `data` extra).
Each document is encoded with tiktoken's encode_ordinary (a literal "<|endoftext|>" in the
text is plain text) and followed by the end-of-text token (50256). DIR receives train.bin and
val.bin (uint16 ids, nanoGPT's format) and meta.json; --config.data.path=DIR trains on them.
With --shard_tokens N, DIR receives llm.c's token shards instead (gpt_jax/shards.py), N
tokens each but the last of a split: DIR_val_000000.bin (more if val is longer), then
DIR_train_000001.bin, ... (DIR standing for its name), as llm.c's and modded-nanogpt's
FineWeb shards are.

The split is streaming and deterministic. The split point is byte (1 - val_fraction) x the
input's size (for a directory, the sum of its files' sizes). Units that start before it go
to train, the rest to val (parquet: row (1 - val_fraction) x the rows, since compressed bytes
say little about a row's text). A unit is a document for a directory, a JSONL or a parquet
file; for a single text file it is a chunk, and a chunk boundary is forced at the first cut
point (below) at or after the split point, so val is the file's tail, as in nanoGPT.

The corpus is never held in memory: it is read in chunks of about chunk_bytes, encoded in
parallel and appended to the output as the chunks come back in order. A file is cut only just
before an ASCII whitespace character that follows a non-whitespace one. GPT-2's pre-tokenizer
(`'s|'t|...| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+$|\s+(?!\S)|\s`) never carries a piece from
a non-whitespace character into the whitespace after it, has no look-behind, and its
look-aheads only follow whitespace, so the chunks' encodings concatenate to the whole text's
encoding exactly. (Cutting after a newline would not do: "a\n\n" alone ends in one "\n\n"
token, while the same newlines inside "a\n\nb" are two "\n" tokens.) A stretch of text with no
cut point makes a longer chunk.
"""

import contextlib
import hashlib
import json
import multiprocessing
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from gpt_jax import entry
from gpt_jax import shards as shards_lib
from gpt_jax.errors import UserError

TOKEN_DTYPE = np.uint16  # the on-disk format of train.bin / val.bin (nanoGPT's)
SPLITS = ("train", "val")
MAX_WORKERS = 8
# Inputs under this many chunks or bytes are encoded in this process: a pool takes ~1 s to start.
SMALL_INPUT_CHUNKS = 4
SMALL_INPUT_BYTES = 8 << 20
_CUT = re.compile(rb"[^\t-\r ][\t-\r ]")  # a cut candidate: a byte, then ASCII whitespace


class _Piece(NamedTuple):
    """A stretch of one document, in the order the documents are read."""

    split: str  # "train" or "val"
    text: str
    end_of_document: bool  # the end-of-text token follows it
    nbytes: int  # input bytes it covers, for the progress bar


def prepare_bpe_corpus(source: Path, out: Path, *, val_fraction: float = 0.1,
                       workers: int | None = None, text_field: str = "text",
                       encoding: str = "gpt2", chunk_bytes: int = 1 << 20,
                       show_progress: bool = True, overwrite: bool = False,
                       shard_tokens: int | None = None) -> dict:
    """Returns the meta.json written to out, beside train.bin and val.bin of source's tokens.

    Args:
      source: a UTF-8 text file, a directory of them or a .jsonl file (see the module doc).
      out: the directory to create; it appears only once complete.
      workers: encoding processes; None: min(CPUs, 8), or 1 for an input under 8 MiB.
      chunk_bytes: the input read and encoded at a time (a chunk may grow to reach a cut).
      show_progress: a progress bar on stderr and a summary line on stdout.
      overwrite: replace out if it already holds a prepared corpus.
      shard_tokens: write llm.c shards of this many tokens instead of train.bin and val.bin.
    """
    began = time.perf_counter()
    source, out = Path(source), Path(out)
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be in (0, 1), got {val_fraction}: "
                        "pass e.g. --val_fraction 0.1")
    if workers is not None and workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}")
    if chunk_bytes < 1:
        raise UserError(f"chunk_bytes must be at least 1, got {chunk_bytes}")
    if shard_tokens is not None and shard_tokens < 1:
        raise UserError(f"shard_tokens must be at least 1, got {shard_tokens}: llm.c writes "
                        "shards of 100,000,000 tokens")
    files = _input_files(source)
    total = sum(size for _, size in files)
    if total == 0:
        raise UserError(f"input {source} is empty: give it some UTF-8 text")
    split_byte = int(total * (1.0 - val_fraction))
    parquet = all(path.suffix.lower() == ".parquet" for path, _ in files)
    last_start = sum(s for _, s in files[:-1])
    if source.is_dir() and not parquet and _document_split(last_start, split_byte) == "train":
        raise UserError(
            f"the val split is empty: the last of the {len(files)} files in {source} starts "
            f"before the split at byte {split_byte:,} of {total:,}: raise --val_fraction or "
            "add documents")
    _check_out(out, source, overwrite)
    enc = _load_encoding(encoding)
    if enc.n_vocab - 1 > np.iinfo(TOKEN_DTYPE).max:
        raise UserError(f"encoding {encoding!r} has {enc.n_vocab} tokens: ids above 65535 do "
                        "not fit the uint16 token format; use gpt2")
    if workers is None:
        small = total < max(SMALL_INPUT_CHUNKS * chunk_bytes, SMALL_INPUT_BYTES)
        workers = 1 if small else min(os.cpu_count() or 1, MAX_WORKERS)

    if parquet:
        pieces = _parquet_pieces(files, text_field, val_fraction)
    elif source.is_dir():
        pieces = _directory_pieces(files, chunk_bytes, split_byte)
    elif source.suffix.lower() == ".jsonl":
        pieces = _jsonl_pieces(source, text_field, split_byte)
    else:
        pieces = _text_file_pieces(source, chunk_bytes, split_byte)
    tasks = _tasks(_require_text(pieces, source), chunk_bytes)

    out.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its 0700 would stay on the corpus; mkdir honours the umask.
    tmp = out.parent / f".{out.name}.prepare-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        counts = _encode_into(tmp, tasks, workers=workers, encoding=encoding, total=total,
                              desc=f"tokenizing {source.name}", show_progress=show_progress,
                              shards=(out.name, shard_tokens) if shard_tokens else None)
        if counts["val"] == 0:
            where = ("no record starts" if parquet or source.suffix.lower() == ".jsonl" else
                     "there is no cut point (whitespace after a non-space)")
            raise UserError(f"the val split is empty: in {source} {where} at or after byte "
                            f"{split_byte:,} of {total:,}: raise --val_fraction or add text")
        if counts["train"] == 0:
            raise UserError(f"the train split is empty: nothing in {source} starts before byte "
                            f"{split_byte:,}: lower --val_fraction")
        meta = {  # the tokenizer as tokenization.TiktokenTokenizer(encoding).to_json() writes it
            "tokenizer": {"kind": "tiktoken", "encoding": encoding},
            "vocab_size": enc.n_vocab,
            "train_tokens": counts["train"],
            "val_tokens": counts["val"],
            "documents": counts["documents"],
            "source": str(source),
            "input_bytes": total,
            "val_fraction": val_fraction,
            **({"shard_tokens": shard_tokens} if shard_tokens else {}),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1))
        _install(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if show_progress:
        n_train, n_val = meta["train_tokens"], meta["val_tokens"]
        print(f"prepared {out}: {n_train:,} train + {n_val:,} val tokens ({n_train + n_val:,} "
              f"total) from {meta['documents']:,} document(s) in "
              f"{time.perf_counter() - began:.1f} s", flush=True)
    return meta


def prepare_cached(text_path: Path, root: Path, val_fraction: float,
                   encoding: str = "gpt2") -> Path:
    """Returns root/<encoding>/<key> holding text_path's tokens, preparing them on first use.

    As for data.prepare_char_corpus, the key is the sha256 of the file and the split, so the
    user's own folder is never written to and a second run reuses the first run's work.
    """
    digest = hashlib.sha256()
    with open(text_path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    digest.update(f"|val_fraction={val_fraction}".encode())
    dest = Path(root) / encoding / digest.hexdigest()[:16]
    if not (dest / "meta.json").is_file():
        # overwrite: a process racing us to the same key writes the same tokens.
        prepare_bpe_corpus(text_path, dest, val_fraction=val_fraction, encoding=encoding,
                           overwrite=True)
    return dest


# --------------------------------------------------------------------------- inputs and output


def _input_files(source: Path) -> list[tuple[Path, int]]:
    """Returns the files to read, in order, with their sizes in bytes."""
    if not source.exists():
        raise UserError(f"input {source} does not exist: give a UTF-8 text file, a directory "
                        "of them, or a .jsonl file")
    if not source.is_dir():
        return [(source, source.stat().st_size)]
    paths = []
    for folder, subfolders, names in os.walk(source):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        paths += [Path(folder, n) for n in names if not n.startswith(".")]
    paths.sort(key=lambda p: p.relative_to(source).as_posix())
    files = [(p, p.stat().st_size) for p in paths if p.is_file()]
    files = [(p, size) for p, size in files if size > 0]
    if not files:
        raise UserError(f"directory {source} has no non-empty files: put UTF-8 text files in it")
    return files


def _check_out(out: Path, source: Path, overwrite: bool) -> None:
    """Raises UserError if writing out would clobber something it should not."""
    if source.is_dir() and out.resolve().is_relative_to(source.resolve()):
        raise UserError(f"--out {out} is inside the input directory {source}: choose a "
                        "directory outside it")
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} is a file: give the path of a directory to create")
    if any((out / name).exists() for name in ("meta.json", "train.bin", "val.bin")):
        if not overwrite:
            raise UserError(f"{out} already holds a prepared corpus: pass --overwrite to "
                            "replace it, or choose another --out")
    elif any(out.iterdir()):
        raise UserError(f"{out} exists and holds other files: choose a new or empty "
                        "directory for --out")


def _install(tmp: Path, out: Path) -> None:
    """Moves the finished tmp directory to out, replacing an old corpus there."""
    if out.exists() and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _load_encoding(name: str):
    import tiktoken

    try:
        return tiktoken.get_encoding(name)
    except ValueError as err:
        raise UserError(f"tiktoken cannot load the encoding {name!r} ({err}): use gpt2") from None
    except OSError as err:  # tiktoken downloads its BPE tables on first use
        raise UserError(
            f"tiktoken could not fetch the {name!r} BPE tables ({type(err).__name__}): go "
            "online once, or set TIKTOKEN_CACHE_DIR to a folder that holds them") from None


# --------------------------------------------------------------------------- reading


def _document_split(start: int, split_byte: int) -> str:
    return "train" if start < split_byte else "val"


def _text_file_pieces(path: Path, chunk_bytes: int, split_byte: int) -> Iterator[_Piece]:
    """Yields a text file's chunks, each in the split where it starts; the last ends the doc."""
    chunks = _read_chunks(path, chunk_bytes, cut_at=split_byte)
    previous = None
    for offset, nbytes, text in chunks:
        if previous is not None:
            yield previous
        previous = _Piece(_document_split(offset, split_byte), text, False, nbytes)
    if previous is not None:  # None if the file was emptied since it was measured
        yield previous._replace(end_of_document=True)


def _directory_pieces(files: list[tuple[Path, int]], chunk_bytes: int,
                      split_byte: int) -> Iterator[_Piece]:
    """Yields every file's chunks, each file in the split where it starts."""
    start = 0
    for path, size in files:
        split = _document_split(start, split_byte)
        previous = None
        for _, nbytes, text in _read_chunks(path, chunk_bytes):
            if previous is not None:
                yield previous
            previous = _Piece(split, text, False, nbytes)
        if previous is not None:
            yield previous._replace(end_of_document=True)
        start += size


def _jsonl_pieces(path: Path, text_field: str, split_byte: int) -> Iterator[_Piece]:
    """Yields one piece per JSONL record, in the split where its line starts."""
    offset = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise _not_utf8(path, line[err.start], start + err.start) from None
            except json.JSONDecodeError as err:
                raise UserError(f"{path} line {number} is not JSON ({err.msg}, column "
                                f"{err.colno}): give one JSON object per line") from None
            if not isinstance(record, dict) or text_field not in record:
                raise UserError(f"{path} line {number} has no {text_field!r} field: pass "
                                "--text_field NAME, the field that holds each record's text")
            text = record[text_field]
            if not isinstance(text, str):
                raise UserError(f"{path} line {number}: field {text_field!r} is not a string "
                                f"({json.dumps(text)[:40]}): pass --text_field NAME")
            yield _Piece(_document_split(start, split_byte), text, True, len(line))


def _parquet_pieces(files: list[tuple[Path, int]], text_field: str,
                    val_fraction: float) -> Iterator[_Piece]:
    """Yields one piece per parquet row, in order; the last val_fraction of the rows are val.
    A row's nbytes is its share of its file's size, so the progress bar counts file bytes.
    Row groups are read one at a time: pyarrow's iter_batches reads ahead of a slow consumer
    (the encoders), and its memory grew with the file (100 MB of text: 217 MiB peak)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading parquet needs pyarrow: pip install -e \".[data]\" (or pip "
                        "install pyarrow)") from None
    opened = []
    for path, size in files:
        try:
            table = pq.ParquetFile(path)
        except Exception as err:  # noqa: BLE001 (pyarrow raises several kinds)
            raise UserError(f"{path} is not a readable parquet file ({err})") from None
        if text_field not in table.schema_arrow.names:
            raise UserError(f"{path} has no {text_field!r} column (it has "
                            f"{', '.join(table.schema_arrow.names)}): pass --text_field NAME")
        opened.append((path, size, table))
    split_row = int(sum(t.metadata.num_rows for _, _, t in opened) * (1.0 - val_fraction))
    row = 0
    for path, size, table in opened:
        n_rows, done = table.metadata.num_rows, 0
        for group in range(table.num_row_groups):  # one row group in memory at a time
            column = table.read_row_group(group, columns=[text_field], use_threads=False)
            for text in column.column(0).to_pylist():
                if not isinstance(text, str):
                    raise UserError(f"{path} row {done}: column {text_field!r} holds "
                                    f"{type(text).__name__}, not text: pass --text_field NAME")
                nbytes = size * (done + 1) // n_rows - size * done // n_rows
                yield _Piece("train" if row < split_row else "val", text, True, nbytes)
                row, done = row + 1, done + 1


def _read_chunks(path: Path, chunk_bytes: int,
                 cut_at: int | None = None) -> Iterator[tuple[int, int, str]]:
    """Yields (byte offset, byte length, text) of consecutive chunks of a UTF-8 file.

    Each chunk ends at the first cut point (see the module doc) at or after chunk_bytes, or
    at or after the file's byte cut_at, whichever comes first; the last ends with the file.
    """
    buffer = bytearray()
    start = 0  # the file offset of buffer[0]
    eof = False
    with open(path, "rb") as f:
        while buffer or not eof:
            target = chunk_bytes
            if cut_at is not None and cut_at > start:
                target = min(target, cut_at - start)
            lo = target
            while (cut := _find_cut(buffer, lo)) is None and not eof:
                lo = max(target, len(buffer))  # a cut straddling old and new bytes counts
                block = f.read(chunk_bytes)
                buffer += block
                eof = not block
            if not buffer:
                return
            if cut is None:
                cut = len(buffer)
            try:
                text = buffer[:cut].decode("utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(path, buffer[err.start], start + err.start) from None
            yield start, cut, text
            del buffer[:cut]
            start += cut


def _find_cut(buffer: bytearray, lo: int) -> int | None:
    """Returns the first index >= lo where buffer can be cut without changing its BPE."""
    for match in _CUT.finditer(buffer, max(lo - 1, 0)):
        cut = match.start() + 1
        if not _char_before(buffer, cut).isspace():
            return cut
    return None


def _char_before(buffer: bytearray, end: int) -> str:
    """Returns the character that ends at buffer[end - 1] (a space if it is not UTF-8)."""
    begin = end - 1
    while begin > max(end - 4, 0) and 0x80 <= buffer[begin] < 0xC0:  # continuation bytes
        begin -= 1
    try:
        return buffer[begin:end].decode("utf-8")
    except UnicodeDecodeError:
        return " "  # no cut here; decoding the chunk reports the bad byte


def _not_utf8(path: Path, byte: int, offset: int) -> UserError:
    return UserError(f"{path} is not UTF-8 text (byte {byte:#04x} at offset {offset}): "
                     "convert it, e.g. iconv -f latin1 -t utf-8 IN > OUT")


def _require_text(pieces: Iterable[_Piece], source: Path) -> Iterator[_Piece]:
    """Passes the pieces on; raises UserError at the end if they held only whitespace."""
    seen_text = False
    for piece in pieces:
        seen_text = seen_text or bool(piece.text and not piece.text.isspace())
        yield piece
    if not seen_text:
        raise UserError(f"input {source} is empty (only whitespace): give it some text")


def _tasks(pieces: Iterable[_Piece], chunk_bytes: int) -> Iterator[tuple]:
    """Yields (split, nbytes, [(text, end_of_document), ...]): pieces grouped to ~chunk_bytes."""
    batch, nbytes, split = [], 0, None
    for piece in pieces:
        if batch and (piece.split != split or nbytes >= chunk_bytes):
            yield split, nbytes, batch
            batch, nbytes = [], 0
        split = piece.split
        batch.append((piece.text, piece.end_of_document))
        nbytes += piece.nbytes
    if batch:
        yield split, nbytes, batch


# --------------------------------------------------------------------------- encoding

_ENCODING = None  # this process's tiktoken encoding, built once by _start_worker


def _start_worker(encoding: str) -> None:
    global _ENCODING
    _ENCODING = _load_encoding(encoding)


def _start_pool_worker(encoding: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    _start_worker(encoding)


def _encode_task(task: tuple) -> tuple[str, int, int, np.ndarray]:
    """Returns (split, nbytes, documents, uint16 ids) for one task of _tasks."""
    split, nbytes, batch = task
    ids = []
    for text, end_of_document in batch:
        ids += _ENCODING.encode_ordinary(text)
        if end_of_document:
            ids.append(_ENCODING.eot_token)
    documents = sum(end for _, end in batch)
    return split, nbytes, documents, np.asarray(ids, dtype=TOKEN_DTYPE)


def _encode_into(directory: Path, tasks: Iterator[tuple], *, workers: int, encoding: str,
                 total: int, desc: str, show_progress: bool,
                 shards: tuple[str, int] | None = None) -> dict[str, int]:
    """Returns token and document counts after appending the tasks' ids to train/val.bin, or
    with shards=(prefix, tokens per shard) to llm.c shards."""
    from tqdm import tqdm

    counts = dict.fromkeys((*SPLITS, "documents"), 0)
    with contextlib.ExitStack() as stack:
        if shards is None:
            outputs = {s: stack.enter_context(open(directory / f"{s}.bin", "wb"))
                       for s in SPLITS}
        else:  # llm.c's numbering: val from 0, train from 1
            outputs = {s: shards_lib.SplitWriter(directory, shards[0], s, shards[1],
                                                 first_index=int(s == "train")) for s in SPLITS}
            for writer in outputs.values():
                stack.callback(writer.close)
        bar = stack.enter_context(tqdm(total=total, desc=desc, unit="B", unit_scale=True,
                                       unit_divisor=1024, file=sys.stderr,
                                       disable=not show_progress))
        if workers == 1:
            _start_worker(encoding)
            results = map(_encode_task, tasks)
        else:
            # spawn, not fork: the parent may be running JAX's threads.
            context = multiprocessing.get_context("spawn")
            pool = stack.enter_context(context.Pool(workers, _start_pool_worker, (encoding,)))
            # imap reads ahead only as far as the pipe to the workers holds, and keeps order.
            results = pool.imap(_encode_task, tasks)
        for split, nbytes, documents, ids in results:
            outputs[split].write(ids if shards else ids.tobytes())
            counts[split] += len(ids)
            counts["documents"] += documents
            bar.update(nbytes)
        bar.update(total - bar.n)  # skipped blank JSONL lines
    return counts


# --------------------------------------------------------------------------- command line


def main(argv: list[str]) -> None:
    p = entry.ArgumentParser(prog="python -m gpt_jax.prepare", description=__doc__)
    p.add_argument("input", type=Path, help="a UTF-8 text file, a directory, or a .jsonl file")
    p.add_argument("--out", type=Path, required=True, help="directory to create")
    p.add_argument("--val_fraction", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=None,
                   help="encoding processes (default: min(CPUs, 8); 1 under 8 MiB)")
    p.add_argument("--text_field", default="text", help="the JSONL field holding the text")
    p.add_argument("--encoding", default="gpt2", help="tiktoken encoding")
    p.add_argument("--overwrite", action="store_true", help="replace a prepared --out")
    p.add_argument("--shard_tokens", type=int, default=None,
                   help="write llm.c token shards of this many tokens (llm.c: 100000000) "
                        "instead of train.bin and val.bin")
    args = p.parse_args(argv)
    entry.main(lambda: prepare_bpe_corpus(
        args.input, args.out, val_fraction=args.val_fraction, workers=args.workers,
        text_field=args.text_field, encoding=args.encoding, overwrite=args.overwrite,
        shard_tokens=args.shard_tokens),
        interrupted=f"interrupted; {args.out} was left as it was")


if __name__ == "__main__":
    main(sys.argv[1:])
