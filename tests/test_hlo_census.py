"""`benchmarks/hlo_fusions.py --census`: the kernels a while loop's body launches, counted
from an optimized HLO dump, and what one program adds to another (here on the CPU's HLO;
the tool is run on GPU dumps, benchmarks/results/thresholds_once_h200/)."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import hlo_fusions


def _loop_hlo(threshold: bool) -> str:
    def f(x, w, t):
        def body(c):
            i, y = c
            h = jnp.tanh(y @ w)
            if threshold:
                h = jnp.where(jnp.abs(h) >= t, h, 0.0)
            return i + 1, jnp.sin(h @ w.T)

        return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1]

    x, w, t = jnp.ones((4, 64)), jnp.ones((64, 96)), jnp.ones((96,))
    return jax.jit(f).lower(x, w, t).compile().as_text()


def test_census_counts_the_loop_body_and_the_difference(tmp_path, capsys):
    dense, sparse = _loop_hlo(False), _loop_hlo(True)
    comps = hlo_fusions.computations(dense)
    body = hlo_fusions.loop_body(comps)
    assert body is not None and body in comps
    counts = hlo_fusions.census(comps)
    assert sum(counts.values()) >= 2  # at least the two matmuls
    assert all(n > 0 for n in counts.values())
    (tmp_path / "a_dense.after_optimizations.txt").write_text(dense)
    (tmp_path / "b_sparse.after_optimizations.txt").write_text(sparse)
    assert hlo_fusions.main([str(tmp_path), "--census", "--module-re", "."]) == 0
    out = capsys.readouterr().out
    assert "b_sparse.after_optimizations.txt minus a_dense.after_optimizations.txt" in out
    diff = out.split(" minus ")[-1].splitlines()[1:]
    assert diff, out  # the threshold changes what the body launches
    assert any("select" in line or "where" in line for line in diff), out
