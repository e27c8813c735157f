"""The torch-free GGUF tokenizer (`convert.gguf_tokenizer`) against transformers' GGUF
tokenizer (which imports torch), on the default model's GGUF: same tokenizer definition,
same ids and same text on varied inputs, same chat prompt; and clear refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from convert import load_tokenizer
from convert.gguf_tokenizer import UnsupportedGGUFTokenizer, gguf_tokenizer, tokenizer_from_metadata

TEXTS = [
    "The Python programming language is",
    "",
    " ",
    "  leading spaces and trailing   ",
    "Hello, world! It's 12345 + 6.78e-9 = ?",
    "tabs\tand\nnew lines\r\n\n\nand more",
    "def f(x):\n    return x ** 2  # squared\n",
    "Ünïcödé: café, naïve, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어, العربية",
    "emoji 🙂👍🏽 and 🇫🇷 flags, zero\u200bwidth, combining e\u0301",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "text <|endoftext|> between <repo_name> specials<file_sep>",
    "<|im_start  not special |>",
    "URLs https://example.com/a?b=c&d=e#f and emails a.b@c.org",
    "x" * 300,
]


@pytest.fixture(scope="module")
def tokenizers(smollm2_gguf):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    return gguf_tokenizer(smollm2_gguf), hf


def test_same_definition_as_transformers(tokenizers):
    ours, hf = tokenizers
    assert json.loads(ours.backend_tokenizer.to_str()) == json.loads(hf.backend_tokenizer.to_str())
    for attr in (
        "bos_token",
        "eos_token",
        "unk_token",
        "pad_token",
        "chat_template",
        "all_special_tokens",
        "all_special_ids",
        "added_tokens_decoder",
    ):
        assert getattr(ours, attr) == getattr(hf, attr), attr


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_same_ids_and_text_as_transformers(tokenizers, text):
    ours, hf = tokenizers
    ids = ours(text)["input_ids"]
    assert ids == hf(text)["input_ids"]
    assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(
            ids, skip_special_tokens=skip
        )
    assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)


def test_same_batches_and_chat_prompt(tokenizers):
    ours, hf = tokenizers
    assert ours(TEXTS)["input_ids"] == hf(TEXTS)["input_ids"]
    ids = list(range(0, 49152, 97))  # every 97th token, specials included
    assert ours.decode(ids) == hf.decode(ids)
    chat = [{"role": "user", "content": "Name three prime numbers."}]
    for tok in (ours, hf):
        assert tok.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True
        ) == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_save_and_reload(tokenizers, tmp_path):
    """A checkpoint stores the tokenizer with save_pretrained: it must come back the same."""
    from transformers import AutoTokenizer

    ours, hf = tokenizers
    ours.save_pretrained(str(tmp_path))
    back = AutoTokenizer.from_pretrained(str(tmp_path))
    assert back(TEXTS)["input_ids"] == hf(TEXTS)["input_ids"]
    assert back.chat_template == hf.chat_template and back.eos_token == hf.eos_token


def _without_torch(code: str) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh Python with torch unimportable and `load_tokenizer` imported."""
    prelude = (
        "import sys; sys.modules['torch'] = None\n"  # find_spec -> None, import -> ImportError
        "from convert import load_tokenizer\n"
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
        timeout=300,
    )


def test_load_tokenizer_without_torch(smollm2_gguf):
    """`load_tokenizer` on the default GGUF with torch unimportable (as in a venv without it)."""
    out = _without_torch(
        f"tok = load_tokenizer({str(smollm2_gguf)!r})\n"
        "assert 'torch' not in {k for k, v in sys.modules.items() if v is not None}\n"
        "print(tok('The Python programming language is')['input_ids'])\n"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[504, 5905, 6256, 1789, 314]"


def _spm_metadata() -> dict:
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "\u2581a", "a"],
        "tokenizer.ggml.scores": [0.0, 0.0, 0.0, -1.0, -2.0],
        "tokenizer.ggml.token_type": [2, 3, 3, 1, 1],
    }


@pytest.mark.parametrize(
    "meta,what",
    [
        (_spm_metadata(), "SentencePiece-style"),
        (
            dict(
                _spm_metadata(),
                **{
                    "tokenizer.ggml.model": "gpt2",
                    "tokenizer.ggml.pre": "qwen2",
                    "tokenizer.ggml.merges": ["a b"],
                },
            ),
            "pre-tokenizer 'qwen2'",
        ),
        (dict(_spm_metadata(), **{"tokenizer.ggml.model": "t5"}), "tokenizer model 't5'"),
    ],
)
def test_unsupported_kinds_are_refused(meta, what):
    with pytest.raises(UnsupportedGGUFTokenizer, match=what):
        tokenizer_from_metadata(meta, source="x.gguf")


def test_sentencepiece_gguf_without_torch_names_the_fix(tmp_path):
    """A SentencePiece GGUF (Llama-2, Gemma) needs transformers' GGUF path, hence torch: with
    torch missing, the error says so instead of building a wrong tokenizer."""
    import gguf

    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    meta = _spm_metadata()
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_scores(meta["tokenizer.ggml.scores"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedGGUFTokenizer, match="SentencePiece"):
        gguf_tokenizer(path)
    out = _without_torch(f"load_tokenizer({str(path)!r})\n")
    assert out.returncode != 0
    assert "ConversionError" in out.stderr and "SentencePiece" in out.stderr
    assert "pip install torch" in out.stderr


def test_gguf_without_tokenizer(tmp_path):
    import gguf

    path = tmp_path / "none.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert gguf_tokenizer(path) is None
    assert load_tokenizer(path) is None


def _bpe_metadata(**extra) -> dict:
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": ["<|end|>", "a", "b", "ab"],
        "tokenizer.ggml.token_type": [3, 1, 1, 1],
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.eos_token_id": 0,
        **extra,
    }


def test_small_bpe_and_bad_metadata():
    tok = tokenizer_from_metadata(_bpe_metadata(), source="x.gguf")
    assert tok("abba<|end|>")["input_ids"] == [3, 2, 1, 0]
    assert tok.eos_token == "<|end|>"
    with pytest.raises(UnsupportedGGUFTokenizer, match="eos_token_id=99"):
        tokenizer_from_metadata(_bpe_metadata(**{"tokenizer.ggml.eos_token_id": 99}), "x.gguf")
    with pytest.raises(UnsupportedGGUFTokenizer, match="merges do not fit"):
        tokenizer_from_metadata(_bpe_metadata(**{"tokenizer.ggml.merges": ["a c"]}), "x.gguf")
    with pytest.raises(UnsupportedGGUFTokenizer, match="not 'a b'"):
        tokenizer_from_metadata(_bpe_metadata(**{"tokenizer.ggml.merges": ["abc"]}), "x.gguf")
    assert issubclass(UnsupportedGGUFTokenizer, ValueError)
