"""`jaxsparse data`: list the built-in corpus splits, or export a split as text and the
built-in multiple-choice tasks as JSONL (the work is in `jaxsparse.data`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxsparse.cli.common import at_least
from jaxsparse.data import SPLITS, builtin_tasks, stdlib_documents, write_tasks
from jaxsparse.io import write_text_atomic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--write-tasks",
        metavar="FILE",
        help="write the built-in multiple-choice task set (JSONL); its "
        "contexts come from the evaluation split",
    )
    parser.add_argument(
        "--num-tasks", type=at_least(1), default=200, help="tasks to write with --write-tasks"
    )
    parser.add_argument(
        "--write-text",
        metavar="FILE",
        help="write one split (--split) of the built-in corpus as plain text",
    )
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default="evaluation",
        help="the corpus split --write-text writes: 'calibration' (what "
        "calibrate, learn and train-predictors read without --data) or "
        "'evaluation' (what eval reads without --ppl and --tasks)",
    )


def run(args: argparse.Namespace) -> int:
    if not (args.write_tasks or args.write_text):
        docs = {s: stdlib_documents(s) for s in SPLITS}
        for s, d in docs.items():
            chars = sum(len(x.text) for x in d)
            print(f"{s}: {len(d)} documents, {chars} characters")
        print("export with --write-text FILE --split SPLIT, --write-tasks FILE")
        return 0
    for flag, path in (("--write-tasks", args.write_tasks), ("--write-text", args.write_text)):
        if path and Path(path).is_dir():
            raise IsADirectoryError(f"{flag} {path}: is a directory; give a file name")
    if args.write_tasks:
        tasks = builtin_tasks(args.num_tasks)
        write_tasks(tasks, args.write_tasks)
        print(f"wrote {len(tasks)} tasks to {args.write_tasks}")
    if args.write_text:
        docs = stdlib_documents(args.split)
        write_text_atomic(args.write_text, "\n\n".join(d.text for d in docs) + "\n")
        print(f"wrote {len(docs)} documents ({args.split} split) to {args.write_text}")
    return 0
