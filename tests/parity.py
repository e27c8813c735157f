"""What the tests that compare with HF transformers share (importable from any test module:
pytest puts tests/ on sys.path)."""

import numpy as np


def rel_err(a, b) -> float:
    """`||a - b|| / ||b||`, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
