"""Constrained decoding on the host: a guided_* spec -> per-sample matcher -> token bitmask.

llguidance does the work (a Rust matcher with no torch dependency; it builds the next-token
mask over the whole vocabulary in tens of microseconds, and takes JSON schemas, regexes and
Lark grammars). xgrammar needs torch at run time and outlines-core compiles a full
automaton per schema up front; llguidance computes masks lazily, which suits per-request
schemas. The engine applies the mask inside its jitted step as a packed int32 bitmask
([ceil(V / 32)] words per row, bit t of word t // 32 = token t allowed); only constrained
rows are filled here, every other row is all ones.

Thinking: with `thinking_end_ids` the sample starts free (it may reason) and the
constraint applies once it has emitted that sequence; with `max_thinking_tokens` too, the
sequence is forced (one allowed token per step) when the budget is spent. While a grammar
waits behind the thinking, the stop ids are masked out: a sample that must answer in a
form (a forced tool call, a JSON schema) cannot end inside its reasoning.
GBNF (llama.cpp's `root ::= ...`) is converted to Lark by llguidance's own converter.
"""

from __future__ import annotations

import json
import re

import numpy as np

GUIDED_FIELDS = ("guided_json", "guided_json_object", "guided_regex", "guided_choice",
                 "guided_grammar")


def words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def all_ones(rows: int, vocab_size: int) -> np.ndarray:
    return np.full((rows, words(vocab_size)), -1, np.int32)


def only(token_id: int, vocab_size: int) -> np.ndarray:
    row = np.zeros(words(vocab_size), np.int32)
    row[token_id // 32] = np.int32(np.uint32(1 << (token_id % 32)).view(np.int32))
    return row


def strict(schema):
    """OpenAI's strict mode: an object with `properties` and no word on others takes no
    others (JSON Schema's default would let a model invent keys forever)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


_GBNF_RULE = re.compile(r"(?m)^\s*[A-Za-z][A-Za-z0-9_-]*\s*::=")


def lark_of(grammar: str) -> str:
    """A guided_grammar in Lark syntax: GBNF (rules written `name ::= ...`) is converted."""
    from llguidance.gbnf_to_lark import gbnf_to_lark, is_lark_syntax

    from llguidance.gbnf_to_lark import GbnfToLarkError

    if is_lark_syntax(grammar) or not _GBNF_RULE.search(grammar):
        return grammar
    try:
        return gbnf_to_lark(grammar)
    except GbnfToLarkError as e:
        raise ValueError(f"GBNF grammar: {e}") from None


def grammar_source(params) -> tuple[str, str] | None:
    """(field, llguidance grammar) of the request's guided_* field, or None."""
    import llguidance

    m = llguidance.LLMatcher
    if params.guided_json is not None:
        return "guided_json", m.grammar_from_json_schema(
            strict(params.guided_json), defaults={"whitespace_flexible": False})
    if params.guided_json_object:
        return "guided_json_object", m.grammar_from_json_schema(
            {"type": "object"}, defaults={"whitespace_flexible": False})
    if params.guided_regex is not None:
        return "guided_regex", m.grammar_from_regex(params.guided_regex)
    if params.guided_choice is not None:
        rx = "(" + "|".join(re.escape(c) for c in params.guided_choice) + ")"
        return "guided_choice", m.grammar_from_regex(rx)
    if params.guided_grammar is not None:
        return "guided_grammar", m.grammar_from_lark(lark_of(params.guided_grammar))
    return None


class _Vocab:
    """Our tokenizer as llguidance's TokenizerWrapper wants it: byte strings per token,
    special tokens as b"\\xff" + their name (so grammars can say <tool_call>)."""

    def __init__(self, tokenizer, vocab_size: int):
        special = set(tokenizer.special_ids)
        self.tokens = []
        for i in range(vocab_size):
            if i >= tokenizer.vocab_size:
                self.tokens.append(b"\xff<[" + str(i).encode() + b"]>")
            elif i in special:
                self.tokens.append(b"\xff" + tokenizer.token_bytes(i))
            else:
                self.tokens.append(tokenizer.token_bytes(i))
        self.special_token_ids = sorted(special)
        self.eos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else (
            min(tokenizer.stop_ids) if tokenizer.stop_ids else 0)
        self.bos_token_id = tokenizer.bos_id
        self._tok = tokenizer

    def __call__(self, text):
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tok.encode(text, add_special_tokens=False)


class GrammarCompiler:
    """One per engine: the llguidance tokenizer, built once (it indexes the vocabulary)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids=()):
        import llguidance

        self.vocab_size = vocab_size
        vocab = _Vocab(tokenizer, vocab_size)
        self.lltokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocab),
                                                  n_vocab=vocab_size)
        self.stop_ids = sorted(set(stop_ids) | {vocab.eos_token_id})

    def check(self, params) -> str | None:
        """The grammar of a request, validated: ValueError naming the field when it is bad."""
        import llguidance

        try:
            found = grammar_source(params)
        except (ValueError, TypeError, json.JSONDecodeError) as e:
            field = next(f for f in GUIDED_FIELDS if getattr(params, f))
            raise ValueError(f"{field}: {e}") from None
        if found is None:
            return None
        field, grammar = found
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, self.lltokenizer)
        if is_error:
            raise ValueError(f"{field}: {messages[0] if messages else 'invalid grammar'}")
        return grammar

    def constraint(self, grammar: str | None, params) -> "Constraint":
        return Constraint(self, grammar, list(params.thinking_end_ids or ()),
                          params.max_thinking_tokens)


class Constraint:
    """One sample's state: thinking (free, maybe forced to end), then the grammar."""

    def __init__(self, compiler: GrammarCompiler, grammar: str | None, end_ids: list[int],
                 budget: int | None):
        import llguidance

        self.compiler = compiler
        self.matcher = (llguidance.LLMatcher(compiler.lltokenizer, grammar)
                        if grammar is not None else None)
        self.end_ids = end_ids
        self.budget = budget
        self.thinking = bool(end_ids)
        self.count = 0
        self.recent: list[int] = []

    @property
    def active(self) -> bool:
        """Whether this sample's next token is restricted at all."""
        if self.thinking:
            return self.matcher is not None or (
                self.budget is not None and self.count >= self.budget)
        return self.matcher is not None

    def fill(self, row: np.ndarray) -> None:
        """Write the allowed-token bitmask of the next step into `row` ([words] int32)."""
        v = self.compiler.vocab_size
        if self.thinking:
            if self.budget is not None and self.count >= self.budget:
                row[:] = only(self.end_ids[self._end_progress()], v)
            else:           # free reasoning, but no stop before the grammar has run
                row[:] = -1
                for t in self.compiler.stop_ids:
                    row[:] &= ~only(t, v)
            return
        if self.matcher is None:
            row[:] = -1
            return
        if self.matcher.is_stopped() or self.matcher.is_error():
            row[:] = 0
            for t in self.compiler.stop_ids:
                row[:] |= only(t, v)
            return
        self.matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
        # the matcher allows EOS when the grammar accepts; other stop ids end the sample too
        if self.matcher.is_accepting():
            for t in self.compiler.stop_ids:
                row[:] |= only(t, v)

    @property
    def finished(self) -> bool:
        """The grammar is complete and admits nothing more: the sample ends here (even under
        ignore_eos or min_tokens, which would otherwise fight the forced stop id)."""
        return not self.thinking and self.matcher is not None and self.matcher.is_stopped()

    def _end_progress(self) -> int:
        """How much of end_ids the recent tokens already end with (a forced prefix)."""
        for k in range(min(len(self.end_ids) - 1, len(self.recent)), 0, -1):
            if self.recent[-k:] == self.end_ids[:k]:
                return k
        return 0

    def consume(self, token: int) -> None:
        self.count += 1
        if self.thinking:
            self.recent = (self.recent + [token])[-len(self.end_ids):]
            if self.recent == self.end_ids:
                self.thinking = False
            return
        if self.matcher is not None and not self.matcher.is_stopped():
            self.matcher.consume_token(token)
