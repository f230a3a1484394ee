"""`SamplingParams`: every control of SAMPLING.md, with defaults and strict validation.

This is the one place a sampling value is checked. Nothing is clamped behind the user's
back: a value out of range is a ValueError that names the field and its valid range, and
an unknown key is an error too (no silent drift). Protocol adapters (OpenAI, Anthropic,
gRPC, the CLI) build a dict and call `SamplingParams.from_dict`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

# Stage names for `sampler_order` (the default order of SAMPLING.md).
STAGES = ("penalties", "dry", "processors", "min_k", "temperature", "top_n_sigma", "min_p",
          "p_less", "top_k", "top_p", "typical", "epsilon", "eta", "xtc")
DEFAULT_ORDER = STAGES
# llama.cpp's default: truncation first, temperature last.
TEMPERATURE_LAST_ORDER = tuple(s for s in STAGES if s != "temperature" and s != "xtc") + (
    "xtc", "temperature")

MAX_TOP_LOGPROBS = 20
# raw: the model's distribution; processed: the one sampled from (constraint included);
# unconstrained: the sampler's stages without the constraint mask (grammar / schema /
# tool choice); all: processed, plus raw, unconstrained and the mass the constraint removed
LOGPROBS_MODES = ("raw", "processed", "unconstrained", "all")
MAX_STOP_TOKEN_IDS = 16
MAX_BAD_WORDS = 16                # bad_words strings
MAX_BAD_WORD_LEN = 8              # tokens per banned sequence
MAX_BAD_WORD_CHARS = 64           # characters per bad_words string
# bad_words_ids lists, including the tokenizations of bad_words (two per word: with and
# without a leading space)
MAX_BAD_WORD_SEQUENCES = 3 * MAX_BAD_WORDS
MAX_TOP_P_RESET_IDS = 8
MAX_DRY_BREAKERS = 32
MAX_NGRAM = 16
# Server caps of the fields with no natural bound (docs/reliability.md, "Limits and
# validation"). Every integer that reaches a device array must fit in int32.
MAX_SEQUENCE = 1 << 24            # lengths and windows when the context is not known
MAX_VOCAB = 1 << 24               # top_k when the vocabulary is not known
MAX_STOP_STRINGS = 128            # stop strings per request (the HTTP routes cap lower)
MAX_STOP_STRING_CHARS = 1024      # characters per stop string
MAX_DRY_BREAKER_CHARS = 64
MAX_PROCESSORS = 16               # logits_processors entries
MAX_THINKING_END_IDS = 16
MAX_GUIDED_CHOICES = 1024
MAX_GUIDED_CHARS = 1 << 16        # guided_regex / guided_grammar / each guided_choice
MAX_SAMPLES = 128                 # n and best_of
MAX_BEAMS = 16                    # beam width (best_of or n) with use_beam_search
SPECULATIVE_METHODS = ("ngram", "draft", "none")   # `speculative.method`
MAX_SPECULATIVE_TOKENS = 16       # `speculative.num_tokens`: drafts per verify
# fields that may be set with use_beam_search (serving/beam_search.py); any other field
# away from its default is an error there
BEAM_SEARCH_FIELDS = {"use_beam_search", "length_penalty", "early_stopping", "n", "best_of",
                      "max_tokens", "stop_token_ids", "ignore_eos", "seed", "temperature",
                      "include_stop_str_in_output", "dry_sequence_breaker_ids", "deterministic",
                      "logprobs", "top_logprobs"}

# Range of every numeric field: (low, high, low open, high open, integer). "vocab" and
# "context" are the engine's vocabulary size and context length (MAX_VOCAB and
# MAX_SEQUENCE when unknown). serving/http/openapi.py publishes the same table.
BOUNDS = {
    "temperature": (0.0, 100.0, False, False, False),
    "top_k": (-1, "vocab", False, False, True),
    "top_p": (0.0, 1.0, True, False, False),
    "top_p_decay": (0.0, 1.0, True, False, False),
    "top_p_min": (0.0, 1.0, True, False, False),
    "min_p": (0.0, 1.0, False, False, False),
    "typical_p": (0.0, 1.0, True, False, False),
    "epsilon_cutoff": (0.0, 1.0, False, True, False),
    "eta_cutoff": (0.0, 1.0, False, True, False),
    "top_n_sigma": (0.0, 100.0, False, False, False),
    "xtc_probability": (0.0, 1.0, False, False, False),
    "xtc_threshold": (0.0, 0.5, False, False, False),
    "dynatemp_range": (0.0, 100.0, False, False, False),
    "dynatemp_exponent": (0.0, 100.0, False, False, False),
    "mirostat_tau": (0.0, 100.0, False, False, False),
    "mirostat_eta": (0.0, 10.0, False, False, False),
    # a floor, not just > 0: a subnormal penalty turns positive logits into inf
    "repetition_penalty": (0.01, 100.0, False, False, False),
    "presence_penalty": (-2.0, 2.0, False, False, False),
    "frequency_penalty": (-2.0, 2.0, False, False, False),
    "penalty_window": (0, "context", False, False, True),
    "dry_multiplier": (0.0, 100.0, False, False, False),
    "dry_base": (1.0, 100.0, True, False, False),
    "dry_allowed_length": (1, "context", False, False, True),
    "dry_penalty_last_n": (-1, "context", False, False, True),
    "no_repeat_ngram_size": (0, MAX_NGRAM, False, False, True),
    "min_tokens": (0, "context", False, False, True),
    "max_tokens": (1, MAX_SEQUENCE, False, False, True),
    "n": (1, MAX_SAMPLES, False, False, True),
    "best_of": (1, MAX_SAMPLES, False, False, True),
    "top_logprobs": (0, MAX_TOP_LOGPROBS, False, False, True),
    "prompt_logprobs": (0, MAX_TOP_LOGPROBS, False, False, True),
    "max_thinking_tokens": (0, "context", False, False, True),
    "adaptive_p_target": (-1.0, 1.0, False, False, False),
    "adaptive_p_decay": (0.0, 0.99, False, False, False),
    "min_k_tau": (0.0, 100.0, False, False, False),
    "length_penalty": (-100.0, 100.0, False, False, False),
}


def _err(name: str, rule: str, value) -> ValueError:
    return ValueError(f"{name} must be {rule}, got {value!r}")


_NULLABLE = ("max_tokens", "best_of", "prompt_logprobs", "max_thinking_tokens")


def check_bounds(name: str, v, vocab_size: int | None = None,
                 max_len: int | None = None) -> None:
    """A ValueError naming `name` unless `v` has its BOUNDS type and range (also for a
    protocol adapter checking a value it is about to replace, so none passes unchecked)."""
    lo, hi, lo_open, hi_open, integer = BOUNDS[name]
    hi = {"vocab": vocab_size or MAX_VOCAB, "context": max_len or MAX_SEQUENCE}.get(hi, hi)
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise _err(name, "an integer" if integer else "a number", v)
    if not integer and not math.isfinite(v):
        raise _err(name, "a finite number", v)
    if (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
        raise _err(name, f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}", v)


GUIDED_FIELDS = ("guided_json", "guided_json_object", "guided_regex", "guided_choice",
                 "guided_grammar")


@dataclass
class SamplingParams:
    # -- the distribution -----------------------------------------------------------------
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    top_n_sigma: float = 0.0
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    mirostat_mode: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    # dynamic top-p (TensorRT-LLM): after each token p = max(p * decay, min), reset to top_p
    # when the token is one of top_p_reset_ids (sampling/dynamic_top_p.py)
    top_p_decay: float = 1.0
    top_p_min: float = 1e-6
    top_p_reset_ids: list[int] = field(default_factory=list)
    # adaptive-p (llama.cpp; sampling/adaptive_p.py): negative target = off
    adaptive_p_target: float = -1.0
    adaptive_p_decay: float = 0.9
    # min-k (vLLM PR #48142) and p-less (vLLM PR #48136): sampling/min_k.py
    min_k: bool = False
    min_k_tau: float = 3.0
    p_less: bool = False
    # beam search (vLLM's spelling; serving/beam_search.py): n beams, scores returned
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool = False
    # exact speculative decoding in the batch server (serving/engine/spec_jobs.py):
    # {"method": "ngram" | "draft" | "none", "num_tokens": K}; None: the server's default
    speculative: dict | None = None
    # -- penalties ----------------------------------------------------------------------------
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty_scope: str = "prompt_and_output"   # or "output"
    presence_frequency_scope: str = "output"              # or "prompt_and_output"
    penalty_window: int = 0                               # last N tokens of the scope; 0 = all
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 0
    dry_sequence_breakers: list[str] = field(default_factory=lambda: ["\n", ":", "\"", "*"])
    dry_sequence_breaker_ids: list[int] | None = None     # resolved from the strings by a tokenizer
    no_repeat_ngram_size: int = 0
    # -- masks and bias ------------------------------------------------------------------------
    logit_bias: dict[int, float] = field(default_factory=dict)
    allowed_token_ids: list[int] | None = None
    bad_words_ids: list[list[int]] = field(default_factory=list)
    bad_words: list[str] = field(default_factory=list)   # strings; sampling/bad_words.py
    min_tokens: int = 0
    # -- stopping (host side, except min_tokens' EOS mask) ----------------------------------------
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    # -- randomness and samples -----------------------------------------------------------------
    seed: int | None = None
    n: int = 1
    best_of: int | None = None
    # -- what comes back --------------------------------------------------------------------------
    logprobs: bool = False
    top_logprobs: int = 0
    logprobs_mode: str = "raw"              # or "processed", "unconstrained", "all"
    prompt_logprobs: int | None = None
    return_entropy: bool = False
    deterministic: bool = False   # bitwise batch invariance (docs/research.md)
    # -- research controls -----------------------------------------------------------------------
    sampler_order: list[str] | None = None
    temperature_last: bool = False
    logits_processors: list[dict] = field(default_factory=list)
    # -- constrained decoding and thinking (host-side masks, sampling/grammar.py) -----------------
    guided_json: dict | None = None                       # a JSON schema the output matches
    guided_json_object: bool = False                      # any JSON object
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None                     # llguidance Lark syntax
    thinking_end_ids: list[int] = field(default_factory=list)  # e.g. the ids of </think>
    max_thinking_tokens: int | None = None                # then thinking_end_ids is forced

    # ---------------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict, vocab_size: int | None = None,
                  max_len: int | None = None) -> "SamplingParams":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        values = {k: v for k, v in d.items() if v is not None or k in (
            "seed", "max_tokens", "best_of", "prompt_logprobs", "allowed_token_ids",
            "sampler_order", "dry_sequence_breaker_ids", "guided_json", "guided_regex",
            "guided_choice", "guided_grammar", "max_thinking_tokens")}
        if isinstance(values.get("logit_bias"), dict):
            bias = {}
            for k, v in values["logit_bias"].items():
                try:
                    bias[int(k)] = v
                except (TypeError, ValueError):
                    raise ValueError(f"logit_bias keys must be token ids (integers); got the "
                                     f"key {k!r}") from None
            values["logit_bias"] = bias
        if isinstance(values.get("stop"), str):
            values["stop"] = [values["stop"]]
        if isinstance(values.get("top_p_reset_ids"), int) and not isinstance(
                values["top_p_reset_ids"], bool):
            values["top_p_reset_ids"] = [values["top_p_reset_ids"]]   # TensorRT-LLM: one id
        if isinstance(values.get("bad_words"), str):
            values["bad_words"] = [values["bad_words"]]
        if "speculative" in d and d["speculative"] is None:
            values["speculative"] = {"method": "none"}     # an explicit null opts out
        return cls(**values).validate(vocab_size, max_len)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["speculative"] is None:      # unset (the server's default), not an explicit
            del d["speculative"]          # null (which opts out): from_dict round-trips it
        return d

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 and self.mirostat_mode == 0

    def order(self) -> tuple[str, ...]:
        if self.sampler_order is not None:
            return tuple(self.sampler_order)
        return TEMPERATURE_LAST_ORDER if self.temperature_last else DEFAULT_ORDER

    def validate(self, vocab_size: int | None = None,
                 max_len: int | None = None) -> "SamplingParams":
        """Self, or a ValueError naming the first bad field. `vocab_size` bounds token ids
        and top_k, `max_len` (the context) bounds windows and lengths."""
        self._validate_bounds(vocab_size, max_len)
        self._validate_sizes()
        def number(name, lo=None, hi=None, lo_open=False, hi_open=False, integer=False):
            v = getattr(self, name)
            kind = "an integer" if integer else "a number"
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (
                    integer and not isinstance(v, int)):
                raise _err(name, kind, v)
            if not integer and not math.isfinite(v):
                raise _err(name, "finite", v)
            lo_bad = lo is not None and (v <= lo if lo_open else v < lo)
            hi_bad = hi is not None and (v >= hi if hi_open else v > hi)
            if lo_bad or hi_bad:
                left = "(" if lo_open else "["
                right = ")" if hi_open else "]"
                raise _err(name, f"in {left}{'-inf' if lo is None else lo}, "
                                 f"{'inf' if hi is None else hi}{right}", v)

        def flag(name):
            if not isinstance(getattr(self, name), bool):
                raise _err(name, "true or false", getattr(self, name))

        def token_id(name, t):
            if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (
                    vocab_size is not None and t >= vocab_size):
                bound = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
                raise _err(name, f"token ids in {bound}", t)

        number("temperature", 0.0)
        number("top_k", -1, integer=True)
        number("top_p", 0.0, 1.0, lo_open=True)
        number("min_p", 0.0, 1.0)
        number("typical_p", 0.0, 1.0, lo_open=True)
        number("epsilon_cutoff", 0.0, 1.0, hi_open=True)
        number("eta_cutoff", 0.0, 1.0, hi_open=True)
        number("top_n_sigma", 0.0)
        number("xtc_probability", 0.0, 1.0)
        number("xtc_threshold", 0.0, 0.5)
        number("dynatemp_range", 0.0)
        number("dynatemp_exponent", 0.0)
        if self.mirostat_mode not in (0, 2) or isinstance(self.mirostat_mode, bool):
            raise _err("mirostat_mode", "0 (off) or 2 (mirostat v2)", self.mirostat_mode)
        number("mirostat_tau", 0.0)
        number("mirostat_eta", 0.0)
        self._validate_dynamic_top_p(number, token_id)
        self._validate_beam_search(number, flag)
        number("repetition_penalty", 0.01)
        number("presence_penalty", -2.0, 2.0)
        number("frequency_penalty", -2.0, 2.0)
        for name in ("repetition_penalty_scope", "presence_frequency_scope"):
            if getattr(self, name) not in ("prompt_and_output", "output"):
                raise _err(name, "'prompt_and_output' or 'output'", getattr(self, name))
        number("penalty_window", 0, integer=True)
        number("dry_multiplier", 0.0)
        number("dry_base", 1.0, lo_open=True)
        number("dry_allowed_length", 1, integer=True)
        number("dry_penalty_last_n", -1, integer=True)
        if not isinstance(self.dry_sequence_breakers, list) or not all(
                isinstance(s, str) for s in self.dry_sequence_breakers):
            raise _err("dry_sequence_breakers", "a list of strings", self.dry_sequence_breakers)
        if self.dry_sequence_breaker_ids is not None:
            if len(self.dry_sequence_breaker_ids) > MAX_DRY_BREAKERS:
                raise _err("dry_sequence_breaker_ids", f"at most {MAX_DRY_BREAKERS} ids",
                           len(self.dry_sequence_breaker_ids))
            for t in self.dry_sequence_breaker_ids:
                token_id("dry_sequence_breaker_ids", t)
        number("no_repeat_ngram_size", 0, MAX_NGRAM, integer=True)
        if not isinstance(self.logit_bias, dict):
            raise _err("logit_bias", "a map of token id to bias", self.logit_bias)
        for t, b in self.logit_bias.items():
            token_id(f"logit_bias[{t}] (a key)", t)
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
                raise _err(f"logit_bias[{t}]", "in [-100, 100]", b)
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, list) or not self.allowed_token_ids:
                raise _err("allowed_token_ids", "a non-empty list of token ids",
                           self.allowed_token_ids)
            for t in self.allowed_token_ids:
                token_id("allowed_token_ids", t)
        if not isinstance(self.bad_words_ids, list) or len(
                self.bad_words_ids) > MAX_BAD_WORD_SEQUENCES:
            raise _err("bad_words_ids", f"a list of at most {MAX_BAD_WORD_SEQUENCES} "
                       "token-id lists", self.bad_words_ids)
        words = self.bad_words
        if not isinstance(words, list) or len(words) > MAX_BAD_WORDS or not all(
                isinstance(w, str) and w.strip() and len(w) <= MAX_BAD_WORD_CHARS for w in words):
            raise _err("bad_words", f"a list of at most {MAX_BAD_WORDS} non-blank strings of "
                       f"at most {MAX_BAD_WORD_CHARS} characters", self.bad_words)
        for word in self.bad_words_ids:
            if not isinstance(word, list) or not 1 <= len(word) <= MAX_BAD_WORD_LEN:
                raise _err("bad_words_ids", f"lists of 1 to {MAX_BAD_WORD_LEN} token ids", word)
            for t in word:
                token_id("bad_words_ids", t)
        number("min_tokens", 0, integer=True)
        if self.max_tokens is not None:
            number("max_tokens", 1, integer=True)
            if self.min_tokens > self.max_tokens:
                raise _err("min_tokens", f"<= max_tokens ({self.max_tokens})", self.min_tokens)
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise _err("stop", "a list of non-empty strings", self.stop)
        if not isinstance(self.stop_token_ids, list) or len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise _err("stop_token_ids", f"a list of at most {MAX_STOP_TOKEN_IDS} token ids",
                       self.stop_token_ids)
        for t in self.stop_token_ids:
            token_id("stop_token_ids", t)
        flag("include_stop_str_in_output")
        flag("ignore_eos")
        if self.seed is not None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not (
                    -(2 ** 63) <= self.seed < 2 ** 64):
                raise _err("seed", "an integer that fits in 64 bits", self.seed)
        number("n", 1, 128, integer=True)
        if self.best_of is not None:
            number("best_of", self.n, 128, integer=True)
        flag("logprobs")
        number("top_logprobs", 0, MAX_TOP_LOGPROBS, integer=True)
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise _err("logprobs_mode", "'raw', 'processed', 'unconstrained' or 'all'",
                       self.logprobs_mode)
        if self.prompt_logprobs is not None:
            number("prompt_logprobs", 0, MAX_TOP_LOGPROBS, integer=True)
        flag("return_entropy")
        flag("deterministic")
        flag("temperature_last")
        if self.sampler_order is not None:
            order = self.sampler_order
            if (not isinstance(order, list) or len(set(order)) != len(order)
                    or not set(order) <= set(STAGES)):
                raise _err("sampler_order", f"a list of distinct stages from {list(STAGES)}", order)
        if not isinstance(self.logits_processors, list):
            raise _err("logits_processors", "a list of {name, args} objects", self.logits_processors)
        from sampling.registry import validate_processors
        validate_processors(self.logits_processors)
        self._validate_guided(token_id)
        self._validate_speculative()
        return self

    def _validate_speculative(self) -> None:
        spec = self.speculative
        if spec is None:
            return
        if not isinstance(spec, dict):
            raise _err("speculative", "an object {method, num_tokens} or null", spec)
        unknown = sorted(str(k) for k in set(spec) - {"method", "num_tokens"})
        if unknown:
            raise ValueError(f"speculative: unknown field(s) {', '.join(unknown)} (expected "
                             "method, num_tokens)")
        method = spec.get("method", "ngram")
        if method not in SPECULATIVE_METHODS:
            raise _err("speculative.method", f"one of {', '.join(SPECULATIVE_METHODS)}", method)
        k = spec.get("num_tokens")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int)
                              or not 1 <= k <= MAX_SPECULATIVE_TOKENS):
            raise _err("speculative.num_tokens", f"an integer in [1, {MAX_SPECULATIVE_TOKENS}]",
                       k)

    def _validate_bounds(self, vocab_size: int | None, max_len: int | None) -> None:
        """Type and range of every numeric field of BOUNDS (None where it may be None)."""
        for name in BOUNDS:
            v = getattr(self, name)
            if not (v is None and name in _NULLABLE):
                check_bounds(name, v, vocab_size, max_len)

    def _validate_sizes(self) -> None:
        """Counts and lengths of the list and string fields (a request's cost is bounded)."""
        def sized(name, items: int, what: str):
            v = getattr(self, name)
            if isinstance(v, list) and len(v) > items:
                raise _err(name, f"at most {items} {what}", f"a list of {len(v)}")

        sized("stop", MAX_STOP_STRINGS, "stop strings")
        if isinstance(self.stop, list):
            for s in self.stop:
                if isinstance(s, str) and len(s) > MAX_STOP_STRING_CHARS:
                    raise _err("stop", f"strings of at most {MAX_STOP_STRING_CHARS} "
                               "characters", f"one of {len(s)}")
        sized("dry_sequence_breakers", MAX_DRY_BREAKERS, "strings")
        if isinstance(self.dry_sequence_breakers, list):
            for s in self.dry_sequence_breakers:
                if isinstance(s, str) and len(s) > MAX_DRY_BREAKER_CHARS:
                    raise _err("dry_sequence_breakers", f"strings of at most "
                               f"{MAX_DRY_BREAKER_CHARS} characters", f"one of {len(s)}")
        sized("allowed_token_ids", MAX_VOCAB, "token ids")
        sized("logits_processors", MAX_PROCESSORS, "processors")
        sized("thinking_end_ids", MAX_THINKING_END_IDS, "token ids")
        sized("guided_choice", MAX_GUIDED_CHOICES, "choices")
        for name in ("guided_regex", "guided_grammar"):
            v = getattr(self, name)
            if isinstance(v, str) and len(v) > MAX_GUIDED_CHARS:
                raise _err(name, f"at most {MAX_GUIDED_CHARS} characters", f"{len(v)}")
        if isinstance(self.guided_choice, list) and any(
                isinstance(c, str) and len(c) > MAX_GUIDED_CHARS for c in self.guided_choice):
            raise _err("guided_choice", f"strings of at most {MAX_GUIDED_CHARS} characters",
                       "a longer one")

    @property
    def guided(self) -> str | None:
        """The guided_* field this request sets, if any."""
        return next((f for f in GUIDED_FIELDS if getattr(self, f) not in (None, False)), None)

    def _validate_dynamic_top_p(self, number, token_id) -> None:
        number("top_p_decay", 0.0, 1.0, lo_open=True)
        number("top_p_min", 0.0, 1.0, lo_open=True)
        if self.top_p_min > self.top_p:
            raise _err("top_p_min", f"<= top_p ({self.top_p}), the floor of a decaying top_p",
                       self.top_p_min)
        if not isinstance(self.top_p_reset_ids, list) or len(
                self.top_p_reset_ids) > MAX_TOP_P_RESET_IDS:
            raise _err("top_p_reset_ids", f"a token id or a list of at most "
                       f"{MAX_TOP_P_RESET_IDS}", self.top_p_reset_ids)
        for t in self.top_p_reset_ids:
            token_id("top_p_reset_ids", t)

    def _validate_beam_search(self, number, flag) -> None:
        flag("use_beam_search")
        flag("early_stopping")
        flag("min_k")
        flag("p_less")
        if self.adaptive_p_target >= 0.0 and self.mirostat_mode:
            raise _err("adaptive_p_target", "negative (off) with mirostat_mode: both choose "
                       "the final distribution", self.adaptive_p_target)
        if not self.use_beam_search:
            if self.length_penalty != 1.0:
                raise _err("length_penalty", "1.0 (neutral) without use_beam_search: it only "
                           "applies to beam search", self.length_penalty)
            if self.early_stopping:
                raise _err("early_stopping", "false without use_beam_search: it only applies "
                           "to beam search", self.early_stopping)
            return
        width = self.best_of or self.n
        if width > MAX_BEAMS:
            raise _err("n", f"at most {MAX_BEAMS} beams with use_beam_search", width)
        if self.temperature not in (0.0, 1.0):
            raise _err("temperature", "0 or 1 with use_beam_search (beams are scored by the "
                       "model's own log-probabilities)", self.temperature)
        defaults = SamplingParams()
        for f in dataclasses.fields(self):
            if f.name in BEAM_SEARCH_FIELDS or (   # an explicit speculative null opts out
                    f.name == "speculative" and self.speculative == {"method": "none"}):
                continue
            if getattr(self, f.name) != getattr(defaults, f.name):
                raise _err(f.name, "left at its default with use_beam_search (beam search "
                           "scores the model's log-probabilities; no sampler stage applies)",
                           getattr(self, f.name))

    def _validate_guided(self, token_id) -> None:
        set_ = [f for f in GUIDED_FIELDS if getattr(self, f) not in (None, False)]
        if len(set_) > 1:
            raise _err(set_[1], f"not combined with {set_[0]} (one guided_* field at most)",
                       getattr(self, set_[1]))
        if self.guided_json is not None and not isinstance(self.guided_json, dict):
            raise _err("guided_json", "a JSON schema (an object)", self.guided_json)
        if not isinstance(self.guided_json_object, bool):
            raise _err("guided_json_object", "a boolean", self.guided_json_object)
        for name in ("guided_regex", "guided_grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise _err(name, "a non-empty string", value)
        if self.guided_choice is not None and (
                not isinstance(self.guided_choice, list) or not self.guided_choice
                or not all(isinstance(c, str) and c for c in self.guided_choice)):
            raise _err("guided_choice", "a non-empty list of non-empty strings",
                       self.guided_choice)
        if not isinstance(self.thinking_end_ids, list):
            raise _err("thinking_end_ids", "a list of token ids", self.thinking_end_ids)
        for t in self.thinking_end_ids:
            token_id("thinking_end_ids", t)
        if self.max_thinking_tokens is not None:
            if not self.thinking_end_ids:
                raise _err("max_thinking_tokens", "given with thinking_end_ids",
                           self.max_thinking_tokens)
            if (isinstance(self.max_thinking_tokens, bool)
                    or not isinstance(self.max_thinking_tokens, int)
                    or self.max_thinking_tokens < 0):
                raise _err("max_thinking_tokens", "an integer >= 0", self.max_thinking_tokens)
