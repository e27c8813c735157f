"""A GGUF file's tokenizer, built from its `tokenizer.*` metadata without torch.

A GGUF carries no `tokenizer.json`: it stores the vocabulary (`tokenizer.ggml.tokens`), the
merges, the token types, the special token ids, the flags and the chat template as metadata.
`gguf_tokenizer(path)` reads them with the `gguf` package and builds a `tokenizers` byte-level
BPE tokenizer wrapped in transformers' `PreTrainedTokenizerFast`, so that nothing here needs
torch (transformers' own GGUF reader imports it).

What it builds, and what it refuses:
- `tokenizer.ggml.model == "gpt2"` (byte-level BPE: GPT-2, SmolLM/SmolLM2, StarCoder) with a
  pre-tokenizer type (`tokenizer.ggml.pre`) in `GPT2_SPLIT_PRE_TYPES`: the GPT-2 regex split.
  It matches transformers' GGUF tokenizer token for token, in encoding and decoding
  (tests/convert/test_gguf_tokenizer.py).
- Anything else -- SentencePiece-style vocabularies (`tokenizer.ggml.model == "llama"`:
  Llama-2, Gemma), pre-tokenizers with their own split regex (`llama-bpe`, `qwen2`, ...),
  unigram -- raises `UnsupportedGGUFTokenizer`, naming the model and pre-tokenizer type.
  `convert.load_tokenizer` then falls back to transformers' GGUF integration (which needs
  torch), so an unsupported tokenizer is never built half-right.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Pre-tokenizer types whose split is GPT-2's regex (`tokenizers`' ByteLevel with
# use_regex=True). "smollm" is what llama.cpp writes for SmolLM/SmolLM2.
GPT2_SPLIT_PRE_TYPES = frozenset({None, "default", "gpt2", "gpt-2", "smollm"})

# llama.cpp's token types (gguf.TokenType): 1 normal, 2 unknown, 3 control, 4 user-defined,
# 5 unused, 6 byte.
CONTROL, USER_DEFINED = 3, 4


class UnsupportedGGUFTokenizer(ValueError):
    """A GGUF tokenizer kind that `gguf_tokenizer` does not build (see the module docstring)."""


def gguf_tokenizer_fields(path: str | Path) -> dict[str, Any] | None:
    """The file's `tokenizer.*` key/values decoded to Python, or None if it has no tokenizer."""
    from convert.readers import GGUFSource, gguf_field_value

    fields = GGUFSource(Path(path)).reader.fields
    if "tokenizer.ggml.model" not in fields:
        return None
    return {k: gguf_field_value(f) for k, f in fields.items() if k.startswith("tokenizer.")}


def gguf_tokenizer(path: str | Path) -> Any:
    """The tokenizer of a GGUF file (a transformers `PreTrainedTokenizerFast`), or None if the
    file has no tokenizer metadata. Raises `UnsupportedGGUFTokenizer` for kinds not built here.
    """
    meta = gguf_tokenizer_fields(path)
    if meta is None:
        return None
    return tokenizer_from_metadata(meta, source=str(path))


def tokenizer_from_metadata(meta: dict[str, Any], source: str = "GGUF") -> Any:
    """Builds the tokenizer from decoded `tokenizer.*` metadata (see `gguf_tokenizer`)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    pre = meta.get("tokenizer.ggml.pre")
    if kind != "gpt2" or pre not in GPT2_SPLIT_PRE_TYPES:
        what = (
            "a SentencePiece-style vocabulary"
            if kind == "llama"
            else f"pre-tokenizer {pre!r}"
            if kind == "gpt2"
            else f"tokenizer model {kind!r}"
        )
        raise UnsupportedGGUFTokenizer(
            f"{source}: {what} (tokenizer.ggml.model={kind!r}, tokenizer.ggml.pre={pre!r}) is "
            f"not built without torch; only byte-level BPE with the GPT-2 split is "
            f"(pre-tokenizer one of {sorted(p for p in GPT2_SPLIT_PRE_TYPES if p)})"
        )
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise UnsupportedGGUFTokenizer(
            f"{source}: a byte-level BPE vocabulary without tokenizer.ggml.merges"
        )
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)

    # Tokens are stored in the byte-to-unicode spelling; one spelled otherwise (an added token
    # with a space, say) is respelled, as its bytes would be.
    spelling = _byte_to_unicode()
    alphabet = set(spelling.values())

    def respell(t: str) -> str:
        return t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))

    vocab = {respell(t): i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise UnsupportedGGUFTokenizer(f"{source}: tokenizer.ggml.tokens has duplicate entries")
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = [m for m, p in zip(merges, pairs) if len(p) != 2]
    if bad:
        raise UnsupportedGGUFTokenizer(f"{source}: malformed merges (not 'a b'): {bad[:3]}")
    try:
        tok = Tokenizer(
            models.BPE(
                vocab=vocab,
                merges=pairs,
                fuse_unk=False,
                byte_fallback=False,
                continuing_subword_prefix="",
                end_of_word_suffix="",
            )
        )
    except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception here)
        raise UnsupportedGGUFTokenizer(
            f"{source}: tokenizer.ggml.merges do not fit tokenizer.ggml.tokens ({e})"
        ) from None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # Control tokens are special, user-defined ones are matched whole but are not special;
    # a "control" token outside the byte alphabet is a mislabel and would grow the vocabulary.
    tok.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t, ty in zip(tokens, types)
            if ty == CONTROL and set(t) <= alphabet
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types)
            if ty == USER_DEFINED and t in vocab
        ]
    )

    def special(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        if i is None:
            return None
        if not 0 <= i < len(tokens):
            raise UnsupportedGGUFTokenizer(
                f"{source}: tokenizer.ggml.{key}_token_id={i} is "
                f"outside the vocabulary of {len(tokens)}"
            )
        return tokens[i]

    bos, eos = special("bos"), special("eos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None

    def template(seq: str, type_id: int) -> list[str]:
        return (
            ([f"{bos}:{type_id}"] if add_bos else [])
            + [f"${seq}:{type_id}"]
            + ([f"{eos}:{type_id}"] if add_eos else [])
        )

    single = " ".join(template("A", 0))
    pair = " ".join(template("A", 0) + template("B", 1))
    specials = {t: vocab[respell(t)] for t, on in ((bos, add_bos), (eos, add_eos)) if on}
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=list(specials.items())
    )
    kwargs = {
        k: v
        for k, v in (
            ("bos_token", bos),
            ("eos_token", eos),
            ("unk_token", special("unknown")),
            ("pad_token", special("padding")),
        )
        if v is not None
    }
    chat_template = meta.get("tokenizer.chat_template")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        chat_template=chat_template,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        clean_up_tokenization_spaces=False,
        **kwargs,
    )


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the spelling of byte-level vocabs).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes take the code points
    256, 257, ... in byte order.
    """
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


__all__ = [
    "GPT2_SPLIT_PRE_TYPES",
    "UnsupportedGGUFTokenizer",
    "gguf_tokenizer",
    "gguf_tokenizer_fields",
    "tokenizer_from_metadata",
]
