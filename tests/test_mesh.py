"""Several devices give the results of one: on 8 fake CPU devices
(`--xla_force_host_platform_device_count=8`, set in a subprocess before jax starts), for
the meshes data=8, data=4 x model=2 and model=8 and the methods dense, chess, chess+, teal
and dejavu on a tiny random model, the next-token log-likelihoods (log-softmax of the
logits) and the perplexity `Evaluator` reports, and the
greedy tokens and measured sparsity of `Generator` (through the sparse kernels, run per
shard, in their reference implementation) equal those on one device; `calibrate` on a mesh
fits the thresholds it fits on one device.

One subprocess runs every case (`python tests/test_mesh.py` prints them as JSON); the
tests read its output.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

MESHES = ("data=8", "data=4,model=2", "model=8")
METHODS = ("dense", "chess", "chess+", "teal", "dejavu")


class ByteTok:
    """One token per byte (ids 3-258 cut to the tiny vocabulary); EOS 0."""

    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [3 + b % 250 for b in text.encode("utf-8")]


def while_body_ops(hlo: str, op: str, result: str = "") -> int:
    """How many `op` instructions (sync or `-start`) the bodies of the while loops in the
    optimized HLO text `hlo` hold; with `result` (such as "s32["), only those whose result
    type starts with it."""
    bodies = set(re.findall(r"\bwhile\(.*?\bbody=%?([\w.\-]+)", hlo))
    assert bodies, "no while loop in the HLO"
    count, current = 0, None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$", line)
        if header:
            current = header.group(1)
        elif line.strip() == "}":
            current = None
        elif current in bodies and (not result or re.search(rf"= \(?{re.escape(result)}", line)):
            count += len(re.findall(rf"\b{op}(-start)?\(", line))
    return count


def run_cases() -> dict:
    """Every (mesh, method) case against one device; JSON-ready."""
    import jax
    import numpy as np

    from jaxsparse.calibrate import calibrate
    from jaxsparse.config import ModelConfig
    from jaxsparse.data import stdlib_documents
    from jaxsparse.evaluate import Evaluator
    from jaxsparse.generate import Generator
    from jaxsparse.models import init_params
    from jaxsparse.predictors import dejavu_state
    from jaxsparse.registry import kernels_for_method
    from jaxsparse.sharding import make_mesh, mesh_from_spec, put_batch
    from jaxsparse.sparsity import dense_state

    assert len(jax.devices()) == 8, jax.devices()
    config = ModelConfig(
        model_type="llama",
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=8,
        num_kv_heads=4,
        head_dim=4,
        eos_token_ids=(0,),
    )
    params = init_params(config, seed=1)
    tok = ByteTok()
    one = make_mesh(1, 1, jax.devices()[:1])
    cal = {"tokens": 512, "seq_len": 32, "batch_size": 8, "progress": False}
    states = {
        k[0]: v
        for k, v in calibrate(
            config, params, tok, ["chess", "chess+", "teal"], [0.5], mesh=one, **cal
        ).items()
    }
    states["dense"] = dense_state(config)
    rng = np.random.default_rng(0)
    L, d, m, h, r = config.num_layers, 32, 64, 8, 8
    shapes = {
        "ffn_w1": (L, d, r),
        "ffn_b1": (L, r),
        "ffn_w2": (L, r, m),
        "ffn_b2": (L, m),
        "head_w1": (L, d, r),
        "head_b1": (L, r),
        "head_w2": (L, r, h),
        "head_b2": (L, h),
    }
    states["dejavu"] = dejavu_state(
        config, {k: rng.normal(0, 0.5, s).astype(np.float32) for k, s in shapes.items()}, 24, 5
    )

    text = " ".join(doc.text for doc in stdlib_documents("evaluation")[:20])
    ppl_ids = np.asarray(tok.encode(text)[:256], np.int32)
    prompts = [
        tok.encode(doc.text)[:n]
        for doc, n in zip(stdlib_documents("evaluation")[20:28], (3, 5, 8, 9, 12, 4, 16, 7))
    ]
    tokens = ppl_ids[: 8 * 32].reshape(8, 32)
    valid = np.ones(tokens.shape, bool)
    # one Generator per params layout: teal's kernels serve dense, chess and teal
    layouts = {"teal": ("dense", "chess", "teal"), "chess+": ("chess+",), "dejavu": ("dejavu",)}

    def results(mesh) -> dict:
        out = {}
        ev = Evaluator(config, params, tok, seq_len=32, batch_size=8, mesh=mesh, progress=False)
        for method in METHODS:
            # the log-softmax of the logits at every next token, from the forward
            # `evaluate` compiled (the same shapes: no compile of its own)
            ll = ev.forward(
                ev.params,
                put_batch(tokens, ev.mesh),
                put_batch(valid, ev.mesh),
                ev._thresholds(states[method]),
            )["next_ll"]
            res = ev.evaluate(states[method], ppl_ids)
            out[method] = {
                "ll": np.asarray(ll, np.float64),
                "perplexity": res["perplexity"],
                "ffn_sparsity": res["measured_sparsity"]["ffn"],
            }
        for layout, methods in layouts.items():
            gen = Generator(config, params, kernels=kernels_for_method(layout, "pallas"), mesh=mesh)
            for method in methods:
                g = gen.generate_ids(
                    prompts, 6, thresholds=states[method].thresholds_for_model(), stop_at_eos=False
                )
                out[method].update(tokens=g.tokens, decode_sparsity=g.measured_sparsity)
            # the collectives in the body of the compiled decode loop: once per step
            loops = [c.as_text() for sig, c in gen._compiled.items() if sig[0] == "loop"]
            assert loops
            out.setdefault("_loop", {})[layout] = {
                op: sum(while_body_ops(t, op) for t in loops) for op in ("all-gather", "all-reduce")
            }
            # the zero counts are the loop's only int32 sums
            out["_loop"][layout]["int_all_reduce"] = sum(
                while_body_ops(t, "all-reduce", "s32[") for t in loops
            )
        return out

    ref = results(one)
    ref.pop("_loop")
    report = {"single": {m: {k: v for k, v in r.items() if k != "ll"} for m, r in ref.items()}}
    for spec in MESHES:
        got = results(mesh_from_spec(spec))
        report[spec] = {"_loop": got.pop("_loop")}
        for method in METHODS:
            a, b = ref[method], got[method]
            report[spec][method] = {
                "ll_max_abs_diff": float(np.max(np.abs(a["ll"] - b["ll"]))),
                "ll_max_abs": float(np.max(np.abs(a["ll"]))),
                **{k: v for k, v in b.items() if k != "ll"},
            }
    mesh = mesh_from_spec("data=4,model=2")
    fitted = calibrate(config, params, tok, ["teal"], [0.5], mesh=mesh, **cal)
    report["calibrate"] = {}
    for (method, _), st in fitted.items():
        diffs = [
            float(
                np.max(
                    np.abs(
                        np.asarray(st.thresholds[layer][p])
                        - np.asarray(states[method].thresholds[layer][p])
                    )
                )
            )
            for layer in st.thresholds
            for p in st.thresholds[layer]
        ]
        report["calibrate"][method] = max(diffs)
    return report


@pytest.fixture(scope="module")
def report() -> dict:
    # ~40 compilations dominate: LLVM's expensive passes off halves their time (the one-device
    # reference is compiled the same way, so the comparison is unchanged)
    from tiny import fake_devices_report

    flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    return fake_devices_report(__file__, 8, flags)


@pytest.mark.slow
@pytest.mark.parametrize("spec", MESHES)
@pytest.mark.parametrize("method", METHODS)
def test_a_mesh_gives_the_single_device_results(report, spec, method):
    want, got = report["single"][method], report[spec][method]
    assert got["ll_max_abs_diff"] <= 1e-5 * max(1.0, got["ll_max_abs"]), got
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)
    assert got["ffn_sparsity"] == pytest.approx(want["ffn_sparsity"], abs=1e-6)
    assert got["tokens"] == want["tokens"]
    if method != "dense":
        assert got["decode_sparsity"] == pytest.approx(want["decode_sparsity"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("spec", [m for m in MESHES if "model" in m])
def test_split_weights_decode_with_no_all_gather(report, spec):
    """With weights split over `model`, a decode step exchanges only the partial sums of
    the row-split projections (all-reduces): no all-gather. Each step's argmax over a
    vocabulary split over devices cost two all-gathers, ~1 ms each on two H200s, which
    made `model=2` decoding slower than one GPU (jaxsparse/sharding.py)."""
    for layout, ops in report[spec]["_loop"].items():
        assert ops["all-reduce"] > 0, (layout, ops)  # the weights are split: partial sums
        assert ops["all-gather"] == 0, (layout, ops)
        # each device counts the zeros of its own channels (`_count_run`): no exchange
        assert ops["int_all_reduce"] == 0, (layout, ops)


@pytest.mark.slow
def test_the_cases_are_not_trivial(report):
    """Sparse methods zero something and change the result; prompts decode differently."""
    single = report["single"]
    for method in ("chess", "chess+", "teal", "dejavu"):
        assert single[method]["ffn_sparsity"] > 0.2 or method in ("teal", "chess+")
        assert single[method]["perplexity"] != single["dense"]["perplexity"]
    assert len({tuple(t) for t in single["dense"]["tokens"]}) > 1


@pytest.mark.slow
def test_calibrate_on_a_mesh_fits_the_same_thresholds(report):
    for method, diff in report["calibrate"].items():
        assert diff <= 1e-5, (method, diff)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(json.dumps(run_cases()))
