"""The command line's contract, in process and without a model: every command checks its
arguments before it loads one, names the flag, reports user errors as `jaxsparse CMD:
error: ...` with exit status 2, shows its defaults in --help; `--version`; what `data`,
`eval` and the JSON writers produce."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import re
import subprocess
import sys
import types

import pytest

from jaxsparse.cli import COMMANDS, build_parser, main


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: the checks must all come first."""

    def load_model(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("jaxsparse.loading.load_model", load_model)


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


BAD = [  # command (split at spaces), what the error line must contain
    ("generate --prompt hi --max-new-tokens 0", "argument --max-new-tokens: must be >= 1, got 0"),
    ("generate --prompt hi --temperature -1", "argument --temperature: must be >= 0"),
    ("generate --prompt hi --top-k -2", "argument --top-k: must be >= 0"),
    ("generate --prompt hi --sparse-prefill", "--sparse-prefill needs --sparsity-state"),
    ("generate --prompt hi --sparsity-state {tmp}/none", "{tmp}/none: no such"),
    ("generate --prompt-file {tmp}/none.txt", "--prompt-file {tmp}/none.txt"),
    (
        "calibrate --method cats --sparsity 0.5 --out {tmp}/o --tokens 0",
        "argument --tokens: must be >= 1",
    ),
    (
        "calibrate --method cats --sparsity 1 --out {tmp}/o",
        "argument --sparsity: sparsity 1.0 is outside [0, 1)",
    ),
    ("calibrate --method nope --sparsity 0.5 --out {tmp}/o", "--method: unknown method 'nope'"),
    (
        "calibrate --method cats --sparsity 0.5 --out {tmp}/o --data {tmp}/none.txt",
        "--data {tmp}/none.txt: no such file",
    ),
    (
        "calibrate --method teal --sparsity 0.5 --out {tmp}/o --teal-greedy-step 0",
        "argument --teal-greedy-step: must be in (0, 1)",
    ),
    ("eval --json {tmp}/r.json --batch-size 0", "argument --batch-size: must be >= 1"),
    ("eval --json {tmp}/r.json --ppl {tmp}/none.txt", "--ppl {tmp}/none.txt"),
    ("eval --json {tmp}/r.json --sparsity-state {tmp}/none", "{tmp}/none: no such"),
    ("sweep --out {tmp}/s --sparsities 0.5,1.5", "--sparsities 0.5,1.5: sparsity 1.5"),
    ("sweep --out {tmp}/s --methods cats,nope", "--methods: unknown method 'nope'"),
    ("sweep --out {tmp}/s --max-tokens -1", "argument --max-tokens: must be >= 0"),
    (
        "learn --method chess --sparsity 0.5 --out {tmp}/o --steps 0",
        "argument --steps: must be >= 1, got 0",
    ),
    (
        "learn --method chess --sparsity 0.5 --out {tmp}/o --lr 0",
        "argument --lr: must be in (0, inf]",
    ),
    ("train-predictors --out {tmp}/o --ffn-k 0", "argument --ffn-k: must be >= 1"),
    (
        "train-predictors --out {tmp}/o --tokens 100 --seq-len 512",
        "--tokens 100: need at least two sequences of --seq-len 512",
    ),
    (
        "generate --prompt hi --mesh data=3,model=5",
        "--mesh data=3,model=5: data=3 x model=5 = 15 devices, but",
    ),
    (
        "eval --json {tmp}/r.json --mesh data=2;model=2",
        "argument --mesh: 'data=2;model=2': 'data=2;model=2' is not data=N or model=M",
    ),
    ("eval --json {tmp}/r.json --mesh data=999", "are visible: make data x model ="),
    (
        "calibrate --method teal --sparsity 0.5 --out {tmp}/o --mesh pipe=2",
        "argument --mesh: 'pipe=2': 'pipe=2' is not data=N or model=M",
    ),
    (
        "calibrate --method teal --sparsity 0.5 --out {tmp}/o --mesh model=4,model=2",
        "argument --mesh: 'model=4,model=2': model given twice",
    ),
    ("sweep --out {tmp}/s --mesh model=0", "argument --mesh: 'model=0': model=0: must be >= 1"),
    (
        "sweep --out {tmp}/s --mesh model=1000",
        "--mesh model=1000: data=1 x model=1000 = 1000 devices",
    ),
    ("data --num-tasks 0", "argument --num-tasks: must be >= 1"),
    ("convert {tmp}/src {tmp}/out --dtype float16", "argument --dtype: invalid choice: 'float16'"),
    ("convert {tmp}/no_such_src {tmp}/out", "{tmp}/no_such_src: no such file"),
    (
        "calibrate --method cats --sparsity 0.5 --out {tmp}",
        "{tmp} already exists; pass --overwrite",
    ),
]


if "learn-kl" in COMMANDS:
    BAD.append(
        (
            "learn-kl --target-fraction 0 --out {tmp}/o",
            "argument --target-fraction: must be in (0, 1], got 0",
        )
    )


def _case_id(command: str) -> str:
    a = command.split()
    return " ".join(a[:1] + a[-2:])


@pytest.mark.parametrize("command,message", BAD, ids=[_case_id(c) for c, _ in BAD])
def test_bad_argument_is_refused_before_the_model_loads(
    command, message, tmp_path, capsys, no_model_load
):
    argv = [a.format(tmp=tmp_path) for a in command.split()]
    assert main(argv) == 2
    line = _last_line(capsys.readouterr().err)
    assert line.startswith(f"jaxsparse {argv[0]}: error: "), line
    assert message.format(tmp=tmp_path) in line
    assert not re.search(r"\b[a-z]+(_[a-z]+)+=", line)  # flags, not Python names (top_p=0)


def test_every_command_is_covered_by_a_bad_argument():
    assert {command.split()[0] for command, _ in BAD} == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_shows_every_default(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # one line per option: no wrapped "(default: ...)"
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices[command]._actions:
        if action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            continue
        block = _help_block(text, action.option_strings[0])
        assert f"(default: {action.default})" in block or "default" in (action.help or ""), block


def _help_block(text: str, option: str) -> str:
    """The lines of `--help` output that describe `option` (up to the next option)."""
    lines = text.splitlines()
    start = next(
        i for i, x in enumerate(lines) if x.strip().startswith(option + " ") or x.strip() == option
    )
    end = next(
        (
            i
            for i in range(start + 1, len(lines))
            if lines[i].lstrip().startswith("-") or not lines[i].strip()
        ),
        len(lines),
    )
    return " ".join(x.strip() for x in lines[start:end])


def test_data_help_names_the_split_and_its_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")
    assert main(["data", "--help"]) == 0
    block = _help_block(capsys.readouterr().out, "--split")
    assert "--write-text" in block and "(default: evaluation)" in block


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"jaxsparse {importlib.metadata.version('jaxsparse')}\n"


def test_convert_entry_points_share_the_error_convention(tmp_path):
    """`python -m convert` and `jaxsparse convert` (as processes) exit 2 with the prefix."""
    missing = tmp_path / "missing"
    for cmd, prefix in (
        ([sys.executable, "-m", "convert"], "python -m convert"),
        ([sys.executable, "-m", "jaxsparse.cli", "convert"], "jaxsparse convert"),
    ):
        p = subprocess.run(
            [*cmd, str(missing), str(tmp_path / "out")], check=False, capture_output=True, text=True
        )
        assert p.returncode == 2, p.stderr
        assert p.stderr == f"{prefix}: error: {missing}: no such file or directory\n"


def test_data_writes_create_parent_folders(tmp_path, capsys):
    from jaxsparse import data

    tasks, text = tmp_path / "a" / "b" / "tasks.jsonl", tmp_path / "c" / "d" / "eval.txt"
    assert (
        main(
            [
                "data",
                "--write-tasks",
                str(tasks),
                "--num-tasks",
                "5",
                "--write-text",
                str(text),
                "--split",
                "calibration",
            ]
        )
        == 0
    )
    assert data.read_tasks(tasks) == data.builtin_tasks(5)
    assert data.stdlib_documents("calibration")[0].text in text.read_text()
    assert sorted(p.name for p in text.parent.iterdir()) == ["eval.txt"]  # no temporary left
    assert main(["data", "--write-text", str(tmp_path / "a")]) == 2
    assert "--write-text" in capsys.readouterr().err


def test_bf16_on_cpu_warns(monkeypatch, capsys):
    from jaxsparse.cli.common import load_model_for

    def fake_load(path, dtype):
        cfg = types.SimpleNamespace(dtype=dtype or "float32")
        return types.SimpleNamespace(config=cfg, tokenizer=object(), source="fake")

    monkeypatch.setattr("jaxsparse.loading.load_model", fake_load)
    monkeypatch.setattr("jax.default_backend", lambda: "cpu")
    args = argparse.Namespace(model=None, dtype="bfloat16", command="generate")
    load_model_for(args)
    err = capsys.readouterr().err
    assert err.startswith(
        "jaxsparse generate: warning: bfloat16 on the CPU backend decodes "
        "slower than float32, up to several times"
    )
    load_model_for(argparse.Namespace(model=None, dtype="float32", command="generate"))
    assert capsys.readouterr().err == ""
    monkeypatch.setattr("jax.default_backend", lambda: "gpu")
    load_model_for(args)
    assert capsys.readouterr().err == ""


def test_no_tokenizer_is_a_user_error(monkeypatch):
    from jaxsparse.cli.common import load_model_for

    cfg = types.SimpleNamespace(dtype="float32")
    monkeypatch.setattr(
        "jaxsparse.loading.load_model",
        lambda p, d: types.SimpleNamespace(config=cfg, tokenizer=None, source="ckpt"),
    )
    with pytest.raises(ValueError, match="ckpt: no tokenizer; calibration needs one"):
        load_model_for(
            argparse.Namespace(model="ckpt", dtype=None, command="calibrate"),
            needs_tokenizer="calibration",
        )


def _result(method, per_point, tasks=None):
    r = {
        "method": method,
        "target_sparsity": 0.5,
        "activated_params_fraction": 0.6,
        "measured_sparsity": {"ffn": per_point.get("gate", 0.0), "per_point": per_point},
    }
    if tasks:
        r["tasks"] = tasks
    return r


def test_eval_summary_names_the_points_a_method_sparsifies():
    from jaxsparse.cli.eval import summary

    teal = {"q_in": 0.5, "kv_in": 0.5, "o_in": 0.49, "ffn_in": 0.5, "gate": 0.0, "down_in": 0.51}
    line = summary(
        _result(
            "teal",
            teal,
            {"acc": 0.75, "acc_stderr": 0.0433, "acc_norm": 0.5, "acc_norm_stderr": 0.05},
        )
    )
    assert "gate" not in line and "ffn sparsity" not in line and "0.000" not in line
    assert "q_in 0.500" in line and "down_in 0.510" in line
    assert "acc 0.750 ± 0.043" in line and "acc_norm 0.500 ± 0.050" in line
    chess = summary(_result("chess", dict.fromkeys(teal, 0.0) | {"gate": 0.5}))
    assert "gate 0.500" in chess and "q_in" not in chess
    dense = summary(_result("dense", dict.fromkeys(teal, 0.0)))
    assert "none" in dense and "0.000" not in dense


def test_accuracy_stderr():
    from jaxsparse.evaluate import accuracy_stderr

    assert accuracy_stderr(0.75, 12) == pytest.approx(math.sqrt(0.75 * 0.25 / 12))
    assert accuracy_stderr(1.0, 5) == 0.0


def test_json_keys_in_natural_order(tmp_path):
    from jaxsparse.evaluate import SparsityMeter, write_json_atomic
    from jaxsparse.io import natural_order

    meter = SparsityMeter(12)
    meter.count = 1.0
    write_json_atomic({"z": 1, "a": meter.report()}, tmp_path / "r.json")
    text = (tmp_path / "r.json").read_text()
    doc = json.loads(text)
    want = [f"layers_{i}" for i in range(12)]
    assert list(doc["a"]["measured_sparsity"]["per_layer"]) == want
    assert list(doc["a"]["activated_params_per_layer"]) == want
    assert list(doc) == ["a", "z"]
    assert list(natural_order({"b10": 0, "b9": 0, "a": 0, "b": 0})) == ["a", "b", "b9", "b10"]


def test_sweep_into_an_out_with_other_settings_is_refused_before_the_model_loads(
    tmp_path, capsys, no_model_load
):
    from jaxsparse.calibrate import DEFAULTS as CAL
    from jaxsparse.evaluate import DEFAULTS as EV
    from jaxsparse.sweep import sweep_settings

    ev = {k: EV[k] for k in ("seq_len", "batch_size", "max_tokens", "num_tasks")}
    options = {m: {"allocation": "uniform"} for m in ("teal", "wina")}  # the CLI's defaults
    settings = sweep_settings(
        "some-model",
        "float32",
        None,
        CAL,
        options,
        {**ev, "seq_len": CAL["seq_len"], "ppl": None, "tasks": None},
    )
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    argv = ["sweep", "--out", str(tmp_path), "--tokens", str(2 * CAL["tokens"])]
    assert main(argv) == 2
    line = _last_line(capsys.readouterr().err)
    assert line.startswith(
        f"jaxsparse sweep: error: {tmp_path} holds a sweep made with other "
        f"settings (calibration tokens: {CAL['tokens']} there, "
        f"{2 * CAL['tokens']} now)"
    )
    assert "--overwrite" in line and "another --out" in line
    # the same settings pass the check (and then load the model, which this test forbids)
    with pytest.raises(AssertionError, match="the model was loaded"):
        main(["sweep", "--out", str(tmp_path)])
