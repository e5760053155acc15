"""Shared numeric helpers for the tests."""

import numpy as np


def rel(a, b) -> float:
    """Relative L2 error of a against b, in float64; non-finite values (an unwritten output) fail loudly."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all(), "non-finite values"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
