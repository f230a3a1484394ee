"""The tokenizer of a GGUF file, rebuilt from its `tokenizer.ggml.*` metadata.

A GGUF carries no tokenizer.json: it stores the vocabulary, token types, scores or merges
and the special ids under llama.cpp's key names. We build the same `tokenizers.Tokenizer`
that transformers' GGUF converter builds from them (byte-level BPE for `gpt2` files, with
the pre-tokenizer split of `tokenizer.ggml.pre`; sentencepiece-style BPE with byte fallback
for `llama` files, merges recovered from the scores when the file has none; control tokens
special, user-defined tokens added whole), so text encodes to the ids transformers gives,
and write it as an ordinary tokenizer directory (tokenizer.json, tokenizer_config.json
with the chat template, generation_config.json with EOS/EOT) that checkpoints/tokenizer.py
and the HTTP workers read like any other. The directory lives in the flaxserve cache,
keyed by the file's path, size and mtime, and is written once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

_CONTROL, _USER_DEFINED = 3, 4

# tokenizer.ggml.pre -> the split regex its merges were learned with (as transformers has them)
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx",
                     "smaug-bpe"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2),
    "qwen35": _QWEN35, "tekken": _TEKKEN,
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O),
}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's bytes_to_unicode: the printable character that stands for each byte."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges a sentencepiece vocabulary implies: every split of a piece into two known
    pieces, best piece score first (ties: shorter left part, then shorter right part)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found = []
    for piece, score in zip(tokens, scores):
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        found.extend(local)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in found]


class Metadata:
    """The tokenizer.* fields of a GGUF file (a checkpoints.gguf_read.GGUFFile)."""

    def __init__(self, f):
        self.path = f.path
        self.model = f.get("tokenizer.ggml.model")
        self.pre = f.get("tokenizer.ggml.pre")
        self.tokens = f.get("tokenizer.ggml.tokens")
        if self.model is None or not self.tokens:
            raise ValueError(f"{f.path}: no tokenizer in the file (tokenizer.ggml.model / "
                             f"tokenizer.ggml.tokens missing)")
        self.types = f.get("tokenizer.ggml.token_type") or [1] * len(self.tokens)
        self.scores = f.get("tokenizer.ggml.scores")
        self.merges = f.get("tokenizer.ggml.merges")
        self.ids = {k: f.get(f"tokenizer.ggml.{k}_token_id")
                    for k in ("bos", "eos", "unknown", "padding", "eot", "eom")}
        self.add_bos = f.get("tokenizer.ggml.add_bos_token")
        self.add_eos = f.get("tokenizer.ggml.add_eos_token")
        self.chat_template = f.get("tokenizer.chat_template")

    def token(self, key: str) -> str | None:
        i = self.ids.get(key)
        return self.tokens[i] if i is not None and 0 <= i < len(self.tokens) else None


def build_tokenizer(meta: Metadata):
    """A `tokenizers.Tokenizer` equal to the one transformers builds from the same file."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import processors

    tokens = meta.tokens
    if meta.model == "gpt2":
        alphabet = _byte_alphabet()
        chars = set(alphabet.values())

        def spell(t: str) -> str:
            return t if set(t) <= chars else "".join(alphabet[b] for b in t.encode("utf-8"))

        vocab = {spell(t): i for i, t in enumerate(tokens)}
        merges = [tuple(m.split(" ")) for m in (meta.merges or [])]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None,
                                   continuing_subword_prefix="", end_of_word_suffix="",
                                   fuse_unk=False))
        split = PRE_TOKENIZER_SPLITS.get(meta.pre)
        if split is None:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        control_ok = chars
    elif meta.model == "llama":
        vocab = {t: i for i, t in enumerate(tokens)}
        if meta.merges:
            merges = [tuple(m.split(" ")) for m in meta.merges]
        else:
            if meta.scores is None:
                raise ValueError(f"{meta.path}: a sentencepiece vocabulary needs "
                                 f"tokenizer.ggml.scores or tokenizer.ggml.merges")
            merges = merges_from_scores(tokens, meta.scores)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True,
                                   byte_fallback=True, dropout=None))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581",
                                                     prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "),
                                         decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
        control_ok = None
    else:
        raise ValueError(f"{meta.path}: unsupported tokenizer.ggml.model {meta.model!r} "
                         f"(supported: gpt2, llama)")

    control = [AddedToken(t, normalized=False, special=True)
               for t, kind in zip(tokens, meta.types)
               if kind == _CONTROL and (control_ok is None or set(t) <= control_ok)]
    if control:
        tok.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False)
            for t, kind in zip(tokens, meta.types) if kind == _USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)
    # What transformers' backend then does with the named tokens: they are special, and the
    # post-processor adds BOS/EOS as add_bos_token / add_eos_token say (sentencepiece files
    # that say nothing get BOS, as llama.cpp does).
    named = [meta.token(k) for k in ("bos", "eos", "unknown", "padding")]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t in dict.fromkeys(n for n in named if n)])
    add_bos, add_eos = _adds(meta)
    bos, eos = meta.token("bos"), meta.token("eos")
    single = (f"{bos}:0 " if add_bos else "") + "$A:0" + (f" {eos}:0" if add_eos else "")
    pair = single + (f" {bos}:1" if add_bos else "") + " $B:1" + (f" {eos}:1" if add_eos else "")
    special = ([(bos, meta.ids["bos"])] if add_bos else []) + \
              ([(eos, meta.ids["eos"])] if add_eos else [])
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                       special_tokens=special)
    return tok


def _adds(meta: Metadata) -> tuple[bool, bool]:
    add_bos = meta.add_bos if meta.add_bos is not None else meta.model == "llama"
    add_bos = bool(add_bos) and meta.token("bos") is not None
    add_eos = bool(meta.add_eos) and meta.token("eos") is not None
    return add_bos, add_eos


def tokenizer_config(meta: Metadata) -> dict:
    add_bos, add_eos = _adds(meta)
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              "bos_token": meta.token("bos"), "eos_token": meta.token("eos"),
              "unk_token": meta.token("unknown"), "pad_token": meta.token("padding"),
              "add_bos_token": add_bos, "add_eos_token": add_eos,
              "clean_up_tokenization_spaces": False}
    if meta.chat_template:
        config["chat_template"] = meta.chat_template
    return config


def cache_root() -> str:
    from checkpoints.resolve import cache_dir
    return os.path.join(cache_dir(), "gguf")


def tokenizer_dir(f) -> str:
    """The tokenizer directory of a GGUF file (a GGUFFile), written on first use."""
    st = os.stat(f.path)
    key = hashlib.sha256(f"{f.path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(f.path))[0]
    out = os.path.join(cache_root(), f"{stem}-{key}")
    if os.path.isfile(os.path.join(out, "source.json")):
        return out
    if f.get("tokenizer.ggml.model") is None:   # weights only: token-id prompts
        meta, tok = None, None
    else:
        meta = Metadata(f)
        tok = build_tokenizer(meta)
    os.makedirs(cache_root(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=cache_root())
    try:
        if tok is not None:
            _write_tokenizer(tmp, meta, tok)
        with open(os.path.join(tmp, "source.json"), "w") as fh:
            json.dump({"gguf": f.path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}, fh)
        try:
            os.rename(tmp, out)
        except OSError:            # another process wrote it first
            if not os.path.isfile(os.path.join(out, "source.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_tokenizer(tmp: str, meta: Metadata, tok) -> None:
    tok.save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
        json.dump(tokenizer_config(meta), fh, indent=2, ensure_ascii=False)
    eos = [meta.ids[k] for k in ("eos", "eot", "eom") if meta.ids[k] is not None]
    generation = {"eos_token_id": list(dict.fromkeys(eos))}
    if meta.ids["bos"] is not None:
        generation["bos_token_id"] = meta.ids["bos"]
    if meta.ids["padding"] is not None:
        generation["pad_token_id"] = meta.ids["padding"]
    with open(os.path.join(tmp, "generation_config.json"), "w") as fh:
        json.dump(generation, fh, indent=2)
