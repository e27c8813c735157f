"""Two teal states at S=0.476055 that differ only by the knob's rounding (thresholds within
2.2e-6 relative, 5.4e-7 absolute): A from `sweep --fractions` (knob 0.47605548663844544),
B from `sweep --sparsities 0.476055`. Perplexity on `jaxsparse eval`'s text (the first
8192 tokens of the built-in evaluation split, windows of 512) with A's thresholds, with
B's, and with B's in some layers or points only. Output: threshold_perturbation.txt.
usage: python threshold_perturbation.py STATE_A STATE_B"""
import dataclasses
import sys

from jaxsparse.evaluate import Evaluator, ppl_token_ids
from jaxsparse.loading import load_model
from jaxsparse.sparsity import load_state

lm = load_model()
ids = ppl_token_ids(lm.config, lm.tokenizer, None, 8192)
ev = Evaluator(lm.config, lm.params, lm.tokenizer, 512, 8, progress=False)
a, b = load_state(sys.argv[1]), load_state(sys.argv[2])


def ppl(layers, points=None):
    th = {name: dict(a.thresholds[name]) for name in a.thresholds}
    for name in layers:
        for p in th[name]:
            if points is None or p in points:
                th[name][p] = b.thresholds[name][p]
    return ev.evaluate(dataclasses.replace(a, thresholds=th), ids)["perplexity"]


L = sorted(a.thresholds, key=lambda s: int(s.split("_")[1]))
print("A", ppl([]))
print("B", ppl(L))
print("B layers 0-14", ppl(L[:15]))
print("B layer 0", ppl(L[:1]))
for p in a.thresholds["layers_0"]:
    print("B layer 0", p, ppl(L[:1], [p]))
