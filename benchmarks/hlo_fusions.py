"""Print the fused computations behind named GPU kernels, from an XLA dump: what a
profile's top kernels (`decode.profile_steps`' `top_kernels_ms_per_step`) actually compute.

    XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_text" python benchmarks/dejavu_heads.py ...
    python benchmarks/hlo_fusions.py DIR RESULT.json [--module-re loop_fn] [--max-lines 40]
    python benchmarks/hlo_fusions.py DIR --census [--module-re loop_fn]

For each row of RESULT.json with a profile: the first module matching `--module-re` (in
compile order, file names sorted) that launches every fusion among its top kernels, and
for each top kernel the instruction that launches it (one line), how many call sites the
computation it calls has, and that computation's body (first `--max-lines` lines). Kernel names are XLA's fusion names, unique within a module; a
fused computation shared by several call sites (e.g. the same fusion in every unrolled
layer) is one name, called that many times. A profile writes `.` in a name as `_`.

`--census`: for each matching module, every kernel its while loop's body launches, counted
by kind (fusion kind, or the instruction's opcode), output shape and the jax op name of
what the fusion computes last; then, module by module, the kinds that differ from the
first module's counts. Two runs of one program differ only in what they add (e.g. a
sparse method's thresholds and zero counts against dense): the difference names them.
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


NOT_LAUNCHED = {
    "parameter",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "constant",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
}


def opcode(rhs: str) -> str:
    """The opcode of an instruction's right-hand side (`bf16[4]{0} fusion(...)` -> fusion)."""
    m = re.match(r"^(\([^=]*?\)|\S+)\s+([\w\-]+)\(", rhs)
    return m.group(2) if m else "?"


def root_tag(body: list[str]) -> str:
    """The last two parts of the jax op name of a computation's ROOT (or its last line
    with one): which jax operation the fusion ends with."""
    lines = [ln for ln in body if "ROOT" in ln] + body[::-1]
    for ln in lines:
        m = re.search(r'op_name="([^"]*)"', ln)
        if m:
            return "/".join(m.group(1).split("/")[-2:])
    return ""


def loop_body(comps: dict[str, list[str]]) -> str | None:
    """The body computation of the module's largest while loop (by instructions)."""
    bodies = {
        m.group(1)
        for b in comps.values()
        for ln in b
        if " while(" in ln and (m := re.search(r"body=%?([\w.\-]+)", ln))
    }
    return max(bodies, key=lambda n: len(comps.get(n, [])), default=None)


def census(comps: dict[str, list[str]]) -> dict[str, int]:
    """`kind shape | tag` -> how many of the loop body's instructions launch a kernel so."""
    body = loop_body(comps)
    counts: dict[str, int] = {}
    for line in comps.get(body, []):
        m = INSTR.match(line)
        if not m:
            continue
        rhs = m.group(2)
        op = opcode(rhs)
        if op in NOT_LAUNCHED or op == "?":
            continue
        shape = re.sub(r"\{[^}]*\}", "", rhs.split(" " + op + "(")[0]).strip()
        kind = op
        if op == "fusion":
            k = re.search(r"kind=(\w+)", rhs)
            kind = k.group(1) if k else "fusion"
            called = CALLS.search(rhs)
            tag = root_tag(comps.get(called.group(1), [])) if called else ""
        else:
            t = re.search(r'op_name="([^"]*)"', rhs)
            tag = "/".join(t.group(1).split("/")[-2:]) if t else ""
        key = f"{kind} {shape[:60]} | {tag}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def print_census(modules: list[tuple[str, dict[str, list[str]]]], full: bool) -> None:
    tables = [(name, census(comps)) for name, comps in modules]
    for name, counts in tables:
        print(f"=== {name}: {sum(counts.values())} kernel launches in the loop body")
        for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if full else []:
            print(f"{n:5d}  {key}")
    base_name, base = tables[0]
    for name, counts in tables[1:]:
        print(f"=== {name} minus {base_name}")
        for key in sorted(set(base) | set(counts)):
            d = counts.get(key, 0) - base.get(key, 0)
            if d:
                print(f"{d:+5d}  {key}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dump_dir", help="the --xla_dump_to directory")
    p.add_argument("result", nargs="?", help="a benchmark JSON whose rows have a `profile`")
    p.add_argument("--census", action="store_true", help="count the loop body's kernels")
    p.add_argument("--full", action="store_true", help="--census: every module's whole count")
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
    modules = [(f.name, computations(f.read_text())) for f in files]
    if args.census:
        print_census(modules, args.full)
        return 0
    if not args.result:
        p.error("give RESULT.json, or --census")
    rows = json.loads(Path(args.result).read_text())["rows"]
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
