"""`benchmarks/profile_decode.traced`: each traced call reads its own trace, even when the
benchmarks reuse one trace directory for many configs (benchmarks/attention.py does)."""

from __future__ import annotations

import sys
from pathlib import Path

import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import profile_decode


def test_traced_reads_its_own_trace_in_a_reused_directory(tmp_path, monkeypatch):
    read = []

    def events_of(d):
        read.append(Path(d))
        return []

    monkeypatch.setattr(profile_decode, "device_kernel_events", events_of)
    outs = [profile_decode.traced(lambda k=k: jnp.arange(4) * k, tmp_path)[0] for k in (1, 2)]
    assert [int(o[-1]) for o in outs] == [3, 6]
    assert len(read) == 2 and read[0] != read[1]
    for d in read:  # one trace each, the one written by that call
        assert d.parent == tmp_path
        assert len(list(d.rglob("perfetto_trace.json.gz"))) == 1
