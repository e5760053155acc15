"""How many bytes the flat rows kernel reads from HBM in each tile order (mgpu_kernels.band_order), by a model of
the L2 cache, to read beside `bash experiments/gpu_calls.sh 13`'s measurements (experiments/gmm_notes.md, session
40).

The model: the CTAs (132) run their tiles in lockstep, one k step at a time, in the kernel's order (CTA c takes
linear tiles c, c + CTAs, ...; `band_order` maps them to (row block, n tile)). Every step each CTA reads one
tile_m x tile_k lhs tile and one tile_k x 2 tile_n rhs tile; a tile's last step writes its output tile. The L2
holds whole tiles, least recently used first out; a read that misses costs its bytes from HBM, and each output
tile is written once. An H100's and an H200's L2 is 50 MB in two halves, so `--l2-mb 25` is the pessimistic case.
It ignores timing (a CTA ahead of the others), the hardware's replacement policy and sector granularity.

    python experiments/l2_traffic_model.py [--bands 0,4,8,12] [--l2-mb 25,50] [--json experiments/l2_traffic_model.json]
"""

import argparse
import collections
import datetime
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lcflash.kernels.gmm.mgpu_kernels import band_order, widest_band  # noqa: E402

# LongCat's expert products with 64 local experts (bench_moe_gemm.SHAPES): (name, kernel, K, N) of each rows
# product (out [rows, N]) and d_rhs (out [K, N] per group). The [gate | up] d_lhs has the down forward's shape.
CASES = [("gate_up fwd", "rows", 6144, 2048), ("down fwd", "rows", 2048, 6144),
         ("gate_up d_rhs", "contract", 6144, 2048), ("down d_rhs", "contract", 2048, 6144)]


def hbm_bytes(kernel: str, groups: int, rows_per_group: int, k: int, n: int, band: int, l2_bytes: float,
              ctas: int = 132, tile_m: int = 128, tile_n2: int = 256, tile_k: int = 64, itemsize: int = 2) -> dict:
    """HBM bytes read and written over equal groups, under the model above, by the flat rows kernel ("rows": out
    [rows, n] = lhs [rows, k] @ rhs[g] [k, n], k in steps of tile_k) or the flat contract kernel ("contract", d_rhs:
    out[g] [k, n] = lhs[rows of g]^T @ dout[rows of g], the group's rows in steps of tile_k, round-robin dealt as
    at LongCat's sizes)."""
    n_tiles = n // tile_n2
    band = widest_band(n_tiles, band)  # as pallas_gmm's ROWS_BAND / CONTRACT_BAND
    a_bytes, b_bytes, out_bytes = tile_m * tile_k * itemsize, tile_k * tile_n2 * itemsize, tile_m * tile_n2 * itemsize
    if kernel == "rows":
        row_tiles, steps = groups * (rows_per_group // tile_m), k // tile_k
        lin = np.arange(row_tiles * n_tiles)
        mt, nt = (np.asarray(a) for a in band_order(lin, n_tiles, row_tiles, band))
        group = mt // (rows_per_group // tile_m)
        a_key = lambda t, s: ("a", int(mt[t]), s)                         # noqa: E731 - lhs rows, k step
        b_key = lambda t, s: ("b", int(group[t]), s, int(nt[t]))          # noqa: E731 - rhs[g], k step, n tile
    else:
        k_tiles, steps = k // tile_m, rows_per_group // tile_k
        lin = np.arange(groups * k_tiles * n_tiles)
        group = lin // (k_tiles * n_tiles)
        mt, nt = (np.asarray(a) for a in band_order(lin % (k_tiles * n_tiles), n_tiles, k_tiles, band))
        mt = group * k_tiles + mt
        a_key = lambda t, s: ("a", int(group[t]), s, int(mt[t]))          # noqa: E731 - lhs rows of g, k tile
        b_key = lambda t, s: ("b", int(group[t]), s, int(nt[t]))          # noqa: E731 - dout rows of g, n tile
    lru, held, read = collections.OrderedDict(), 0.0, 0.0

    def touch(key, size):
        nonlocal held, read
        if key in lru:
            lru.move_to_end(key)
            return
        if key[0] != "out":
            read += size
        lru[key] = size
        held += size
        while held > l2_bytes:
            held -= lru.popitem(last=False)[1]

    for w0 in range(0, len(lin), ctas):
        wave = range(w0, min(w0 + ctas, len(lin)))
        for s in range(steps):
            for t in wave:
                touch(a_key(t, s), a_bytes)
                touch(b_key(t, s), b_bytes)
        for t in wave:
            touch(("out", int(mt[t]), int(nt[t])), out_bytes)
    unique = (groups * rows_per_group * (k + n if kernel == "contract" else k)
              + (0 if kernel == "contract" else groups * k * n)) * itemsize
    return dict(read_gb=read / 1e9, written_gb=len(lin) * out_bytes / 1e9, unique_read_gb=unique / 1e9,
                flops=2.0 * groups * rows_per_group * k * n, band_used=band)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="512,4096", help="tokens per expert, comma-separated")
    ap.add_argument("--bands", default="0,4,8,12", help="Tiles.band values (0: row-major), comma-separated")
    ap.add_argument("--l2-mb", default="25,50", help="L2 capacities to model, MB, comma-separated")
    ap.add_argument("--tflops", type=float, default=720.0, help="the matmul rate the bytes must keep up with "
                    "(the batched einsum's, ~720 TFLOP/s on an H100 in session 40)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    try:
        tokens, bands = [int(t) for t in args.tokens.split(",")], [int(b) for b in args.bands.split(",")]
        l2s = [float(x) for x in args.l2_mb.split(",")]
    except ValueError:
        ap.error("--tokens, --bands and --l2-mb take comma-separated numbers, e.g. --bands 0,8")
    if any(t % 128 for t in tokens) or any(b < 0 for b in bands):
        ap.error(f"--tokens must be multiples of 128 (whole row tiles), --bands >= 0; got {tokens}, {bands}")
    rows = []
    print(f"{'product':16s} {'T':>5s} {'L2 MB':>6s} {'band':>4s} {'read GB':>8s} {'x unique':>8s} "
          f"{'TB/s at ' + str(int(args.tflops)) + ' TF/s':>16s}")
    for name, kernel, k, n in CASES:
        for t in tokens:
            for l2 in l2s:
                for band in bands:
                    r = hbm_bytes(kernel, 64, t, k, n, band, l2 * 1e6)
                    need = (r["read_gb"] + r["written_gb"]) * 1e9 / (r["flops"] / (args.tflops * 1e12)) / 1e12
                    rows.append(dict(product=name, kernel=kernel, tokens_per_expert=t, l2_mb=l2, band=band, **r,
                                     tb_per_s_needed=need))
                    print(f"{name:16s} {t:5d} {l2:6.0f} {band:4d} {r['read_gb']:8.2f} "
                          f"{r['read_gb'] / r['unique_read_gb']:8.2f} {need:16.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           command="python " + " ".join(sys.argv), tflops=args.tflops, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
