"""Tokenizers: bytes (the default) or a Hugging Face `tokenizer.json`.

Byte ids: 0 = pad, 1 = bos, 2 = eos (LongCat's bos/eos ids), byte b -> b + 3, so every vocab >= 259 fits.
`token_bytes` gives the UTF-8 bytes each id stands for, which bits-per-byte needs.
"""

from __future__ import annotations

import os

import numpy as np

PAD, BOS, EOS = 0, 1, 2
BYTE_OFFSET = 3
BYTE_VOCAB = 256 + BYTE_OFFSET


class DataError(ValueError):
    """The corpus or tokenizer cannot be used; the message names the file or field and what would work."""


class ByteTokenizer:
    name = "bytes"
    vocab_size = BYTE_VOCAB
    bos_id, eos_id, pad_id = BOS, EOS, PAD

    def encode(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, np.uint8).astype(np.int32) + BYTE_OFFSET

    def decode(self, ids) -> bytes:
        ids = np.asarray(ids)
        return (ids[ids >= BYTE_OFFSET] - BYTE_OFFSET).astype(np.uint8).tobytes()

    def token_bytes(self, vocab_size: int) -> np.ndarray:
        """Bytes per id: 1 for byte ids, 0 for specials and unused ids."""
        out = np.zeros((vocab_size,), np.float32)
        out[BYTE_OFFSET:BYTE_VOCAB] = 1.0
        return out


class HFTokenizer:
    """A `tokenizers` tokenizer.json; bos/eos are the model's ids, inserted around each document."""

    name = "hf"

    def __init__(self, path: str, bos_id: int, eos_id: int):
        if not os.path.isfile(path):
            raise DataError(f"data.tokenizer = {path!r}: no such file "
                            f"(give a Hugging Face tokenizer.json, or '' for bytes)")
        try:
            from tokenizers import Tokenizer
            self.tok = Tokenizer.from_file(path)
        except Exception as e:  # the tokenizers package raises a plain Exception on bad JSON
            raise DataError(f"data.tokenizer = {path!r} is not a readable tokenizer.json: {e}") from e
        self.path = path
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, PAD
        self._bytes_per_token = None

    def encode(self, data: bytes) -> np.ndarray:
        enc = self.tok.encode(data.decode("utf-8", errors="replace"), add_special_tokens=False)
        return np.asarray(enc.ids, np.int32)

    def decode(self, ids) -> bytes:
        return self.tok.decode([int(i) for i in ids]).encode("utf-8")

    def set_bytes_per_token(self, n_bytes: int, n_tokens: int):
        """Average bytes per text token over a corpus; bits per byte uses it for every non-special id."""
        self._bytes_per_token = n_bytes / max(n_tokens, 1)

    def token_bytes(self, vocab_size: int) -> np.ndarray:
        out = np.full((vocab_size,), self._bytes_per_token or 1.0, np.float32)
        for i in {self.bos_id, self.eos_id, self.pad_id}:
            if i is not None and 0 <= i < vocab_size:
                out[i] = 0.0
        return out


def make_tokenizer(path: str, vocab_size: int, bos_id: int, eos_id: int):
    """Bytes when `path` is empty, else a tokenizer.json. Checks that every id fits the model's vocabulary."""
    if not path:
        if vocab_size < BYTE_VOCAB:
            raise DataError(f"byte tokens need model.vocab_size >= {BYTE_VOCAB}, got {vocab_size}")
        if (bos_id, eos_id) != (BOS, EOS):
            raise DataError(f"byte tokens use bos=1, eos=2; model has bos_token_id={bos_id}, eos_token_id={eos_id}")
        return ByteTokenizer()
    tok = HFTokenizer(path, bos_id, eos_id)
    if tok.vocab_size > vocab_size:
        raise DataError(f"data.tokenizer {path!r} has {tok.vocab_size} ids but model.vocab_size = {vocab_size}; "
                        f"set --config.model.vocab_size={tok.vocab_size} or larger")
    return tok
