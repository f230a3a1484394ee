"""A model's tokenizer behind one small interface: Hugging Face `tokenizer.json` or sentencepiece.

Servers, HTTP workers and notebooks need the same few things from a tokenizer: encode text
(special-token strings such as "<|im_start|>" mapped to their ids, as Hugging Face does),
decode ids, the exact bytes each token contributes (OpenAI logprobs report them), the
special and stop tokens, and the chat template. `load_tokenizer(dir)` reads the usual files
of a checkpoint (tokenizer.json, else tokenizer.model; tokenizer_config.json,
special_tokens_map.json, generation_config.json, chat_template.jinja) and answers with
transformers' semantics, without importing transformers or JAX: it runs at server start-up
and in every HTTP worker, where those imports cost seconds.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache

# End-of-turn / end-of-text markers of common chat models. Any of them present in a
# vocabulary as a special (added or control) token is a stop token.
STOP_TOKEN_STRINGS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>", "<|eot_id|>",
                      "<|eom_id|>", "<|end|>", "<end_of_turn>", "<eos>", "<|return|>")

SPIECE_SPACE = "\u2581"          # '▁', sentencepiece's visible space
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _gpt2_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: the printable char standing for each byte."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


class Tokenizer:
    """The interface every backend fills in. Ids are plain ints."""

    vocab_size: int
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    unk_id: int | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    special_ids: frozenset[int] = frozenset()   # added / control tokens, matched whole in text
    skip_ids: frozenset[int] = frozenset()      # what decode(skip_special_tokens=True) drops
    stop_ids: frozenset[int] = frozenset()      # eos, chat end markers, generation_config eos
    chat_template: str | None = None
    add_bos: bool = False                       # encode(add_special_tokens=True) prepends bos
    add_eos: bool = False                       # ... and appends eos
    model_dir: str = ""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes this token adds to the text (a special token: its string)."""
        raise NotImplementedError

    def token_to_id(self, s: str) -> int | None:
        raise NotImplementedError

    def id_to_piece(self, token_id: int) -> str:
        """The raw vocabulary entry ('Ġhello', '▁hello', '<0xE6>')."""
        raise NotImplementedError

    def token_str(self, token_id: int) -> str:
        """A printable form of one token: its bytes as UTF-8, a partial character as U+FFFD."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def _check_id(self, token_id: int) -> int:
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size}) "
                             f"of the tokenizer in {self.model_dir}")
        return token_id

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.model_dir!r}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_id}, eos={self.eos_id}, stop={sorted(self.stop_ids)})")


# -- the configuration files around a tokenizer -------------------------------------------


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _token_text(value) -> str | None:
    """A special token as tokenizer_config writes it: a string, {"content": ...} or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class _Files:
    """What tokenizer_config.json, special_tokens_map.json, generation_config.json and the
    chat template files say, with tokenizer_config winning over special_tokens_map."""

    def __init__(self, model_dir: str):
        self.config = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
        self.special_map = _read_json(os.path.join(model_dir, "special_tokens_map.json"))
        self.generation = _read_json(os.path.join(model_dir, "generation_config.json"))
        self.chat_template = self._chat_template(model_dir)
        added = self.config.get("added_tokens_decoder") or {}
        # id -> (content, special)
        self.added: dict[int, tuple[str, bool]] = {}
        for key, tok in added.items():
            content = _token_text(tok)
            if content is not None and str(key).lstrip("-").isdigit():
                special = tok.get("special", True) if isinstance(tok, dict) else True
                self.added[int(key)] = (content, bool(special))
        extra = self._get("additional_special_tokens") or []
        self.additional = [t for t in (_token_text(x) for x in extra) if t]

    def _get(self, key: str):
        if key in self.config:
            return self.config[key]
        return self.special_map.get(key)

    def has(self, key: str) -> bool:
        return key in self.config or key in self.special_map

    def named(self, key: str) -> str | None:
        """bos_token / eos_token / pad_token / unk_token, or None."""
        return _token_text(self._get(key))

    def named_specials(self) -> list[str]:
        names = [self.named(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")]
        return [t for t in names if t] + self.additional

    def generation_eos_ids(self) -> list[int]:
        eos = self.generation.get("eos_token_id")
        if isinstance(eos, int):
            return [eos]
        if isinstance(eos, list):
            return [e for e in eos if isinstance(e, int)]
        return []

    def _chat_template(self, model_dir: str) -> str | None:
        # As in transformers, a chat_template.jinja file wins over tokenizer_config.json.
        path = os.path.join(model_dir, "chat_template.jinja")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return f.read()
        source = _read_json(os.path.join(model_dir, "chat_template.json")).get("chat_template")
        if source is None:
            source = self.config.get("chat_template")
        if isinstance(source, list):     # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        return source if isinstance(source, str) and source else None


def _finish(tok: Tokenizer, files: _Files) -> None:
    """Fill in stop ids and the chat template, common to both backends."""
    stops = set(files.generation_eos_ids())
    if tok.eos_id is not None:
        stops.add(tok.eos_id)
    for s in STOP_TOKEN_STRINGS:
        i = tok.token_to_id(s)
        if i is not None and i in tok.special_ids:
            stops.add(i)
    tok.stop_ids = frozenset(i for i in stops if 0 <= i < tok.vocab_size)
    tok.chat_template = files.chat_template


# -- Hugging Face tokenizer.json ---------------------------------------------------------------


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` from tokenizer.json, read as transformers'
    PreTrainedTokenizerFast reads it (in transformers 5 the post-processor, not
    add_bos_token, decides what add_special_tokens adds when tokenizer.json exists)."""

    def __init__(self, path: str, files: _Files, model_dir: str):
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as RustTokenizer

        try:
            self._tok = RustTokenizer.from_file(path)
        except Exception as e:  # the Rust side raises a bare Exception on a bad file
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
        self.model_dir = model_dir
        # Tokens the config names (bos, eos, ..., added_tokens_decoder) become special added
        # tokens, as transformers does when it loads the config.
        names = files.named_specials() + [c for c, special in files.added.values() if special]
        added = self._tok.get_added_tokens_decoder()
        known = {t.content for t in added.values()}
        missing = [t for t in dict.fromkeys(names) if t not in known]
        if missing:
            self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                          for t in missing])
        plain = [c for c, special in files.added.values() if not special and c not in known]
        if plain:
            self._tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
        added = self._tok.get_added_tokens_decoder()
        self._added = {i: t.content for i, t in added.items()}
        self.special_ids = frozenset(added)
        self.skip_ids = frozenset(i for i, t in added.items() if t.special)
        self.vocab_size = max([self._tok.get_vocab_size(with_added_tokens=True)]
                              + [i + 1 for i in added])

        self.bos_token, self.eos_token = files.named("bos_token"), files.named("eos_token")
        self.bos_id = self._id_or_none(self.bos_token)
        self.eos_id = self._id_or_none(self.eos_token)
        self.pad_id = self._id_or_none(files.named("pad_token"))
        self.unk_id = self._id_or_none(files.named("unk_token"))
        # What the post-processor adds around a single sequence.
        around = self._tok.encode("", add_special_tokens=True).ids
        if around and not files.has("bos_token") and around[0] in self.special_ids:
            self.bos_id = around[0]
            self.bos_token = self._tok.id_to_token(around[0])
        self.add_bos = bool(around) and self.bos_id is not None and around[0] == self.bos_id
        self.add_eos = bool(around) and self.eos_id is not None and around[-1] == self.eos_id

        self._mode = self._decoder_mode()
        self._clean_up = bool(files.config.get("clean_up_tokenization_spaces", False)) and \
            type(self._tok.model).__name__ != "BPE"   # transformers skips it for BPE
        _finish(self, files)

    def _id_or_none(self, s: str | None) -> int | None:
        return None if s is None else self._tok.token_to_id(s)

    def _decoder_mode(self) -> str:
        """How a token's bytes are read off its piece: 'bytelevel' (GPT-2 byte alphabet),
        'metaspace' ('▁' is a space, <0xNN> a byte) or 'generic' (decode the one token)."""
        decoder = self._tok.decoder
        if decoder is None:
            return "generic"
        state = decoder.__getstate__()
        state = state.decode("utf-8") if isinstance(state, bytes) else str(state)
        if '"ByteLevel"' in state:
            return "bytelevel"
        if '"Metaspace"' in state or '"ByteFallback"' in state or SPIECE_SPACE in state:
            return "metaspace"
        return "generic"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    def token_to_id(self, s: str) -> int | None:
        return self._tok.token_to_id(s)

    def id_to_piece(self, token_id: int) -> str:
        token_id = self._check_id(token_id)
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            raise ValueError(f"token id {token_id} is not in the vocabulary of {self.model_dir}")
        return piece

    def token_bytes(self, token_id: int) -> bytes:
        token_id = self._check_id(token_id)
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        piece = self.id_to_piece(token_id)
        if self._mode == "bytelevel":
            table = _gpt2_byte_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
            return piece.encode("utf-8")
        if self._mode == "metaspace":
            m = _BYTE_PIECE.fullmatch(piece)
            if m:
                return bytes([int(m.group(1), 16)])
            return piece.replace(SPIECE_SPACE, " ").encode("utf-8")
        return self._tok.decode([token_id], skip_special_tokens=False).encode("utf-8")


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization (WordPiece-era spacing fixes)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                 (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


# -- sentencepiece tokenizer.model -------------------------------------------------------------

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model, read as transformers' Llama tokenizer (legacy=False) reads it:
    control pieces (<s>, </s>), user-defined pieces and added tokens in text map to their ids;
    the dummy-prefix space goes only at the start of the text (never after a special token);
    decode(skip_special_tokens=False) shows control pieces as their strings. One difference,
    on purpose: text that starts with spaces encodes as sentencepiece encodes it (dummy prefix
    plus the spaces), so it round-trips; transformers drops one of those spaces."""

    def __init__(self, path: str, files: _Files, model_dir: str):
        import sentencepiece as spm

        self.model_dir = model_dir
        try:
            with open(path, "rb") as f:
                proto_bytes = f.read()
            self._sp = spm.SentencePieceProcessor(model_proto=proto_bytes)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a valid sentencepiece model ({e})") from None
        self._proto_bytes = proto_bytes
        self._sp_no_prefix = None
        sp = self._sp
        n = sp.get_piece_size()
        self._n = n
        types, self._strip_first_space = self._piece_types(proto_bytes, n)
        self._types = types
        self._pieces = [sp.id_to_piece(i) for i in range(n)]
        self._piece_ids = {p: i for i, p in enumerate(self._pieces)}

        # Added tokens beyond the model (tokenizer_config added_tokens_decoder).
        self._extra: dict[int, str] = {i: c for i, (c, _) in files.added.items()
                                       if i >= n or c not in self._piece_ids}
        self._extra_ids = {c: i for i, c in self._extra.items()}
        self.vocab_size = max([n] + [i + 1 for i in self._extra])

        control = {i for i, t in enumerate(types) if t in (_CONTROL, _UNKNOWN)}
        user = {i for i, t in enumerate(types) if t == _USER_DEFINED}
        named = {self.token_to_id(s) for s in files.named_specials()} - {None}
        self.special_ids = frozenset(control | user | set(self._extra) | named)
        # As in transformers: decode skips control pieces, the named special tokens and the
        # added tokens marked special, not user-defined pieces the config leaves unmarked.
        marked = {self.token_to_id(c) for c, special in files.added.values() if special}
        self.skip_ids = frozenset(control | named | (marked - {None}))
        # Pieces decode shows as their strings, not through sentencepiece.
        self._literal = frozenset(control | set(self._extra))
        # Strings encode matches whole, before sentencepiece sees the text (as Hugging Face
        # splits on added tokens): sentencepiece itself would split control pieces, and would
        # prepend a space to a user-defined piece at the start of the text.
        split = sorted({self._piece_text(i) for i in self._literal | named | user}, key=len,
                       reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, split)) + ")") if split else None

        def pick(key: str, default: int) -> tuple[int | None, str | None]:
            if files.has(key):
                s = files.named(key)
                return (self.token_to_id(s) if s else None), s
            i = default if default >= 0 else None
            return i, (self._pieces[i] if i is not None else None)

        self.bos_id, self.bos_token = pick("bos_token", sp.bos_id())
        self.eos_id, self.eos_token = pick("eos_token", sp.eos_id())
        self.pad_id, _ = pick("pad_token", sp.pad_id())
        self.unk_id, _ = pick("unk_token", sp.unk_id())
        if self.pad_id is None and isinstance(files.generation.get("pad_token_id"), int):
            self.pad_id = files.generation["pad_token_id"]
        # transformers' LlamaTokenizer defaults: add_bos_token=True, add_eos_token=False.
        self.add_bos = bool(files.config.get("add_bos_token", True)) and self.bos_id is not None
        self.add_eos = bool(files.config.get("add_eos_token", False)) and self.eos_id is not None
        _finish(self, files)

    @staticmethod
    def _piece_types(proto_bytes: bytes, n: int) -> tuple[list[int], bool]:
        """Each piece's type and whether decode drops the first piece's leading '▁'."""
        try:
            from sentencepiece import sentencepiece_model_pb2 as pb
        except ImportError:  # no protobuf: every non-control piece counts as normal
            pb = None
        if pb is not None:
            m = pb.ModelProto()
            m.ParseFromString(proto_bytes)
            ns = m.normalizer_spec
            return [p.type for p in m.pieces], bool(ns.add_dummy_prefix or
                                                     ns.remove_extra_whitespaces)
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_proto=proto_bytes)
        types = [_BYTE if sp.is_byte(i) else _CONTROL if sp.is_control(i) else
                 _UNKNOWN if sp.is_unknown(i) else _UNUSED if sp.is_unused(i) else _NORMAL
                 for i in range(n)]
        return types, True

    def _no_prefix_sp(self):
        """The same model with add_dummy_prefix off: text after a special token."""
        if self._sp_no_prefix is None:
            import sentencepiece as spm
            try:
                from sentencepiece import sentencepiece_model_pb2 as pb
                m = pb.ModelProto()
                m.ParseFromString(self._proto_bytes)
                m.normalizer_spec.add_dummy_prefix = False
                self._sp_no_prefix = spm.SentencePieceProcessor(model_proto=m.SerializeToString())
            except ImportError:
                self._sp_no_prefix = self._sp
        return self._sp_no_prefix

    def _piece_text(self, i: int) -> str:
        return self._extra[i] if i in self._extra else self._pieces[i]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._split is None or not self._split.search(text):
            ids = self._sp.encode(text) if text else []
        else:
            ids = []
            for k, part in enumerate(self._split.split(text)):
                if k % 2:
                    ids.append(self.token_to_id(part))
                elif part:
                    sp = self._sp if k == 0 else self._no_prefix_sp()
                    ids.extend(sp.encode(part))
        if add_special_tokens:
            if self.add_bos:
                ids = [self.bos_id] + ids
            if self.add_eos:
                ids = ids + [self.eos_id]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.skip_ids]
        out: list[str] = []
        run: list[int] = []

        def flush_run():
            if run:
                text = self._sp.decode(run)
                if out and self._strip_first_space and self._pieces[run[0]].startswith(SPIECE_SPACE):
                    text = " " + text        # sentencepiece drops it only at the very start
                out.append(text)
                run.clear()

        for i in ids:
            if i in self._literal or not 0 <= i < self._n:
                flush_run()
                out.append(self._piece_text(self._check_id(i)))
            else:
                run.append(i)
        flush_run()
        return "".join(out)

    def token_to_id(self, s: str) -> int | None:
        if s in self._extra_ids:
            return self._extra_ids[s]
        return self._piece_ids.get(s)

    def id_to_piece(self, token_id: int) -> str:
        return self._piece_text(self._check_id(token_id))

    def token_bytes(self, token_id: int) -> bytes:
        token_id = self._check_id(token_id)
        if token_id >= self._n:
            return self._extra[token_id].encode("utf-8")
        piece = self._pieces[token_id]
        if self._types[token_id] == _BYTE:
            m = _BYTE_PIECE.fullmatch(piece)
            if m:
                return bytes([int(m.group(1), 16)])
        if self._types[token_id] in (_NORMAL, _UNUSED):
            return piece.replace(SPIECE_SPACE, " ").encode("utf-8")
        return piece.encode("utf-8")


# -- loading ------------------------------------------------------------------------------------


def load_tokenizer(model_dir: str) -> Tokenizer:
    """The tokenizer of a model directory: tokenizer.json (preferred) or tokenizer.model,
    at the top or in a tokenizer/ sub-folder, with the config files beside it."""
    model_dir = os.path.abspath(os.path.expanduser(str(model_dir)))
    if not os.path.isdir(model_dir):
        raise ValueError(f"tokenizer dir {model_dir}: no such directory")
    for folder in (model_dir, os.path.join(model_dir, "tokenizer")):
        hf_path = os.path.join(folder, "tokenizer.json")
        sp_path = os.path.join(folder, "tokenizer.model")
        if os.path.isfile(hf_path):
            return HFTokenizer(hf_path, _Files(folder), folder)
        if os.path.isfile(sp_path):
            return SentencePieceTokenizer(sp_path, _Files(folder), folder)
    raise ValueError(f"no tokenizer in {model_dir}: expected tokenizer.json or tokenizer.model")
