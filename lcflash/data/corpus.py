"""The text corpus: which files, in what order, split how, as one token stream per split.

With no `data.path` the corpus is the running interpreter's standard library sources (`*.py` under
`sysconfig.get_paths()['stdlib']`, site-packages excluded): real text that exists on every machine. Files are
read in sorted path order and split into train/validation by a hash of their path relative to the corpus
root, so the split does not move when files are added elsewhere. Each document becomes `[bos] tokens [eos]`.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import sysconfig
import zlib

import numpy as np

from lcflash.data.tokenize import DataError, make_tokenizer

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def default_corpus_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def _walk(root: str, suffix: str | None) -> list[str]:
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS and not x.startswith("."))
        out += [os.path.join(d, f) for f in sorted(files) if (suffix is None or f.endswith(suffix))
                and not f.startswith(".")]
    return out


def list_files(path: str) -> tuple[str, list[str]]:
    """(root used for relative names, sorted file list) for a data path: '' (stdlib), a file, a directory or a glob."""
    if not path:
        root = default_corpus_root()
        return root, _walk(root, ".py")
    if os.path.isdir(path):
        return path, _walk(path, None)
    if os.path.lexists(path):
        return os.path.dirname(path) or ".", [path]
    if any(c in path for c in "*?["):
        matches = sorted(p for p in glob.glob(path, recursive=True) if not os.path.isdir(p))
        if not matches:
            raise DataError(f"data.path = {path!r}: the glob matches no files")
        return os.path.commonpath([os.path.dirname(p) or "." for p in matches]), matches
    raise DataError(f"data.path = {path!r} does not exist (give a text file, a directory, a glob such as "
                    f"'corpus/**/*.txt', or '' for the Python standard library)")


def split_files(root: str, files: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic file-level split by crc32 of the relative path."""
    train, val = [], []
    for f in files:
        rel = os.path.relpath(f, root)
        (val if zlib.crc32(rel.encode()) % 10_000 < val_fraction * 10_000 else train).append(f)
    return train, val


def read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as e:
        raise DataError(f"cannot read data file {path!r}: {e.strerror or e}") from e


def encode_files(files: list[str], tokenizer) -> tuple[np.ndarray, int]:
    """One stream `[bos] doc [eos] [bos] doc [eos] ...` and the number of text bytes in it."""
    parts, n_bytes = [], 0
    for f in files:
        data = read_file(f)
        if not data:
            continue
        n_bytes += len(data)
        parts += [np.asarray([tokenizer.bos_id], np.int32), tokenizer.encode(data),
                  np.asarray([tokenizer.eos_id], np.int32)]
    if not parts:
        return np.zeros((0,), np.int32), 0
    return np.concatenate(parts), n_bytes


@dataclasses.dataclass
class Corpus:
    train: np.ndarray            # token stream (int32)
    val: np.ndarray
    tokenizer: object
    source: str
    n_train_files: int
    n_val_files: int
    fingerprint: str             # hash of the file list and token counts, stored in checkpoints

    def token_bytes(self, vocab_size: int) -> np.ndarray:
        return self.tokenizer.token_bytes(vocab_size)


def load_corpus(data_cfg, model_cfg) -> Corpus:
    """Reads, tokenizes and splits the corpus named by the `data` config section."""
    if not 0.0 < data_cfg.val_fraction < 1.0:
        raise DataError(f"data.val_fraction = {data_cfg.val_fraction} must be in (0, 1)")
    tok = make_tokenizer(data_cfg.tokenizer, model_cfg.vocab_size, model_cfg.bos_token_id, model_cfg.eos_token_id)
    root, files = list_files(data_cfg.path)
    if not files:
        raise DataError(f"data.path = {data_cfg.path!r}: no files found under {root!r}")
    train_files, val_files = split_files(root, files, data_cfg.val_fraction)
    by_tokens = not train_files or not val_files
    if by_tokens:  # too few files for a file-level split: split the one stream by position instead
        stream, n_bytes = encode_files(files, tok)
        cut = int(len(stream) * (1.0 - data_cfg.val_fraction))
        train, val = stream[:cut], stream[cut:]
    else:
        train, n_bytes = encode_files(train_files, tok)
        val, n_val_bytes = encode_files(val_files, tok)
        n_bytes += n_val_bytes
    if hasattr(tok, "set_bytes_per_token"):
        n_special = 2 * len(files)
        tok.set_bytes_per_token(n_bytes, len(train) + len(val) - n_special)
    need = data_cfg.seq_len + 1
    for name, s in (("training", train), ("validation", val)):
        if len(s) < need:
            raise DataError(f"data.path = {data_cfg.path or root!r}: the {name} split has {len(s)} tokens, fewer "
                            f"than data.seq_len + 1 = {need}; give more text or a smaller data.seq_len")
    h = hashlib.sha256()
    for f in files:
        h.update(os.path.relpath(f, root).encode() + b"\0")
    h.update(f"{len(train)}/{len(val)}/{tok.name}".encode())
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.int32
    return Corpus(train.astype(dtype), val.astype(dtype), tok, data_cfg.path or f"stdlib:{root}",
                  len(files) if by_tokens else len(train_files), 0 if by_tokens else len(val_files),
                  h.hexdigest()[:16])
