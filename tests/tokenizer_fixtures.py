"""Tiny tokenizers built in a tmp dir for the tokenizer tests (no network, well under a second).

`build_sentencepiece_dir` trains a sentencepiece BPE model with byte fallback and the chat
control strings as user-defined symbols; `build_bytelevel_dir` trains a byte-level BPE
`tokenizer.json` (GPT-2 byte alphabet, added special tokens, a bos post-processor) and writes
the tokenizer_config.json / generation_config.json files a Hugging Face checkpoint carries.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Several scripts so that merges form inside multi-byte characters and rare characters
# (those left out below) fall back to bytes.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello there!",
    "Numbers 0123456789 and punctuation: (a, b); [c] {d} - e_f / g? h!",
    "Café, naïve, résumé, über, façade, Ångström, São Paulo, mañana, straße.",
    "Übermäßig große Äpfel schmecken süß. Voilà déjà vu à la française.",
    "日本語のテキストです。東京は大きい都市です。今日は良い天気ですね。",
    "中文文本测试。我们今天去公园散步。北京欢迎你。",
    "한국어 문장입니다. 안녕하세요 여러분.",
    "Русский текст: привет, как дела? Всё хорошо.",
    "Emoji: 🙂 😀 🎉 👍 🚀 ❤️ and more 🙂🙂 text.",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n<think>ok</think>Hello!<|im_end|>",
] * 6

# Text the tests encode: words seen in training, accents, CJK, emoji (including ones never
# seen, which must go through byte fallback), whitespace runs and newlines.
SAMPLES = [
    "Hello world",
    "  leading spaces and  double  spaces ",
    "Café naïve résumé straße Ångström",
    "日本語のテキスト 东京 北京欢迎你",
    "emoji 🙂🎉👍 unseen 🦜🧪 and ☃ done",
    "line one\nline two\n\ttabbed",
    "mixed: Привет 안녕 日本 🙂 é",
]


def build_sentencepiece_dir(root: Path, vocab_size: int = 600) -> Path:
    """A dir with only tokenizer.model (sentencepiece BPE, byte fallback, chat symbols, no
    text normalization so that every string round-trips, a dummy prefix space)."""
    import sentencepiece as spm

    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(root / "tokenizer"), model_type="bpe",
        vocab_size=vocab_size, hard_vocab_limit=False, character_coverage=0.98,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        byte_fallback=True, user_defined_symbols=CHAT_SPECIALS, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, num_threads=1, minloglevel=2)
    corpus.unlink()
    (root / "tokenizer.vocab").unlink()
    return root


def build_bytelevel_dir(root: Path, vocab_size: int = 400) -> Path:
    """A Hugging Face style dir: tokenizer.json (byte-level BPE), tokenizer_config.json with
    the chat template, special_tokens_map.json and generation_config.json."""
    from tokenizers import (AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors,
                            trainers)

    root.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<s>", "<|im_start|>", "<|im_end|>"]
    plain_added = ["<think>", "</think>"]     # added but not special, as in Qwen3
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain_added])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tok.save(str(root / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "special": t in specials,
                                       "lstrip": False, "rstrip": False, "normalized": False,
                                       "single_word": False}
             for t in specials + plain_added}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
              "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "added_tokens_decoder": added, "chat_template": CHAT_TEMPLATE,
              "clean_up_tokenization_spaces": False, "model_max_length": 4096}
    (root / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (root / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]}))
    return root
