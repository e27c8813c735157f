"""The README's first command, `make run`, prints HF transformers' greedy text.

`.ci/run` runs `make run` from a fresh venv without torch and a fresh model cache, saves
its output, and runs this test with `JAXSPARSE_MAKE_RUN_OUTPUT=<that file>`. Without that
variable the test runs the `run` recipe of the Makefile itself, with this venv's bin.
The reference is HF's own GGUF tokenizer and PyTorch model (torch, from the test extra).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTPUT_ENV = "JAXSPARSE_MAKE_RUN_OUTPUT"


def makefile_run() -> tuple[str, str]:
    """(the default PROMPT, the `run` recipe's command line) from the Makefile."""
    text = (ROOT / "Makefile").read_text()
    prompt = re.search(r"^PROMPT \?= (.+)$", text, re.MULTILINE).group(1).strip()
    recipe = re.search(r"^run:[^\n]*\n\t([^\n]+)$", text, re.MULTILINE).group(1)
    return prompt, recipe


def last_json_line(output: str) -> dict:
    """The JSON object `jaxsparse generate --json` prints (make may print lines before it)."""
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in the output of make run:\n{output[-2000:]}")


@pytest.mark.slow
def test_make_run_prints_hf_greedy_text(smollm2_hf, smollm2_gguf):
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer

    prompt, recipe = makefile_run()
    assert "--temperature 0" in recipe and "--json" in recipe
    max_new = int(re.search(r"--max-new-tokens (\d+)", recipe).group(1))
    if os.environ.get(OUTPUT_ENV):
        got = last_json_line(Path(os.environ[OUTPUT_ENV]).read_text())
    else:
        command = recipe.replace("$(BIN)", str(Path(sys.executable).parent)).replace(
            "$(PROMPT)", prompt
        )
        out = subprocess.run(
            command, shell=True, capture_output=True, text=True, check=False, cwd=ROOT, timeout=600
        )
        assert out.returncode == 0, out.stderr[-3000:]
        got = last_json_line(out.stdout)

    tok = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        ref = smollm2_hf.generate(**ids, max_new_tokens=max_new, do_sample=False)
    new = ref[0, ids["input_ids"].shape[1] :].tolist()
    new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    expected = tok.decode(new, skip_special_tokens=True)
    assert got["text"] == expected, f"make run printed {got['text']!r}, HF greedy {expected!r}"
    assert got["tokens"] == new
    assert got["prompt_tokens"] == ids["input_ids"].shape[1]
    assert got["prefill_tokens_per_s"] > 0 and got["decode_tokens_per_s"] > 0
