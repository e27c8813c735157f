"""The embedded default model (SmolLM2-135M-Instruct, GGUF Q4_1) converted by us against HF
transformers loading the same GGUF: logits on real text, and greedy generation."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity import rel_err

from jaxsparse.models import init_cache

torch = pytest.importorskip("torch")
jax.config.update("jax_default_matmul_precision", "highest")

N_PROMPT, N_NEW = 64, 32


@pytest.fixture(scope="module")
def prompt_ids(smollm2) -> np.ndarray:
    """About 64 tokens of real English text: the json module's docstring."""
    ids = smollm2.tokenizer(json.__doc__.strip())["input_ids"]
    assert len(ids) >= N_PROMPT
    return np.asarray([ids[:N_PROMPT]], np.int32)


def test_default_model_config_and_tokenizer(smollm2, smollm2_gguf):
    c = smollm2.config
    assert (c.model_type, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == (
        "llama",
        30,
        576,
        9,
        3,
    )
    assert c.tie_word_embeddings and c.vocab_size == 49152 and c.dtype == "float32"
    assert smollm2.source == str(smollm2_gguf)
    text = "The quick brown fox"
    assert smollm2.tokenizer.decode(smollm2.tokenizer(text)["input_ids"]) == text


@pytest.fixture(scope="module")
def apply(smollm2):
    """One jitted apply for the module (the prefill compile is shared by both tests)."""
    return jax.jit(smollm2.model.apply, static_argnames=("last_only",))


@pytest.fixture(scope="module")
def prefill(smollm2, apply, prompt_ids):
    """Our logits for the prompt [1, 64, V], and the KV cache holding it."""
    cache = init_cache(smollm2.config, 1, N_PROMPT + N_NEW)
    return apply(
        {"params": smollm2.params},
        jnp.asarray(prompt_ids),
        jnp.arange(N_PROMPT)[None],
        cache=cache,
        cache_index=0,
    )


@pytest.mark.slow
def test_logits_match_hf_on_real_text(smollm2_hf, prompt_ids, prefill):
    ours, _ = prefill
    with torch.no_grad():
        want = smollm2_hf(torch.from_numpy(prompt_ids.astype(np.int64))).logits.numpy()
    err = rel_err(ours, want)
    print(f"SmolLM2 GGUF logits rel err {err:.2e}")
    assert err < 1e-3
    # The prediction of the next token agrees almost everywhere (ties aside).
    assert np.mean(np.argmax(ours, -1) == np.argmax(want, -1)) > 0.95


@pytest.mark.slow
def test_greedy_generation_matches_hf(smollm2, smollm2_hf, prompt_ids, apply, prefill):
    c = smollm2.config
    params = {"params": smollm2.params}
    logits, cache = prefill
    ours = []
    for i in range(N_NEW):
        tok = int(jnp.argmax(logits[0, -1]))
        ours.append(tok)
        if tok in c.eos_token_ids:
            break
        pos = N_PROMPT + i
        logits, cache = apply(
            params,
            jnp.asarray([[tok]], jnp.int32),
            jnp.asarray([[pos]]),
            cache=cache,
            cache_index=pos,
        )
    ids = torch.from_numpy(prompt_ids.astype(np.int64))
    with torch.no_grad():
        out = smollm2_hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=N_NEW,
            pad_token_id=c.pad_token_id,
        )
    want = out[0, N_PROMPT:].tolist()
    print("ours:", repr(smollm2.tokenizer.decode(ours)))
    assert len(ours) == len(want) == N_NEW  # no early end-of-sequence: all 32 tokens compared
    assert ours == want
