"""Full-size shapes through the compiled GPU kernels, on a CUDA machine only
(`PALLAS_KERNELS_TEST_IMPLS=gpu`, tests/tiny.py's `GPU_IMPL`; on a CPU the same widths are
traced for shapes only, tests/test_full_size_shapes.py). Two Llama-3-8B blocks with random
float32 weights decode through the kernels with the logits of the masked dense XLA path,
at batch 1 (rows one by one) and 2 (the tensor cores): TEAL at 50% (masked tiles), TEAL at
90% (lists of active rows: 4 segments per list on d=4096, 14 on m=14336) and CHESS at 50%
(the gate's rule inside `gated_matvec`), with fused norms on 4096-wide rows and the
packed attention, as `benchmarks/decode.py` runs them (which checks speed, not values).

float32, with XLA's matmuls at full precision (not TF32): in bfloat16 the two paths round
at different places, a rounding can move an activation across its threshold, and with
random weights one such move changes the logits entirely (tried on the CPU in interpret
mode on a smaller model: in bfloat16 with weights scaled by 4, 1.2% to 109% apart; in
float32, 3e-7 to 6e-7)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity import rel_err
from tiny import GPU_IMPL, decode_logits

from jaxsparse.config import full_size_shapes
from jaxsparse.measure import dense_taps, tap
from jaxsparse.models import Kernels, build_model, init_params
from jaxsparse.registry import kernels_for_method
from jaxsparse.rules import TENSORS, tensor_width

pytestmark = [
    pytest.mark.skipif(
        GPU_IMPL != "gpu",
        reason="compiled GPU kernels: PALLAS_KERNELS_TEST_IMPLS=gpu on a CUDA machine",
    ),
    pytest.mark.usefixtures("full_precision"),  # tests/conftest.py
]

LLAMA3_8B = full_size_shapes()["llama3-8b"]
CONFIG = LLAMA3_8B.replace(num_layers=2, layer_types=LLAMA3_8B.layer_types[:2], dtype="float32")
# what each method thresholds (CHESS's down_in zeros come from its gate)
THRESHOLDED = {"teal": ("q_in", "kv_in", "o_in", "ffn_in", "down_in"), "chess": ("gate",)}


@pytest.fixture(scope="module")
def model_and_prompt():
    params = init_params(CONFIG, seed=3)
    prompt = jax.random.randint(jax.random.key(5), (2, 12), 3, 250)
    return params, prompt, {}  # the dense model's logits by batch, made once


def _thresholds(params, prompt, method: str, sparsity: float) -> dict:
    """Per layer, each thresholded point's `sparsity`-quantile of |x| over the prompt's
    dense activations, for every channel; zero at the other points."""
    taps = jax.jit(lambda p, t: dense_taps(build_model(CONFIG), p, t, jnp.ones(t.shape, bool)))(
        params, prompt
    )
    out = {}
    for i in range(CONFIG.num_layers):
        layer = {}
        for point in TENSORS:
            width = tensor_width(point, CONFIG.hidden_size, CONFIG.q_dim, CONFIG.intermediate_size)
            t = 0.0
            if point in THRESHOLDED[method]:
                x = np.abs(np.asarray(tap(taps, i, point), np.float32))
                t = float(np.quantile(x, sparsity))
            layer[point] = jnp.full((width,), t, jnp.float32)
        out[f"layers_{i}"] = layer
    return out


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("method,sparsity", [("teal", 0.5), ("teal", 0.9), ("chess", 0.5)])
def test_kernels_give_masked_dense_logits_at_llama3_8b_widths(
    model_and_prompt, method, sparsity, batch
):
    params, prompt, dense_by_batch = model_and_prompt
    prompt = prompt[:batch]
    thresholds = _thresholds(params, prompt, method, sparsity)
    kernels = kernels_for_method(method, "pallas", GPU_IMPL, thresholds, sparsity=sparsity)
    assert bool(kernels.compact_points) == (sparsity >= 0.65)
    if batch not in dense_by_batch:
        dense_by_batch[batch] = decode_logits(CONFIG, params, Kernels(), None, prompt, 2)
    dense = dense_by_batch[batch]
    masked, masked_zeros = decode_logits(
        CONFIG, params, Kernels(), thresholds, prompt, 2, zeros=True
    )
    have, have_zeros = decode_logits(CONFIG, params, kernels, thresholds, prompt, 2, zeros=True)
    assert np.all(np.isfinite(have))
    assert have_zeros.shape == masked_zeros.shape and 0.1 < masked_zeros.mean() < 0.99
    gap, err = rel_err(masked, dense), rel_err(have, masked)
    assert gap > 0.02, f"the thresholds changed little: {gap:.3g}"
    # An activation within a rounding of its threshold may land on the other side on one
    # path (the fused norm and XLA's add in another order): then its row is read on one
    # path only. Such flips must be rare, and only then may the logits move, by far less
    # than the thresholds move them.
    flips = int(np.sum(have_zeros != masked_zeros))
    assert flips <= 1e-4 * masked_zeros.size, f"{flips} of {masked_zeros.size} decisions differ"
    bound = 1e-4 if flips == 0 else 0.02 * gap
    assert err < bound, (
        f"kernels vs masked XLA {err:.3g} ({flips} flips; masked vs dense {gap:.3g})"
    )
