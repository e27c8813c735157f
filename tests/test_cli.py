"""The `jaxsparse` command line: bad input, streaming, conversion (the README's main job, `make
run`, is compared with HF greedy decoding in tests/test_make_run.py)."""

from __future__ import annotations

import json

from jaxsparse.cli import main

PROMPT = "The Python programming language is"


def test_generate_needs_a_prompt(capsys):
    assert main(["generate"]) == 2
    assert "--prompt" in capsys.readouterr().err


def test_generate_bad_model_path(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    assert main(["generate", "--model", str(missing), "--prompt", "hi"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_generate_empty_prompt_file(tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("\n\n")
    assert main(["generate", "--prompt-file", str(f)]) == 2
    err = capsys.readouterr().err
    assert str(f) in err and "no non-empty line" in err


def test_generate_bad_sampling(capsys):
    assert main(["generate", "--prompt", "hi", "--top-p", "0"]) == 2
    assert "argument --top-p: must be in (0, 1], got 0" in capsys.readouterr().err


def test_convert_refuses_existing_output(tiny_hf_models, tmp_path, capsys, monkeypatch):
    """An existing OUT is refused before the source is read (the slow part), and kept;
    `--overwrite` then converts the same source into it, replacing what was there."""
    from convert import converter
    from jaxsparse.io import is_complete

    src = tiny_hf_models["opt_proj"].safetensors_dir  # a source that converts
    assert (src / "config.json").is_file()
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    reads = []
    real_read = converter.read_model
    monkeypatch.setattr(
        converter, "read_model", lambda *a, **k: reads.append(a) or real_read(*a, **k)
    )
    assert main(["convert", str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"jaxsparse convert: error: {out} already exists; pass --overwrite "
        f"(overwrite=True) to replace it\n"
    )
    assert (out / "keep.txt").read_text() == "user data"
    assert reads == []  # refused before reading the source
    assert main(["convert", str(src), str(out), "--overwrite"]) == 0
    assert len(reads) == 1 and is_complete(out) and not (out / "keep.txt").exists()
    assert capsys.readouterr().out == f"wrote {out}\n"


def test_generate_stream_json_lines(smollm2, capsys):
    """`--stream --json`: one {"delta"} line per chunk, adding up to the final object's text,
    which says how its tokens/s is counted."""
    assert (
        main(
            [
                "generate",
                "--prompt",
                PROMPT,
                "--max-new-tokens",
                "12",
                "--stream",
                "--stream-chunk",
                "4",
                "--json",
            ]
        )
        == 0
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    deltas, final = lines[:-1], lines[-1]
    assert len(deltas) >= 2 and all(set(d) == {"delta"} for d in deltas)
    assert "".join(d["delta"] for d in deltas) == final["text"]
    assert final["decode_tokens_per_s_basis"] == "summed over the batch's sequences"
    assert final["mesh"] is None and final["kernels"] == "xla"  # one device, no --mesh
    assert final["decode_steps"] == 11 and final["decode_s"] > 0


def test_generate_command_buffers_flag(smollm2, capsys):
    """`--command-buffers` reaches the Generator (the CPU compiler ignores the options)."""
    argv = ["generate", "--prompt", PROMPT, "--max-new-tokens", "4", "--json"]
    texts = []
    for extra, want in (([], False), (["--command-buffers"], True)):
        assert main(argv + extra) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["command_buffers"] is want
        texts.append(out["text"])
    assert texts[0] == texts[1]


def test_generate_stream_takes_one_prompt(capsys):
    assert main(["generate", "--prompt", "a", "--prompt", "b", "--stream"]) == 2
    assert "--stream takes one prompt" in capsys.readouterr().err


def test_stream_chunk_defaults_agree():
    """`generate --stream-chunk`, `Generator.stream` and `stream_ids` share one default, the
    chunk the H200 measurement chose (jaxsparse.generate.STREAM_CHUNK)."""
    import argparse
    import inspect

    from jaxsparse.cli import build_parser
    from jaxsparse.generate import STREAM_CHUNK, Generator

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    cli = next(a for a in sub.choices["generate"]._actions if a.dest == "stream_chunk")
    assert cli.default == STREAM_CHUNK
    for fn in (Generator.stream, Generator.stream_ids):
        assert inspect.signature(fn).parameters["chunk_tokens"].default == STREAM_CHUNK
