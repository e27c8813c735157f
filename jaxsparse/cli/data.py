"""`jaxsparse data`: list the built-in corpus splits, or export a split as text and the
built-in multiple-choice tasks as JSONL (the work is in `jaxsparse.data`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxsparse.data import SPLITS, builtin_tasks, stdlib_documents, write_tasks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--write-tasks", metavar="FILE",
                        help="write the built-in multiple-choice task set (JSONL)")
    parser.add_argument("--num-tasks", type=int, default=200)
    parser.add_argument("--write-text", metavar="FILE",
                        help="write a split of the built-in corpus as plain text")
    parser.add_argument("--split", choices=SPLITS, default="evaluation")


def run(args: argparse.Namespace) -> int:
    if not (args.write_tasks or args.write_text):
        docs = {s: stdlib_documents(s) for s in SPLITS}
        for s, d in docs.items():
            chars = sum(len(x.text) for x in d)
            print(f"{s}: {len(d)} documents, {chars} characters")
        return 0
    if args.write_tasks:
        tasks = builtin_tasks(args.num_tasks)
        write_tasks(tasks, args.write_tasks)
        print(f"wrote {len(tasks)} tasks to {args.write_tasks}")
    if args.write_text:
        docs = stdlib_documents(args.split)
        Path(args.write_text).write_text("\n\n".join(d.text for d in docs) + "\n",
                                         encoding="utf-8")
        print(f"wrote {len(docs)} documents ({args.split} split) to {args.write_text}")
    return 0
