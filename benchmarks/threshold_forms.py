"""decode.py with jaxsparse.rules.sparsify replaced by another form of the same threshold:
usage: python threshold_forms.py FORM DECODE_ARGS...   (FORM: where | mul)"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode
import jax.numpy as jnp

from jaxsparse import rules


def mul_form(x, threshold):
    if threshold is None:
        return x
    keep = jnp.abs(x) >= threshold.astype(x.dtype)
    return x * keep.astype(x.dtype)


form = sys.argv[1]
if form == "mul":
    rules.sparsify = mul_form
elif form != "where":
    raise SystemExit(f"unknown form {form}")
sys.exit(decode.main(sys.argv[2:]))
