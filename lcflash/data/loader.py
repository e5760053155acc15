"""Packed, shuffled, resumable batches from a token stream (plain numpy; no worker processes).

The stream is cut into windows of `seq_len + 1` tokens that overlap by one, so every token is a target once.
Each epoch visits the windows in a permutation drawn from (seed, epoch). The loader's whole state is one
integer, the number of windows consumed, which the checkpoint stores: batch `i` is a pure function of it.

Windows hold several documents: `segment_ids` separates them in attention, `positions` restart at each
document's bos, and `loss_mask` drops the one target per boundary that would predict the next document's bos.
"""

from __future__ import annotations

import numpy as np


def pack_windows(w_bl: np.ndarray, bos_id: int) -> dict:
    """[B, L+1] windows -> model inputs, targets, positions, segment ids and loss mask ([B, L] each)."""
    w_bl = w_bl.astype(np.int32)
    is_bos = w_bl == bos_id
    seg = np.cumsum(is_bos, axis=1, dtype=np.int32)
    x, y = w_bl[:, :-1], w_bl[:, 1:]
    t = np.arange(x.shape[1], dtype=np.int32)[None, :]
    last_bos = np.maximum.accumulate(np.where(is_bos[:, :-1], t, 0), axis=1)
    return {
        "inputs": x,
        "targets": y,
        "positions": (t - last_bos).astype(np.int32),
        "segment_ids": seg[:, :-1],
        "loss_mask": (seg[:, 1:] == seg[:, :-1]).astype(np.float32),
    }


class PackedLoader:
    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, bos_id: int, seed: int = 0,
                 shuffle: bool = True, position: int = 0):
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.bos_id, self.seed, self.shuffle = bos_id, seed, shuffle
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise ValueError(f"stream of {len(tokens)} tokens is shorter than one window of {seq_len + 1}")
        self.position = int(position)
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_windows)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perm_epoch = epoch
        return self._perm

    def window_ids(self, start: int, count: int) -> np.ndarray:
        g = np.arange(start, start + count)
        out = np.empty((count,), np.int64)
        for epoch in np.unique(g // self.n_windows):
            sel = g // self.n_windows == epoch
            out[sel] = self._order(int(epoch))[g[sel] % self.n_windows]
        return out

    def batch_at(self, position: int) -> dict:
        ids = self.window_ids(position, self.batch_size)
        idx = ids[:, None] * self.seq_len + np.arange(self.seq_len + 1)[None, :]
        return pack_windows(self.tokens[idx], self.bos_id)

    def next(self) -> dict:
        b = self.batch_at(self.position)
        self.position += self.batch_size
        return b

    @property
    def epoch(self) -> float:
        return self.position / self.n_windows
