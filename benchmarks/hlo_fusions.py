"""Print the fused computations behind named GPU kernels, from an XLA dump: what a
profile's top kernels (`decode.profile_steps`' `top_kernels_ms_per_step`) actually compute.

    XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_text" python benchmarks/dejavu_heads.py ...
    python benchmarks/hlo_fusions.py DIR RESULT.json [--module-re loop_fn] [--max-lines 40]

For each row of RESULT.json with a profile: the first module matching `--module-re` (in
compile order, file names sorted) that launches every fusion among its top kernels, and
for each top kernel the instruction that launches it (one line), how many call sites the
computation it calls has, and that computation's body (first `--max-lines` lines). Kernel names are XLA's fusion names, unique within a module; a
fused computation shared by several call sites (e.g. the same fusion in every unrolled
layer) is one name, called that many times. A profile writes `.` in a name as `_`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
CALLS = re.compile(r"calls=%?([\w.\-]+)")


def computations(text: str) -> dict[str, list[str]]:
    """name -> lines of each computation of an HLO module's text."""
    out, name, body = {}, None, []
    for line in text.splitlines():
        m = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if m and not line.startswith(" "):
            name, body = m.group(1), []
            continue
        if line.startswith("}") and name is not None:
            out[name] = body
            name = None
            continue
        if name is not None:
            body.append(line.rstrip())
    return out


def short(line: str) -> str:
    """An HLO line with its metadata cut to the last two parts of the jax op name."""
    m = re.search(r'op_name="([^"]*)"', line)
    line = re.sub(r",?\s*metadata=\{[^}]*\}", "", line).strip()
    return line + (f"  # {'/'.join(m.group(1).split('/')[-2:])}" if m else "")


def launch_sites(comps: dict[str, list[str]], kernel: str) -> list[tuple[str, str]]:
    """(computation, line) of each instruction named `kernel` (`.` read as `_`)."""
    want = kernel.replace(".", "_")
    return [
        (cname, line)
        for cname, body in comps.items()
        for line in body
        if (m := INSTR.match(line)) and m.group(1).replace(".", "_") == want
    ]


def describe(comps: dict[str, list[str]], kernel: str, max_lines: int) -> list[str]:
    """The launching instruction of `kernel`, its call count and its called body."""
    sites = launch_sites(comps, kernel)
    if not sites:
        return [f"{kernel}: not found in these modules"]
    cname, line = sites[0]
    out = [f"{kernel} (in {cname}, {len(sites)} site(s)): {short(line)[:400]}"]
    called = CALLS.search(line)
    if called and called.group(1) in comps:
        name, body = called.group(1), comps[called.group(1)]
        n_calls = sum(
            1 for b in comps.values() for ln in b if (c := CALLS.search(ln)) and c.group(1) == name
        )
        out.append(f"  calls {name} ({n_calls} call site(s)), {len(body)} lines:")
        out += ["    " + short(ln)[:300] for ln in body[:max_lines]]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dump_dir", help="the --xla_dump_to directory")
    p.add_argument("result", help="a benchmark JSON whose rows have a `profile`")
    p.add_argument("--module-re", default="loop_fn", help="modules to read (regex on file names)")
    p.add_argument("--max-lines", type=int, default=40)
    args = p.parse_args(argv)
    files = sorted(
        f
        for f in Path(args.dump_dir).glob("*after_optimizations.txt")
        if re.search(args.module_re, f.name)
    )
    if not files:
        print(f"no *after_optimizations.txt matching {args.module_re!r} in {args.dump_dir}")
        return 1
    rows = json.loads(Path(args.result).read_text())["rows"]
    modules = [(f.name, computations(f.read_text())) for f in files]
    for row in rows:
        top = row.get("profile", {}).get("top_kernels_ms_per_step", {})
        label = row.get("setup") or row.get("method")
        fusions = [k for k in top if "fusion" in k]
        # the row's module: the first (in compile order) that launches all its fusions
        found = [
            (name, comps) for name, comps in modules if all(launch_sites(comps, k) for k in fusions)
        ]
        if not found:
            print(f"=== {label}: no module launches all of {fusions}")
            continue
        name, comps = found[0]
        print(f"=== {label}: {name}")
        for kernel, ms in top.items():
            print(f"--- {kernel} {ms:.3f} ms/step")
            print("\n".join(describe(comps, kernel, args.max_lines)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
