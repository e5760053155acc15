"""experiments/l2_traffic_model.py: the L2 model that reads beside the column-band A/B (Tiles.band)."""

import pytest

from experiment_scripts import load

model = load("l2_traffic_model")


@pytest.mark.parametrize("kernel", ["rows", "contract"])
@pytest.mark.parametrize("band", [0, 2])
def test_an_l2_that_holds_everything_reads_each_byte_once(kernel, band):
    r = model.hbm_bytes(kernel, groups=3, rows_per_group=256, k=256, n=1024, band=band, l2_bytes=1e12, ctas=5)
    assert r["read_gb"] == pytest.approx(r["unique_read_gb"])
    out = 3 * (256 * 1024 if kernel == "rows" else 256 * 1024) * 2 / 1e9   # [rows, n] or [k, n] per group, bf16
    assert r["written_gb"] == pytest.approx(out)


def test_bands_change_what_a_small_l2_rereads():
    """Row-major, the 4 CTAs at once read 4 n tiles of one row block: each lhs tile once, but each rhs tile again
    for every row block (an L2 of one step's tiles keeps nothing). Bands of 1 swap the roles: each rhs tile once."""
    kw = dict(groups=1, rows_per_group=512, k=128, n=1024, ctas=4)
    step = 4 * (128 * 64 + 64 * 256) * 2                       # one lockstep step's lhs and rhs tiles, bytes
    a_all, b_all = 512 * 128 * 2 / 1e9, 128 * 1024 * 2 / 1e9  # lhs and rhs, GB
    row_major = model.hbm_bytes("rows", band=0, l2_bytes=step, **kw)
    banded = model.hbm_bytes("rows", band=1, l2_bytes=step, **kw)
    assert row_major["read_gb"] == pytest.approx(a_all + 4 * b_all)   # 4 row blocks each read all of rhs
    assert banded["read_gb"] == pytest.approx(4 * a_all + b_all)      # 4 n tiles each read all of lhs
