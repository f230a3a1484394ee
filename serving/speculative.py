"""Speculative decoding for one sequence: propose K tokens, verify them in one forward.

Decode at batch 1 is memory bound: a forward over K+1 positions reads the weights once,
like a forward over one, so every accepted draft token is nearly free. Each iteration
feeds the target [last, d_1..d_K] at positions pos..pos+K of its KV cache, gets K+1
next-token distributions and keeps what `sampling/speculative.py`'s rule accepts, plus
one more token (the correction or the bonus). The output distribution is the target's,
exactly; greedy output is the plain greedy output.

- Proposers: "ngram" (prompt lookup over prompt + output, on the host) and "draft" (a
  smaller model with the same vocabulary, K steps inside the same jitted program).
- Adaptive K ("ngram"): K is the cap; each iteration verifies a K from the power-of-two
  ladder 1, 2, 4, ... (and the cap): one bucket up after all drafts were kept, down to what
  the last iteration kept (at most one bucket) after a rejection, and never more than the
  match has tokens. On a CPU a forward over 2 positions already costs more than a decode
  step (a matrix product instead of a matrix-vector one) and 9 cost little more than 2
  (docs/speed.md), so long drafts pay while the text copies and a miss costs ~a step. The choice depends
  on past tokens only, so the rule stays exact; one program per (K bucket, attention
  bucket).
- The KV cache needs no rollback: the decoder writes K/V at each token's position and
  attention masks keys past the query's position, so the entries of rejected drafts are
  never read and the next iteration overwrites them. What must never happen is a write
  past the cache (`forward` drops it silently and the token would not see itself):
  iterations that would reach past `max_len` verify no drafts, and a position past the
  cache is an error.
- Sampling: the stateless stages of the sampler (masks, bias, temperature and the
  filters: `process_logits`, the same code the engine runs); parameters whose effect
  depends on the tokens so far (penalties, DRY, mirostat, min_tokens, grammars...) are
  rejected with a ValueError naming them.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig
from model.decoder import forward, init_cache
from sampling import speculative as spec
from sampling.params import SamplingParams
from sampling.rows import make_rows
from sampling.sampler import first_max, process_logits
from sampling.state import init_state

METHODS = ("ngram", "draft")

# parameters the verify step honours exactly: stateless stages (masks, bias, temperature,
# filters) and host-side stopping; every other parameter (penalties, DRY, mirostat, XTC,
# min_tokens, grammars, custom orders, any sampler added later) must keep its default
_SUPPORTED = {
    "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
    "top_n_sigma", "dynatemp_range", "dynatemp_exponent", "logit_bias", "allowed_token_ids",
    "bad_words_ids", "max_tokens", "stop", "stop_token_ids", "include_stop_str_in_output",
    "ignore_eos", "seed", "logprobs", "logprobs_mode", "return_entropy", "deterministic",
    # settings of stages that are off while their switch keeps its default
    "xtc_threshold", "mirostat_tau", "mirostat_eta", "top_p_min", "top_p_reset_ids",
    "length_penalty", "early_stopping", "repetition_penalty_scope",
    "presence_frequency_scope", "penalty_window", "dry_base", "dry_allowed_length",
    "dry_penalty_last_n", "dry_sequence_breakers", "dry_sequence_breaker_ids",
    "speculative",     # the request's own choice of method (serving/engine/spec_jobs.py)
}


def check_supported(sampling: SamplingParams) -> None:
    """ValueError naming the first parameter speculative decoding cannot honour exactly."""
    default = SamplingParams()
    for f in dataclasses.fields(SamplingParams):
        if f.name not in _SUPPORTED and getattr(sampling, f.name) != getattr(default, f.name):
            raise ValueError(f"{f.name}: not supported with speculative decoding (it depends "
                             "on the tokens so far, or is not computed by the verify step); "
                             "drop it or turn speculation off")
    if any(len(w) > 1 for w in sampling.bad_words_ids):
        raise ValueError("bad_words_ids: multi-token sequences are not supported with "
                         "speculative decoding")
    if sampling.logprobs_mode != "raw":
        raise ValueError("logprobs_mode: only 'raw' is supported with speculative decoding")


def parse_options(value, vocab_size: int | None = None) -> tuple[str, int]:
    """(method, num_tokens) from a request's {"method": ..., "num_tokens": K}."""
    if not isinstance(value, dict):
        raise ValueError("speculative: expected an object {method, num_tokens}")
    unknown = sorted(set(value) - {"method", "num_tokens"})
    if unknown:
        raise ValueError(f"speculative: unknown field(s) {', '.join(unknown)}")
    method = value.get("method", "ngram")
    if method not in METHODS:
        raise ValueError(f"speculative.method: expected one of {', '.join(METHODS)}, got "
                         f"{method!r}")
    k = value.get("num_tokens", 4)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 16:
        raise ValueError(f"speculative.num_tokens: expected an integer in [1, 16], got {k!r}")
    return method, k


@dataclass
class SpeculativeResult:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)   # raw target logprob of each token
    finish_reason: str | None = None                        # "stop" | "length"
    proposed: int = 0        # draft tokens verified
    accepted: int = 0        # of those, kept
    verify_steps: int = 0    # target forwards after the prompt
    seconds: float = 0.0
    k_trace: list[int] = field(default_factory=list)     # drafts verified, each iteration
    # host seconds by phase: "draft" (proposing, building the inputs), "verify" (the
    # program: dispatch until its outputs are on the host), "emit" (stops, bookkeeping)
    timings: dict = field(default_factory=lambda: {"draft": 0.0, "verify": 0.0,
                                                   "emit": 0.0})

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def usage(self) -> dict:
        return {"draft_tokens": self.proposed, "tokens_accepted": self.accepted,
                "acceptance_rate": self.acceptance_rate, "verify_steps": self.verify_steps}


def _pow2_at_least(n: int, smallest: int) -> int:
    b = smallest
    while b < n:
        b *= 2
    return b


def k_ladder(cap: int) -> tuple[int, ...]:
    """The K buckets adaptive speculation moves between: powers of two below `cap`, and
    `cap` (each is one compiled verify program per attention bucket)."""
    return tuple(sorted({b for b in (1, 2, 4, 8, 16) if b < cap} | {cap}))


def next_k(ladder: tuple[int, ...], k: int, verified: int, accepted: int) -> int:
    """The next iteration's K: one bucket up when all `verified` drafts were kept, else the
    smallest bucket holding accepted + 1 tokens but at most one bucket below `k`."""
    i = ladder.index(k)
    if verified and accepted == verified:
        return ladder[min(i + 1, len(ladder) - 1)]
    if not verified:
        return k                         # nothing was tried: no evidence either way
    fit = next(b for b in ladder if b >= min(accepted + 1, ladder[-1]))
    return max(fit, ladder[max(i - 1, 0)])


class SpeculativeDecoder:
    """Owns a batch-1 KV cache for the target (and one for the draft model)."""

    def __init__(self, config: ModelConfig, params, *, method: str = "ngram",
                 num_tokens: int = 4, max_len: int = 1024, draft_config: ModelConfig | None = None,
                 draft_params=None, token_limit: int | None = None, ngram_max: int = 3,
                 ngram_min: int = 1, adaptive: bool | None = None):
        if method not in METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(METHODS)}, got "
                             f"{method!r}")
        if not 1 <= num_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be in [1, 16], got {num_tokens}")
        if not 2 <= max_len <= config.max_position_embeddings:
            raise ValueError(f"max_len must be in [2, {config.max_position_embeddings}], got "
                             f"{max_len}")
        if method == "draft":
            if draft_config is None or draft_params is None:
                raise ValueError("--draft-model is required for speculative method 'draft'")
            if draft_config.vocab_size != config.vocab_size:
                raise ValueError(f"--draft-model: its vocabulary ({draft_config.vocab_size} "
                                 f"ids) differs from the target's ({config.vocab_size}); the "
                                 "draft must share the tokenizer")
            if draft_config.max_position_embeddings < max_len:
                raise ValueError(f"--draft-model: its context "
                                 f"({draft_config.max_position_embeddings}) is shorter than "
                                 f"max_len {max_len}")
        self.config, self.params = config, params
        self.method, self.k = method, num_tokens
        # adaptive K: prompt lookup only (a draft model's K steps are inside its program)
        self.adaptive = method == "ngram" if adaptive is None else adaptive
        if self.adaptive and method != "ngram":
            raise ValueError("adaptive K is only available with speculative method 'ngram'")
        self.ladder = k_ladder(num_tokens) if self.adaptive else (num_tokens,)
        self.draft_config, self.draft_params = draft_config, draft_params
        self.max_len = max_len
        self.vocab_size = config.vocab_size
        self.token_limit = min(token_limit or config.vocab_size, config.vocab_size)
        self.ngram_max, self.ngram_min = ngram_max, ngram_min
        self.cache = init_cache(config, 1, max_len)
        self.draft_cache = init_cache(draft_config, 1, max_len) if method == "draft" else None
        self._state = init_state(num_tokens + 1, self.vocab_size, 1)   # stateless stages only
        self._state1 = init_state(1, self.vocab_size, 1)
        self._states = {b: jax.tree.map(lambda x, b=b: x[:b + 1], self._state)
                        for b in self.ladder}
        self._static = _Static(config, draft_config if method == "draft" else None, max_len,
                               self.token_limit, num_tokens)
        # `_verify` does not use K (its shapes carry it): one static for every decoder, so
        # decoders of different caps share the programs of the buckets they have in common
        self._static_verify = _Static(config, None, max_len, self.token_limit, 0)

    # -- host loop --------------------------------------------------------------------------

    def _attend(self, upto: int) -> int:
        """A power-of-two cache prefix (at least 128) covering positions [0, upto)."""
        return min(_pow2_at_least(upto, 128), self.max_len)

    def _prefill_into(self, config, params, cache, prompt):
        n = len(prompt)
        bucket = min(_pow2_at_least(n, 16), self.max_len)
        padded = np.zeros(bucket, np.int32)
        padded[:n] = prompt
        return _prefill(config, self.max_len, params, cache, padded, bucket, np.int32(n))

    def generate(self, prompt_ids, sampling: SamplingParams, seed: int = 0, stop_ids=(),
                 stop_check=None) -> SpeculativeResult:
        """One sequence to completion. `stop_check(token_ids) -> bool` (optional) ends it
        early (stop strings); `stop_ids` end it unless `ignore_eos`."""
        result = SpeculativeResult()
        for _ in self.steps(prompt_ids, sampling, seed, stop_ids, stop_check, result):
            pass
        return result

    def steps(self, prompt_ids, sampling: SamplingParams, seed: int = 0, stop_ids=(),
              stop_check=None, result: SpeculativeResult | None = None):
        """`generate` one target pass at a time: a generator that yields after the prompt
        (the first token) and after each verify, with the tokens so far in `result`
        (`result.finish_reason` set on the last). The batch server steps it once per
        scheduler iteration (serving/engine/spec_jobs.py)."""
        result = SpeculativeResult() if result is None else result
        sampling.validate(self.vocab_size)
        check_supported(sampling)
        prompt = np.asarray(prompt_ids, np.int32).reshape(-1)
        n = len(prompt)
        if n < 1:
            raise ValueError("the prompt is empty")
        if n >= self.max_len:
            raise ValueError(f"prompt of {n} tokens leaves no room in max_len {self.max_len}")
        limit = min(sampling.max_tokens or self.max_len, self.max_len - n)
        stops = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else set(stop_ids))
        greedy = bool(sampling.greedy)
        k = self.k
        rows = jax.tree.map(jnp.asarray, make_rows([sampling] * (k + 1), self.vocab_size,
                                                   [seed] * (k + 1), [0] * (k + 1)))
        rows1 = jax.tree.map(lambda x: x[:1], rows)
        rows_for = {b: jax.tree.map(lambda x, b=b: x[:b + 1], rows) for b in self.ladder}
        kk = _start_k(self.ladder)                     # the K adaptive speculation tries
        timings = result.timings
        t0 = time.perf_counter()
        self.cache, logits = self._prefill_into(self.config, self.params, self.cache, prompt)
        if self.method == "draft":
            self.draft_cache, _ = self._prefill_into(self.draft_config, self.draft_params,
                                                     self.draft_cache, prompt)
        token, lp = jax.device_get(_first(self.token_limit, logits, rows1, self._state1,
                                                  np.int32(n - 1), greedy))
        history = list(prompt) + [int(token)]

        def emit(tok: int, logprob: float) -> bool:
            result.token_ids.append(tok)
            result.logprobs.append(float(logprob))
            if tok in stops or (stop_check is not None and stop_check(result.token_ids)):
                result.finish_reason = "stop"
            elif len(result.token_ids) >= limit:
                result.finish_reason = "length"
            return result.finish_reason is not None

        done = emit(int(token), lp)
        result.seconds = time.perf_counter() - t0
        yield
        while not done:
            t_draft = time.perf_counter()
            pos = n + len(result.token_ids) - 1           # where `last` is written
            last = history[-1]
            if pos >= self.max_len:
                raise RuntimeError(f"position {pos} is past the KV cache ({self.max_len})")
            room = pos + k < self.max_len and limit - len(result.token_ids) >= 2
            attend = self._attend(pos + k + 1 if room else pos + 1)
            if self.method == "draft" and room:
                pair = np.asarray(history[-2:], np.int32)
                t_verify = time.perf_counter()
                (self.cache, self.draft_cache, *outs) = _draft_verify(
                    self._static, self.cache, self.draft_cache, self.params, self.draft_params,
                    pair, np.int32(pos), attend, rows, self._state, greedy)
                used = k
            else:
                drafts = (spec.propose_ngram(history, kk, self.ngram_max, self.ngram_min)
                          if self.method == "ngram" and room else np.zeros(0, np.int32))
                # the smallest bucket that holds the match (a short match verifies less)
                used = (next(b for b in self.ladder if b >= min(len(drafts), kk))
                        if len(drafts) else 0)
                tokens = np.full(used + 1, drafts[-1] if len(drafts) else last, np.int32)
                tokens[0] = last
                tokens[1:1 + len(drafts)] = drafts
                attend = self._attend(pos + used + 1)
                t_verify = time.perf_counter()
                self.cache, *outs = _verify(self._static_verify, self.cache, self.params,
                                            tokens,
                                            np.int32(pos),
                                            rows_for[used] if used else rows1,
                                            self._states[used] if used else self._state1,
                                            attend, greedy)
            accepted, out, lps = jax.device_get(outs)
            t_emit = time.perf_counter()
            accepted = int(accepted)
            result.verify_steps += 1
            result.proposed += used
            result.accepted += accepted
            result.k_trace.append(used)
            if self.adaptive:
                kk = next_k(self.ladder, kk, used, accepted) if used else kk
            for tok, logprob in zip(out[:accepted + 1], lps):
                history.append(int(tok))
                if emit(int(tok), logprob):
                    done = True
                    break
            t_end = time.perf_counter()
            timings["draft"] += t_verify - t_draft
            timings["verify"] += t_emit - t_verify
            timings["emit"] += t_end - t_emit
            result.seconds = t_end - t0
            yield


def _start_k(ladder: tuple[int, ...]) -> int:
    """Where adaptive K starts: the largest bucket up to 4 (a fixed K starts at itself)."""
    return max([b for b in ladder if b <= 4] or [ladder[0]])


# -- jitted programs (module level, so decoders of the same shapes share compilations) --------

@dataclass(frozen=True)
class _Static:
    """What the programs are specialised on (hashable: a static argument)."""
    config: ModelConfig
    draft_config: ModelConfig | None
    max_len: int
    token_limit: int
    k: int


@partial(jax.jit, donate_argnums=(3,), static_argnums=(0, 1, 5))
def _prefill(config, max_len, params, cache, tokens, attend, true_len):
    idx = jnp.arange(tokens.shape[0])
    positions = jnp.where(idx < true_len, idx, max_len)    # padding: dropped
    logits, cache = forward(config, params, cache, tokens[None], positions[None],
                            logits_index=(true_len - 1)[None], attend_len=attend)
    return cache, logits[0]


def _processed(token_limit: int, logits, rows, state):
    """The distribution each position samples from (the engine's stages 1-9)."""
    n = logits.shape[0]
    take = lambda x: x[:n]
    vocab = logits.shape[-1]
    mask = None
    if token_limit < vocab:
        mask = jnp.broadcast_to(jnp.arange(vocab) < token_limit, logits.shape)
    return process_logits(logits, jax.tree.map(take, rows), jax.tree.map(take, state),
                          mask=mask, custom_order=False)


def _key(rows, pos):
    """The request's key for the draws of the iteration whose last token sits at `pos`."""
    key = jax.random.fold_in(jax.random.key(0), rows.seed_hi[0])
    key = jax.random.fold_in(key, rows.seed_lo[0])
    return jax.random.fold_in(key, pos)


@partial(jax.jit, static_argnums=(0, 5))
def _first(token_limit, logits, rows, state, pos, greedy):
    """The first output token from the prompt's last logits, and its raw logprob (one-row
    `rows` and `state`: the program does not depend on K)."""
    x = _processed(token_limit, logits[None], rows, state)
    if greedy:
        token = first_max(x)[0]
    else:
        token = jax.random.categorical(jax.random.fold_in(_key(rows, pos), 0),
                                       x[0]).astype(jnp.int32)
    return token, jax.nn.log_softmax(logits)[token]


def _accept(st, logits, drafts, rows, state, pos, greedy, q=None):
    x = _processed(st.token_limit, logits, rows, state)
    if greedy:
        n, token = spec.accept_greedy(x, drafts)
    else:
        n, token = spec.accept_sampled(jax.nn.softmax(x, axis=-1), drafts,
                                       jax.random.fold_in(_key(rows, pos), 0), q)
    out = spec.emitted(drafts, n, token)
    raw = jax.nn.log_softmax(logits, axis=-1)
    lp = jnp.take_along_axis(raw, jnp.maximum(out, 0)[:, None], axis=-1)[:, 0]
    return n, out, lp


@partial(jax.jit, donate_argnums=(1,), static_argnums=(0, 7, 8))
def _verify(st, cache, params, tokens, pos, rows, state, attend, greedy):
    """Target over [last, d_1..d_k] at pos..pos+k, then the acceptance rule."""
    positions = pos + jnp.arange(tokens.shape[0])
    logits, cache = forward(st.config, params, cache, tokens[None], positions[None],
                            attend_len=attend)
    n, out, lp = _accept(st, logits[0], tokens[1:], rows, state, pos, greedy)
    return cache, n, out, lp


@partial(jax.jit, donate_argnums=(1, 2), static_argnums=(0, 7, 10))
def _draft_verify(st, cache, draft_cache, params, draft_params, tokens, pos, attend, rows,
                  state, greedy):
    """The draft model proposes k tokens, the target verifies them: one program.

    tokens = [the token at pos-1, last]: the draft's cache may lack pos-1 (all drafts were
    accepted last time, and the draft never ran its own last proposal), so it rewrites that
    position (same token, same context, same K/V) and then writes pos."""
    dcfg, k = st.draft_config, st.k
    key = jax.random.fold_in(_key(rows, pos), 1)
    logits, draft_cache = forward(dcfg, draft_params, draft_cache, tokens[None],
                                  (pos + jnp.arange(-1, 1))[None], attend_len=attend)
    logits = logits[0, 1:]
    drafts, qs = [], []
    for i in range(k):
        x = _processed(st.token_limit, logits, rows, state)
        if greedy:
            d = first_max(x)[0]
            q = None
        else:
            q = jax.nn.softmax(x[0])
            d = jax.random.categorical(jax.random.fold_in(key, i), x[0]).astype(jnp.int32)
        drafts.append(d)
        qs.append(q)
        if i + 1 < k:
            logits, draft_cache = forward(dcfg, draft_params, draft_cache, d[None, None],
                                          (pos + 1 + i)[None, None], attend_len=attend)
            logits = logits[0]
    drafts = jnp.stack(drafts)
    target_in = jnp.concatenate([tokens[1:], drafts])
    positions = pos + jnp.arange(k + 1)
    logits, cache = forward(st.config, params, cache, target_in[None], positions[None],
                            attend_len=attend)
    n, out, lp = _accept(st, logits[0], drafts, rows, state, pos, greedy,
                         None if greedy else jnp.stack(qs))
    return cache, draft_cache, n, out, lp


def load_draft(ref: str, dtype: str | None = None):
    """(config, params) of a draft model reference (any `--model` form)."""
    from checkpoints.loader import load_model
    config, params, _ = load_model(ref, dtype=dtype)
    return config, params


def cache_len(config: ModelConfig, prompt_len: int, max_tokens: int, k: int) -> int:
    """A KV cache length with room for the prompt, the output and one verify's drafts."""
    need = prompt_len + max_tokens + k
    return min(config.max_position_embeddings, max(32, 1 << (need - 1).bit_length()))


def run_cli(args, config, params, tokenizer, prompt_ids, sampling, seed) -> int:
    """`flaxserve generate --speculative ngram|draft`: the same output format, plus the
    acceptance figures (in the JSON, and on stderr)."""
    import json
    import sys

    if args.logprobs is not None:
        raise ValueError("--logprobs is not supported with --speculative")
    k = args.num_speculative_tokens
    if not 1 <= k <= 16:
        raise ValueError(f"--num-speculative-tokens must be in [1, 16], got {k}")
    draft_config = draft_params = None
    if args.speculative == "draft":
        if not args.draft_model:
            raise ValueError("--speculative draft needs --draft-model")
        draft_config, draft_params = load_draft(args.draft_model, dtype=args.dtype)
    elif args.draft_model:
        raise ValueError("--draft-model is only used with --speculative draft")
    stop_ids = set(config.eos_token_ids) | set(tokenizer.stop_ids if tokenizer else ())
    decoder = SpeculativeDecoder(
        config, params, method=args.speculative, num_tokens=k,
        max_len=cache_len(config, len(prompt_ids), args.max_tokens, k),
        draft_config=draft_config, draft_params=draft_params,
        token_limit=tokenizer.vocab_size if tokenizer else None)
    result = decoder.generate(prompt_ids, sampling, seed, stop_ids)
    text = tokenizer.decode(result.token_ids) if tokenizer is not None else None
    if args.json:
        print(json.dumps({"token_ids": result.token_ids, "text": text, "seed": seed,
                          "finish_reason": result.finish_reason,
                          "speculative": {"method": args.speculative, "num_tokens": k,
                                          **result.usage()}}))
    else:
        print(text if text is not None else ",".join(map(str, result.token_ids)))
        print(f"[seed {seed}] [speculative {args.speculative}: {result.accepted}/"
              f"{result.proposed} drafts accepted ({100 * result.acceptance_rate:.0f}%), "
              f"{len(result.token_ids)} tokens in {result.verify_steps + 1} target passes]",
              file=sys.stderr)
    return 0

