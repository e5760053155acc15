"""Corpus, tokenizers and the packed, resumable loader."""

from lcflash.data.corpus import Corpus, default_corpus_root, list_files, load_corpus  # noqa: F401
from lcflash.data.loader import PackedLoader, pack_windows  # noqa: F401
from lcflash.data.tokenize import BOS, EOS, PAD, ByteTokenizer, DataError, HFTokenizer, make_tokenizer  # noqa: F401
