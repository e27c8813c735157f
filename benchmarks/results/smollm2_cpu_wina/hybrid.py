"""Uniform allocation, TEAL's score on the q/k/v and gate/up inputs (consumed through
softmax and the gate activation) and WINA's on the o and down inputs (consumed linearly),
the split picked from block_errors_s0.39.json (calibration text). Sparsity solved for an
activated-params fraction TARGET on the first 512 calibration tokens, as `jaxsparse sweep
--fractions` does; the state is written to OUT/hybrid_f<TARGET>.
usage: python hybrid.py OUT TARGET"""
import sys

from jaxsparse.budget import FractionMeter
from jaxsparse.calibrate import gather
from jaxsparse.loading import load_model
from jaxsparse.methods import teal, wina
from jaxsparse.sparsity import make_state, save_state
from jaxsparse.sweep_budget import solve_sparsity

OUT, TARGET, TOL = sys.argv[1], float(sys.argv[2]), 2e-3
lm = load_model()
c = lm.config
cal = gather(c, lm.params, lm.tokenizer, ["teal", "wina"], None, 4096, 512, 8, None,
             model_source=str(lm.source), progress=False)
meter = FractionMeter(c, lm.params, cal.seqs[:1])


def values(s):
    out = {}
    for i in range(c.num_layers):
        out[f"layers_{i}"] = {**teal.group_thresholds(cal.stats, i, {"qkv": s, "gate_up": s}),
                              **wina.group_thresholds(cal.stats, i, {"o": s, "down": s})}
    return out


class Fit:
    def __init__(self, s):
        self.v = values(s)

    def thresholds_for_model(self):
        return self.v


s, frac, trace = solve_sparsity(Fit, meter, TARGET, TOL)
details = {"allocation": "uniform", "scores": {"qkv": "teal", "gate_up": "teal", "o": "wina", "down": "wina"},
           "budget": {"target_fraction": TARGET, "knob": round(s, 6), "knob_name": "sparsity",
                      "calibration_fraction": frac, "measure_tokens": 512, "tol": TOL, "trace": trace},
           "script": "benchmarks/results/smollm2_cpu_wina/hybrid.py"}
save_state(make_state(c, "teal+wina(o,down)", s, values(s), cal.provenance, details),
           f"{OUT}/hybrid_f{TARGET:g}", overwrite=True)
print("solved", s, frac, trace, flush=True)
