"""The real SmolLM2-135M-Instruct GGUF (Q4_1) against transformers' own GGUF loader.

Both sides read the same file: transformers dequantizes it with its GGUF integration
(`from_pretrained(dir, gguf_file=...)`), we with checkpoints/gguf_read.py. Logits agree
within 1e-4 on all but a few in 10^5 (2.5e-4 at most: float32 arithmetic over 30 layers),
a greedy 64-token continuation is the same, our tokenizer encodes 1,200 generated strings
(unicode, emoji, whitespace runs, special tokens) to the same ids, and the chat template
renders the same text. Each side loads once for the module (30 layers on 2 cores).
Skipped, saying why, only when the file cannot be fetched.
"""

from __future__ import annotations

import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    from checkpoints.loader import load_model
    from checkpoints.tokenizer import load_tokenizer
    config, params, model_dir = load_model(smollm2_gguf)
    return config, params, load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def hf_tok(smollm2_gguf):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.dirname(smollm2_gguf),
                                         gguf_file=os.path.basename(smollm2_gguf))


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf),
        dtype=torch.float32).eval()


def _chat(tok, text: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                   add_generation_prompt=True)


def test_config_from_metadata(ours):
    config, params, tok = ours
    assert (config.family, config.hidden_size, config.num_layers, config.num_heads,
            config.num_kv_heads, config.vocab_size) == ("llama", 576, 30, 9, 3, 49152)
    assert config.tie_word_embeddings and config.dtype == "float32"
    assert tok.eos_id == 2 and 2 in tok.stop_ids      # <|im_end|>
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


def test_logits_match_transformers_gguf_loader(ours, hf_model, hf_tok):
    import torch
    from model.decoder import forward, init_cache
    config, params, _ = ours
    prompts = [_chat(hf_tok, "What is the capital of France?"),
               "The quick brown fox jumps over the lazy dog. In 1905, Einstein",
               "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"]
    rows = [hf_tok(p).input_ids for p in prompts]
    width = max(map(len, rows))
    ids = [r + [0] * (width - len(r)) for r in rows]    # right padding: causal, compared unpadded
    logits, _ = jax.jit(lambda p, c, t, q: forward(config, p, c, t, q))(
        params, init_cache(config, len(ids), width), jnp.asarray(ids),
        jnp.broadcast_to(jnp.arange(width), (len(ids), width)))
    logits = np.asarray(logits)
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)).logits.numpy()
    # The weights are bit-identical (both sides dequantize to the same float32 values); what
    # is left is float32 arithmetic over 30 layers: against a float64 run of transformers,
    # XLA-CPU float32 is off by up to 1.8e-4 and torch float32 by 0.8e-4 (logits up to ~40),
    # so a handful of the ~900k logits per prompt differ by 1.0-1.5e-4: 0.01% at XLA's
    # default optimisation level, 0.023% at the level 0 this suite compiles at
    # (tests/conftest.py: no FMA contraction), on AVX-512 machines; on a 2-core AVX2 one
    # (other kernels, other summation orders) 0.07%, so the bound is 0.1%.
    for i, r in enumerate(rows):
        a, b = logits[i, :len(r)], ref[i, :len(r)]
        np.testing.assert_allclose(a, b, atol=2.5e-4, rtol=0)
        assert np.mean(np.abs(a - b) > 1e-4) < 1e-3          # all but 0.1% within 1e-4
        assert (a.argmax(-1) == b.argmax(-1)).all()


def test_greedy_64_tokens_match_transformers(ours, hf_model, hf_tok):
    import torch
    from model.decoder import forward, init_cache
    config, params, tok = ours
    prompt = hf_tok(_chat(hf_tok, "Write a short story about a lighthouse keeper.")).input_ids
    assert tok.encode(_chat(hf_tok, "Write a short story about a lighthouse keeper.")) == prompt
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                dtype=torch.long), max_new_tokens=64, do_sample=False)
    ref = out[0, len(prompt):].tolist()
    step = jax.jit(lambda p, c, t, q: forward(config, p, c, t, q), donate_argnums=1)
    cache = init_cache(config, 1, len(prompt) + 64)
    logits, cache = step(params, cache, jnp.asarray([prompt]), jnp.arange(len(prompt))[None])
    got = []
    for i in range(64):
        got.append(int(jnp.argmax(logits[0, -1])))
        if i < 63:
            logits, cache = step(params, cache, jnp.asarray([[got[-1]]]),
                                 jnp.full((1, 1), len(prompt) + i))
    assert len(ref) >= 32                          # a real continuation, not an instant stop
    assert got[:len(ref)] == ref
    if len(ref) < 64:                              # transformers stopped at EOS: so would we
        assert got[len(ref) - 1] in tok.stop_ids
    assert "lighthouse" in tok.decode(got).lower()


def corpus(n: int = 1200, seed: int = 12) -> list[str]:
    """Deterministic strings that stress a byte-level BPE tokenizer."""
    rng = random.Random(seed)
    words = ["the", "The", "capital", "France", "Paris", "don't", "it's", "WE'LL", "über",
             "naïve", "café", "Straße", "déjà-vu", "1234567", "3.14159", "0x1F", "foo_bar",
             "camelCase", "https://example.com/a?b=c", "user@mail.org", "C++", "#include",
             "→", "€100", "½", "…", "“quoted”", "«guillemets»", "日本語", "中文字符", "한국어",
             "русский", "العربية", "हिन्दी", "ไทย", "עברית", "Ελληνικά", "e\u0301",
             "🙂", "👍🏽", "👨‍👩‍👧", "🇫🇷", "🏳️‍🌈", "\U0001F600\U0001F600", "𝔘𝔫𝔦"]
    spaces = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000",
              "\u2009", "        ", "\t\t", "\n\n\n\n"]
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<file_sep>",
                "<|im_start|>user\n", "<|im_", "im_end|>", "<|endoftext", "< |im_end| >"]
    punct = [".", ",", "!", "?", ";", ":", "'", '"', "(", ")", "{", "}", "[", "]", "-", "--",
             "...", "'s", "'re", "/", "\\", "`", "```", "*", "**", "_", "=", "==", "<", ">"]
    out = ["", " ", "  ", "\n", "Two plus two equals four", " Two plus two", "\t\ttabs",
           "trailing spaces   ", "<|im_start|>system\nYou are helpful.<|im_end|>\n"]
    while len(out) < n:
        k = rng.randint(1, 14)
        parts = []
        for _ in range(k):
            pool = rng.choices([words, spaces, specials, punct], weights=[6, 3, 1, 2])[0]
            parts.append(rng.choice(pool))
        joiner = rng.choice(["", " ", ""])
        out.append(joiner.join(parts))
    for i in range(0, 256, 8):                    # raw code points, incl. controls
        out.append("".join(chr(c) for c in range(i, i + 8)))
    return out


def test_tokenizer_matches_transformers_on_a_corpus(ours, hf_tok):
    _, _, tok = ours
    texts = corpus()
    assert len(texts) >= 1000
    mismatches = [(t, hf_tok(t).input_ids, tok.encode(t)) for t in texts
                  if hf_tok(t).input_ids != tok.encode(t)]
    assert not mismatches, mismatches[:5]
    for t in texts[:300]:                           # and decode
        ids = tok.encode(t)
        assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids)
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a pirate."},
     {"role": "user", "content": "Hello!"},
     {"role": "assistant", "content": "Arr, ahoy!"},
     {"role": "user", "content": "Where is the treasure? 🙂\n\nTell me."}],
    [{"role": "user", "content": "  spaces  "}, {"role": "assistant", "content": ""}],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_as_transformers(ours, hf_tok, add_generation_prompt):
    from serving.http.prompt import ChatOptions, render_chat
    _, _, tok = ours
    for messages in CONVERSATIONS:
        got = render_chat(tok.chat_template, messages,
                          ChatOptions(add_generation_prompt=add_generation_prompt),
                          bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
        want = hf_tok.apply_chat_template(messages, tokenize=False,
                                          add_generation_prompt=add_generation_prompt)
        assert got == want
        assert tok.encode(got) == hf_tok(want).input_ids
