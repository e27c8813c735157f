"""TEAL and WINA with TEAL's block-wise greedy allocation at an equal activated-params fraction.

One greedy search per method and layer up to a per-layer sparsity S_MAX (the search of
`jaxsparse.methods.teal.teal_greedy`, on the same 1024 calibration tokens, keeping its
trace); the allocation at a layer sparsity S <= S_MAX is the trace read at S (the steps
taken up to S, the last one shortened). S is then solved, as `jaxsparse sweep --fractions`
does, for a fraction of weights read of TARGET on the first 512 calibration tokens.
States are written to OUT/<method>_greedy_f<TARGET>; evaluate them with `jaxsparse eval`.
"""
import json, sys, time
import numpy as np
import jax.numpy as jnp

from jaxsparse.loading import load_model
from jaxsparse.calibrate import gather
from jaxsparse.budget import FractionMeter, solve_decreasing
from jaxsparse.methods import teal, wina
from jaxsparse.sparsity import make_state, save_state, model_widths

OUT, TARGET, S_MAX = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
STEP, TOL = 0.05, 2e-3
lm = load_model()
c, params = lm.config, lm.params
opts = {m: {"allocation": "greedy", "greedy_step": STEP, "greedy_tokens": 1024} for m in ("teal", "wina")}
t0 = time.time()
cal = gather(c, params, lm.tokenizer, ["teal", "wina"], None, 4096, 512, 8, opts,
             model_source=str(lm.source), progress=False)
print(f"statistics {time.time() - t0:.0f} s", flush=True)
ctx = cal.context
sizes = teal.group_sizes(c)
widths = model_widths(c)
errors_fn = teal.make_block_error_fn(c)
valid_dev = jnp.asarray(ctx["valid"])
meter = FractionMeter(c, params, cal.seqs[:1])


def at(trace, s):
    """The allocation of a greedy trace [(S_B, alloc)] at layer sparsity s."""
    for (a, fa), (b, fb) in zip(trace, trace[1:]):
        if a - 1e-12 <= s <= b + 1e-12:
            w = 0.0 if b == a else (s - a) / (b - a)
            return {g: fa[g] + w * (fb[g] - fa[g]) for g in fa}
    raise ValueError(f"{s} beyond the trace (max {trace[-1][0]})")


summary = {}
for name, thfn in (("teal", teal.group_thresholds), ("wina", wina.group_thresholds)):
    t1 = time.time()
    traces = []
    for i in range(c.num_layers):
        p = params[f"layers_{i}"]
        x = jnp.asarray(ctx["block_inputs"][i])

        def errors(cands, i=i, p=p, x=x):
            ths = [thfn(cal.stats, i, cd) for cd in cands]
            stack = {pt: jnp.stack([jnp.broadcast_to(jnp.asarray(th.get(pt, 0.0), jnp.float32), (widths[pt],)) for th in ths]) for pt in widths}
            return np.asarray(errors_fn(p, x, valid_dev, stack))

        _, tr = teal.greedy_allocation(errors, sizes, S_MAX, STEP)
        traces.append(tr)
        print(name, "layer", i, f"{time.time() - t1:.0f} s", tr[-1][1], flush=True)
    search_s = time.time() - t1

    def fit(s):
        alloc = {f"layers_{i}": at(traces[i], s) for i in range(c.num_layers)}
        values = {l: thfn(cal.stats, i, alloc[l]) for i, l in enumerate(alloc)}
        return values, alloc

    cache = {}
    def f(s):
        s = float(s)
        if s not in cache:
            cache[s] = meter(fit(s)[0])
        return cache[s]
    trace = []
    s, frac = solve_decreasing(f, TARGET, 0.25, S_MAX, TOL, trace=trace)
    values, alloc = fit(s)
    details = {"allocation": "greedy (trace of one search to S_max, read at S)",
               "greedy_step": STEP, "greedy_tokens": 1024, "s_max": S_MAX,
               "group_sparsity": {l: {g: round(v, 6) for g, v in a.items()} for l, a in alloc.items()},
               "budget": {"target_fraction": TARGET, "knob": round(s, 6), "knob_name": "sparsity",
                          "calibration_fraction": frac, "measure_tokens": 512, "tol": TOL,
                          "trace": trace, "search_seconds": round(search_s, 1)},
               "script": "benchmarks/results/smollm2_cpu_wina/greedy_path.py"}
    st = make_state(c, name, s, values, cal.provenance, details)
    save_state(st, f"{OUT}/{name}_greedy_f{TARGET:g}", overwrite=True)
    summary[name] = {"knob": s, "calibration_fraction": frac, "search_seconds": search_s}
    print(name, "solved", s, frac, flush=True)
print(json.dumps(summary, indent=1))
