"""Tokenizers: characters, GPT-2's BPE (tiktoken) and Hugging Face tokenizer.json files, and
their tables as saved beside a checkpoint."""

import dataclasses
import functools

import numpy as np

from gpt_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
    """One token per character; ids index the sorted unique characters of the corpus."""

    chars: str

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        stoi = {ch: i for i, ch in enumerate(self.chars)}
        unknown = sorted({ch for ch in text if ch not in stoi})
        if unknown:
            shown = ", ".join(repr(ch) for ch in unknown[:10])
            raise UserError(
                f"the text has {len(unknown)} character(s) outside the model's vocabulary "
                f"({shown}): use only characters of the training corpus"
            )
        return [stoi[ch] for ch in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def token_bytes(self) -> np.ndarray:
        """Returns the UTF-8 length of each token's text, int64 (vocab_size,)."""
        return np.array([len(ch.encode("utf-8")) for ch in self.chars], np.int64)

    def to_json(self) -> dict:
        return {"kind": "char", "chars": self.chars}


@dataclasses.dataclass(frozen=True)
class TiktokenTokenizer:
    """GPT-2 byte-pair encoding through tiktoken (corpora from gpt_jax.prepare or nanoGPT)."""

    encoding: str = "gpt2"

    @property
    def _enc(self):
        import tiktoken

        return tiktoken.get_encoding(self.encoding)

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids])

    def token_bytes(self) -> np.ndarray:
        """Returns the byte length of each token, int64 (vocab_size,); 0 for special tokens
        such as <|endoftext|>, which stand for no text (as nanochat counts them)."""
        enc = self._enc
        special = enc.special_tokens_set
        lengths = np.zeros(enc.n_vocab, np.int64)
        for i in range(enc.n_vocab):
            piece = enc.decode_single_token_bytes(i)
            if piece.decode("utf-8", "replace") not in special:
                lengths[i] = len(piece)
        return lengths

    def to_json(self) -> dict:
        return {"kind": "tiktoken", "encoding": self.encoding}


@dataclasses.dataclass(frozen=True)
class HFTokenizer:
    """A Hugging Face tokenizer.json through the `tokenizers` library (Llama, SmolLM, ...).

    Text is encoded as it stands, without the begin-of-text token some tokenizers add (as
    tiktoken encodes it); `eos_id` is the token that ends a sample (None: none does).
    """

    json: str = dataclasses.field(repr=False)  # the tokenizer.json text
    eos_id: int | None = None

    @functools.cached_property
    def _tok(self):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UserError("this model's tokenizer.json needs the tokenizers library: "
                            "pip install tokenizers") from None
        return Tokenizer.from_str(self.json)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """Returns the UTF-8 length of each token's text alone, int64 (vocab_size,); 0 for
        special tokens such as </s>, which stand for no text."""
        special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        return np.array([0 if i in special else len(self.decode([i]).encode("utf-8"))
                         for i in range(self.vocab_size)], np.int64)

    def to_json(self) -> dict:
        return {"kind": "hf", "json": self.json, "eos_id": self.eos_id}


def end_of_text(tokenizer) -> int | None:
    """Returns the id of <|endoftext|> for GPT-2's BPE, the end-of-sequence token of a Hugging
    Face tokenizer.json, None for a character tokenizer."""
    if isinstance(tokenizer, TiktokenTokenizer):
        return tokenizer.encode("<|endoftext|>")[0]
    return tokenizer.eos_id if isinstance(tokenizer, HFTokenizer) else None


def tokenizer_from_json(table: dict):
    """Returns the tokenizer that `tokenizer.to_json()` described."""
    kind = table.get("kind")
    if kind == "char":
        return CharTokenizer(table["chars"])
    if kind == "tiktoken":
        return TiktokenTokenizer(table["encoding"])
    if kind == "hf":
        return HFTokenizer(table["json"], table.get("eos_id"))
    raise UserError(f"unknown tokenizer kind {kind!r} in a saved tokenizer table")
