"""What the tests that compare with HF transformers share (importable from any test module:
pytest puts tests/ on sys.path)."""

import numpy as np


def rel_err(a, b) -> float:
    """`||a - b|| / ||b||` in float64 (`||a - b||` where b is all zeros); any float dtype,
    bfloat16 included."""
    a, b = np.asarray(a).astype(np.float64), np.asarray(b).astype(np.float64)
    denom = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (denom if denom > 0 else 1.0))
