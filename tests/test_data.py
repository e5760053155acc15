"""Corpus listing, splitting, tokenizers and the packed resumable loader (no model, seconds)."""

import os

import ml_collections
import numpy as np
import pytest

from lcflash.config import ModelConfig
from lcflash.data import (BOS, EOS, ByteTokenizer, DataError, PackedLoader, list_files, load_corpus, make_tokenizer,
                          pack_windows)
from lcflash.data.corpus import split_files

MODEL = ModelConfig(vocab_size=512)


def data_cfg(**kw):
    d = dict(path="", tokenizer="", seq_len=16, val_fraction=0.3, shuffle=True)
    d.update(kw)
    return ml_collections.ConfigDict(d)


def write_corpus(tmp_path, n=8):
    for i in range(n):
        (tmp_path / f"doc{i}.txt").write_text(f"document number {i}\n" * (5 + i))
    return tmp_path


def test_byte_tokenizer_ids():
    tok = ByteTokenizer()
    ids = tok.encode(b"\x00A\xff")
    assert ids.tolist() == [3, 68, 258]
    assert tok.decode(np.array([BOS, *ids, EOS])) == b"\x00A\xff"
    tb = tok.token_bytes(512)
    assert tb[:3].sum() == 0 and tb[3:259].sum() == 256 and tb[259:].sum() == 0


def test_byte_tokenizer_needs_room():
    with pytest.raises(DataError, match="vocab_size >= 259"):
        make_tokenizer("", 200, 1, 2)


def test_pack_windows_positions_segments_mask():
    # window: [x x BOS a b EOS BOS c] -> inputs are the first 7, targets the last 7
    w = np.array([[10, 11, BOS, 20, 21, EOS, BOS, 30]])
    b = pack_windows(w, BOS)
    assert b["inputs"].tolist() == [[10, 11, BOS, 20, 21, EOS, BOS]]
    assert b["targets"].tolist() == [[11, BOS, 20, 21, EOS, BOS, 30]]
    assert b["positions"].tolist() == [[0, 1, 0, 1, 2, 3, 0]]
    assert b["segment_ids"].tolist() == [[0, 0, 1, 1, 1, 1, 2]]
    # targets that are the next document's bos are not scored
    assert b["loss_mask"].tolist() == [[1, 0, 1, 1, 1, 0, 1]]


def test_loader_deterministic_and_resumable():
    tokens = np.arange(1000) % 250 + 3
    a = PackedLoader(tokens, 16, 4, BOS, seed=3)
    seq = [a.next() for _ in range(30)]            # crosses epoch boundaries (62 windows per epoch)
    b = PackedLoader(tokens, 16, 4, BOS, seed=3, position=4 * 17)
    for i in range(17, 30):
        nb = b.next()
        for k in nb:
            np.testing.assert_array_equal(nb[k], seq[i][k])
    # every window of an epoch is visited once
    first_epoch = a.window_ids(0, a.n_windows)
    assert sorted(first_epoch.tolist()) == list(range(a.n_windows))
    # a different seed gives a different order
    assert not np.array_equal(PackedLoader(tokens, 16, 4, BOS, seed=4).window_ids(0, 20), a.window_ids(0, 20))


def test_windows_cover_every_target_once():
    tokens = np.arange(1, 50)
    ld = PackedLoader(tokens, 8, 1, BOS, shuffle=False)
    tg = np.concatenate([ld.batch_at(i)["targets"][0] for i in range(ld.n_windows)])
    np.testing.assert_array_equal(tg, tokens[1:1 + 8 * ld.n_windows])


def test_default_corpus_is_stdlib_and_split_is_deterministic():
    root, files = list_files("")
    assert files == sorted(files) or all(f.endswith(".py") for f in files)
    assert any(f.endswith(os.path.join("json", "decoder.py")) for f in files)
    assert not any("site-packages" in f for f in files)
    tr1, va1 = split_files(root, files, 0.05)
    tr2, va2 = split_files(root, list(reversed(files)), 0.05)
    assert set(va1) == set(va2) and 0 < len(va1) < len(files) // 5


def test_corpus_from_directory_and_glob(tmp_path):
    write_corpus(tmp_path)
    c1 = load_corpus(data_cfg(path=str(tmp_path)), MODEL)
    c2 = load_corpus(data_cfg(path=str(tmp_path / "*.txt")), MODEL)
    np.testing.assert_array_equal(c1.train, c2.train)
    assert c1.fingerprint == c2.fingerprint
    assert c1.train[0] == BOS and (c1.train == EOS).sum() == c1.n_train_files


def test_single_file_splits_by_position(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("hello world " * 100)
    c = load_corpus(data_cfg(path=str(f), val_fraction=0.1), MODEL)
    assert c.n_val_files == 0 and len(c.val) > 16 and len(c.train) > 8 * len(c.val)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(data_cfg(path=str(tmp_path / "nope")), MODEL)
    with pytest.raises(DataError, match="glob matches no files"):
        load_corpus(data_cfg(path=str(tmp_path / "*.nothing")), MODEL)


def test_unreadable_file_is_a_clear_error(tmp_path):
    write_corpus(tmp_path)
    os.symlink(tmp_path / "gone.txt", tmp_path / "broken.txt")   # dangling: cannot be opened, even by root
    with pytest.raises(DataError, match="cannot read data file .*broken.txt"):
        load_corpus(data_cfg(path=str(tmp_path / "*.txt")), MODEL)


def test_too_little_text(tmp_path):
    (tmp_path / "a.txt").write_text("hi")
    with pytest.raises(DataError, match="fewer than data.seq_len"):
        load_corpus(data_cfg(path=str(tmp_path / "a.txt")), MODEL)


def test_hf_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers
    write_corpus(tmp_path)
    tk = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel()
    tk.train([str(p) for p in sorted(tmp_path.glob("*.txt"))],
             trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = str(tmp_path / "tokenizer.json")
    tk.save(path)
    c = load_corpus(data_cfg(path=str(tmp_path / "*.txt"), tokenizer=path), MODEL)
    assert c.tokenizer.name == "hf" and c.train.max() < tk.get_vocab_size() and tk.get_vocab_size() > 256
    # fewer tokens than bytes, and bits per byte uses the measured bytes per token
    tb = c.token_bytes(512)
    assert tb[BOS] == 0 and tb[10] > 1.0
    with pytest.raises(DataError, match="model.vocab_size"):
        load_corpus(data_cfg(path=str(tmp_path / "*.txt"), tokenizer=path), ModelConfig(vocab_size=100, moe_topk=12))
    with pytest.raises(DataError, match="no such file"):
        load_corpus(data_cfg(tokenizer=str(tmp_path / "missing.json")), MODEL)
