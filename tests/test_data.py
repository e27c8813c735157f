"""Data: the built-in corpus and its splits, user files, token packing, tasks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny import ByteTok

from jaxsparse import data
from jaxsparse.data import DataError, Document


def test_builtin_splits_are_disjoint_deterministic_and_large_enough():
    cal = data.stdlib_documents("calibration")
    ev = data.stdlib_documents("evaluation")
    assert len(cal) > 50 and len(ev) > 20
    cal_mods = {d.source for d in cal}
    ev_mods = {d.source for d in ev}
    assert not cal_mods & ev_mods
    # whole top-level packages go to one split
    top = lambda docs: {d.source.split(":")[1].split(".")[0] for d in docs}
    assert not top(cal) & top(ev)
    assert not {d.text for d in cal} & {d.text for d in ev}
    assert sum(len(d.text) for d in ev) > 100_000
    assert [d.source for d in data._stdlib_documents.__wrapped__("evaluation")] == [
        d.source for d in ev
    ]
    with pytest.raises(ValueError, match="unknown split"):
        data.stdlib_documents("train")


def test_read_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "x": 1}\n')
    docs = data.read_documents([tmp_path / "a.txt", tmp_path / "b.jsonl"])
    assert [d.text for d in docs] == ["hello world", "one", "two"]
    assert docs[2].source.endswith("b.jsonl:3")


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("empty.txt", "", "empty.txt: contains no text"),
        ("blank.txt", " \n\n", "blank.txt: contains no text"),
        ("e.jsonl", "", "e.jsonl: contains no text"),
        ("bad.jsonl", '{"text": "a"}\n{oops\n', r"bad.jsonl:2: not valid JSON"),
        ("nofield.jsonl", '{"txt": "a"}\n', r"nofield.jsonl:1: expected an object with a string"),
    ],
)
def test_bad_data_files(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=match):
        data.read_documents([tmp_path / name])


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        data.read_documents([tmp_path / "nope.txt"])


def test_pack_tokens_concatenates_with_eos_and_checks_length():
    docs = [Document("a", "abc"), Document("b", "de")]
    seqs = data.pack_tokens(docs, ByteTok(), 0, 3, 6, "a, b")
    np.testing.assert_array_equal(seqs, [[98, 99, 100], [0, 101, 102]])
    # without a token count: every full sequence
    assert data.pack_tokens(docs, ByteTok(), 0, 2, None, "x").shape == (3, 2)
    with pytest.raises(DataError, match=r"short.txt: found 7 tokens, need 8 \(8 tokens"):
        data.pack_tokens(docs, ByteTok(), 0, 4, 8, "short.txt")
    with pytest.raises(DataError, match=r"found 7 tokens, need at least 16"):
        data.pack_tokens(docs, ByteTok(), 0, 16, None, "short.txt")


def test_read_tasks_validates_each_line(tmp_path):
    good = {"context": "The sky is", "choices": [" blue", " green"], "gold": 0}
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps(good) + "\n")
    assert data.read_tasks(p)[0].choices == (" blue", " green")
    bad_lines = [
        ("[1, 2]", "expected a JSON object"),
        ('{"context": "x", "gold": 0}', "missing field"),
        ('{"context": "x", "choices": ["a"], "gold": 0}', "at least 2 non-empty"),
        ('{"context": "x", "choices": ["a", ""], "gold": 0}', "at least 2 non-empty"),
        ('{"context": "x", "choices": ["a", "b"], "gold": 2}', "gold"),
        ('{"context": "x", "choices": ["a", "b"], "gold": true}', "gold"),
        ('{"context": 3, "choices": ["a", "b"], "gold": 0}', "context"),
        ("{nope", "not valid JSON"),
    ]
    for line, match in bad_lines:
        p.write_text(json.dumps(good) + "\n" + line + "\n")
        with pytest.raises(DataError, match=rf"t.jsonl:2: .*{match}"):
            data.read_tasks(p)
    p.write_text("\n")
    with pytest.raises(DataError, match="contains no tasks"):
        data.read_tasks(p)


def test_builtin_tasks_are_deterministic_and_valid(tmp_path):
    tasks = data.builtin_tasks(30)
    assert len(tasks) == 30
    assert tasks == data.builtin_tasks(30)
    for t in tasks:
        assert len(t.choices) == 4 and len(set(t.choices)) == 4
        assert 0 <= t.gold < 4 and t.context
    golds = [t.gold for t in tasks]
    assert len(set(golds)) > 1  # the answer is not always in the same place
    # written tasks read back the same
    data.write_tasks(tasks, tmp_path / "t.jsonl")
    assert data.read_tasks(tmp_path / "t.jsonl") == tasks
    # evaluation text only
    ev_text = "\n".join(d.text for d in data.stdlib_documents("evaluation"))
    assert all(" ".join(t.context.split()[:6]) in " ".join(ev_text.split()) for t in tasks[:5])


def test_data_cli_exports_tasks_and_text(tmp_path, capsys):
    from jaxsparse.cli import main

    rc = main(
        [
            "data",
            "--write-tasks",
            str(tmp_path / "t.jsonl"),
            "--num-tasks",
            "12",
            "--write-text",
            str(tmp_path / "ev.txt"),
            "--split",
            "evaluation",
        ]
    )
    assert rc == 0
    assert data.read_tasks(tmp_path / "t.jsonl") == data.builtin_tasks(12)
    text = (tmp_path / "ev.txt").read_text()
    assert data.stdlib_documents("evaluation")[0].text in text
    assert data.stdlib_documents("calibration")[0].text not in text
    assert "wrote 12 tasks" in capsys.readouterr().out


def _fake_stdlib(root, docs: dict[str, str]) -> None:
    for module, doc in docs.items():
        (root / f"{module}.py").write_text(f'"""{doc}"""\n\n\ndef f():\n    pass\n')


def test_builtin_corpus_is_parsed_once_and_remembered(tmp_path, monkeypatch):
    """The parsed corpus is cached on disk: a second process (here: the function again,
    with parsing broken) reads it back, an edited module gives a new entry, and a corrupt
    entry is parsed again and rewritten."""
    root, cache = tmp_path / "stdlib", tmp_path / "cache"
    root.mkdir()
    names = [f"mod{i}" for i in range(40)]
    split = data._split_of(names[0])
    mods = [n for n in names if data._split_of(n) == split][:3]
    _fake_stdlib(
        root, {m: f"The docstring of {m}, long enough to be kept in the corpus." for m in mods}
    )
    monkeypatch.setattr(data, "stdlib_root", lambda: root)
    monkeypatch.setenv("JAXSPARSE_CACHE", str(cache))
    build = data._stdlib_documents.__wrapped__

    first = build(split)
    assert [d.source for d in first] == [f"stdlib:{m}" for m in sorted(mods)]
    (entry,) = (cache / "corpus").iterdir()
    assert json.loads(entry.read_text()) == [[d.source, d.text] for d in first]

    def no_parse(*a, **k):
        raise AssertionError("parsed again although the cache holds this corpus")

    with monkeypatch.context() as m:
        m.setattr(data.ast, "parse", no_parse)
        assert build(split) == first

    # An edited module (another size) is a new key: parsed again, the new text returned.
    _fake_stdlib(root, {mods[0]: f"An edited docstring of {mods[0]}, still long enough for it."})
    edited = build(split)
    assert edited[0].text.startswith("An edited docstring") and edited[1:] == first[1:]
    assert len(list((cache / "corpus").iterdir())) == 2

    # A corrupt entry is not trusted.
    for f in (cache / "corpus").iterdir():
        f.write_text('{"not": "a list"}')
    assert build(split) == edited
