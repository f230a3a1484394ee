"""The bundled default model: it loads, is a small Llama, is measured, and writes English.

`flaxserve serve` with no --model serves checkpoints/default and most tests use it, so
these checks guard the committed artifacts: the orbax checkpoint and its config, the size
limit, metrics.json, the tokenizer's special tokens and chat template, and a crude
"reads as words" check on a greedy continuation.
"""

from __future__ import annotations

import json
import math
import os
import re

import jax
import jinja2
import numpy as np
import pytest
import sentencepiece as spm

from checkpoints.orbax_io import load_checkpoint
from checkpoints.train_default import SPECIAL_TOKENS, chat_prompt, generate

DEFAULT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "checkpoints", "default")
MAX_BYTES = 20 * 1024 * 1024


def _find(name: str) -> str:
    """A tokenizer file, at the top of the checkpoint or in a tokenizer/ folder."""
    for folder in (DEFAULT_DIR, os.path.join(DEFAULT_DIR, "tokenizer")):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    raise AssertionError(f"{name} missing from {DEFAULT_DIR}")


@pytest.fixture(scope="module")
def loaded():
    return load_checkpoint(DEFAULT_DIR)


@pytest.fixture(scope="module")
def config(loaded):
    return loaded[0]


@pytest.fixture(scope="module")
def params(loaded):
    return loaded[1]


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=_find("tokenizer.model"))


def test_config_is_a_small_llama(config, params):
    assert config.family == "llama"
    assert config.tie_word_embeddings
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    assert n == config.num_params()
    assert 1_000_000 < n < 10_000_000


def test_checkpoint_fits_the_size_limit():
    total = 0
    for root, _, files in os.walk(DEFAULT_DIR):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    assert total <= MAX_BYTES, f"{DEFAULT_DIR} is {total} bytes"


def test_metrics_are_present_and_plausible(config):
    with open(os.path.join(DEFAULT_DIR, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["parameters"] == config.num_params()
    ppl = metrics["validation_perplexity"]
    assert math.isfinite(ppl)
    assert ppl == pytest.approx(math.exp(metrics["validation_loss"]), rel=1e-3)
    # Uniform guessing over the vocabulary scores ppl = vocab_size (4096), and a unigram
    # model of English over a 4K BPE vocabulary scores several hundred; a trained model
    # must be far below both: vocab_size / 32 (= 128) leaves room only for a model that
    # has learned word order.
    assert ppl < config.vocab_size / 32
    assert metrics["tokens_seen"] > 0 and metrics["training_steps"] > 0


def test_special_tokens_are_single_pieces_and_stop_ids_match(config, sp):
    with open(_find("generation_config.json")) as f:
        generation = json.load(f)
    im_end = sp.piece_to_id("<|im_end|>")
    assert im_end in generation["eos_token_id"]
    assert im_end in config.eos_token_ids
    for token in SPECIAL_TOKENS:  # user-defined symbols: parsed from text as one piece
        ids = sp.encode(token)
        assert ids == [sp.piece_to_id(token)], token
        assert not sp.is_unknown(ids[0])
    # <|endoftext|> is sentencepiece's eos, a control symbol: a stop id, never text.
    endoftext = sp.piece_to_id("<|endoftext|>")
    assert sp.is_control(endoftext) and sp.eos_id() == endoftext
    assert endoftext in generation["eos_token_id"] and endoftext in config.eos_token_ids
    assert sp.decode(sp.encode("Hello,\n  world!")) == "Hello,\n  world!"


def _template():
    with open(_find("tokenizer_config.json")) as f:
        tok_config = json.load(f)
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False)
    return tok_config, env.from_string(tok_config["chat_template"])


def test_chat_template_renders_chatml_tools_and_thinking():
    tok_config, template = _template()
    assert tok_config["eos_token"] == "<|im_end|>"
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"}]
    text = template.render(messages=messages, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert template.render(messages=messages[1:], add_generation_prompt=True,
                           enable_thinking=False).endswith("<think>\n\n</think>\n\n")
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {}}}
    call = {"role": "assistant", "content": "",
            "tool_calls": [{"function": {"name": "get_time", "arguments": {"tz": "UTC"}}}]}
    result = {"role": "tool", "content": "12:00"}
    text = template.render(messages=messages + [call, result], tools=[tool],
                           add_generation_prompt=False)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert '"name": "get_time"' in text
    assert '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n12:00\n</tool_response><|im_end|>\n" in text


def _reads_as_words(text: str, sp, min_words: int = 8) -> tuple[float, float]:
    """(share of words made of letters, share that are whole pieces of the vocabulary)."""
    words = [w.strip(".,;:!?\"'()-") for w in text.split()]
    words = [w for w in words if w]
    assert len(words) >= min_words, text
    alpha = [w for w in words if re.fullmatch(r"[A-Za-z]+('[a-z]+)?", w)]
    vocab = {sp.id_to_piece(i).lstrip("\u2581") for i in range(sp.get_piece_size())}
    known = [w for w in alpha if w in vocab or w.lower() in vocab]
    return len(alpha) / len(words), len(known) / len(words)


def test_greedy_continuation_reads_as_english(config, params, sp):
    prompt = "The old man looked at the sea and said that"
    ids = generate(config, params, sp.encode(prompt), 48, stop_ids=config.eos_token_ids)
    text = sp.decode(ids)
    assert "<|" not in text, text
    alpha, known = _reads_as_words(text, sp, min_words=5)
    # A random-weight model scores about 0.88 and 0.5 here.
    assert alpha > 0.9, text
    assert known > 0.75, text


def test_chat_reply_is_english_and_ends(config, params, sp):
    prompt = chat_prompt("Tell me something about science.")
    ids = generate(config, params, sp.encode(prompt), 96, stop_ids=config.eos_token_ids)
    assert len(ids) < 96, "the reply did not end with a stop token"
    text = sp.decode(ids)
    assert "<|im_start|>" not in text
    alpha, known = _reads_as_words(text, sp, min_words=3)
    assert alpha > 0.9, text
    assert known > 0.75, text
