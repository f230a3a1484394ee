"""The scheduler's admission checks: everything a request carries, validated before it queues.

`Scheduler.make_request` (any thread) turns prompt ids + sampling fields (+ variants,
steering) into an `EngineRequest`, or raises RequestError(INVALID_ARGUMENT) naming the
field: token ids in range, the prompt within max_model_len, n within the slots, a grammar
that compiles, a pool that can ever hold it, variants that keep the request's constraint,
steering vectors of the model's shape. Kept apart from the device loop (scheduler.py),
which never validates: what reaches it is well formed.
"""

from __future__ import annotations

import dataclasses
import secrets

from sampling.bad_words import resolve_bad_words
from sampling.params import SamplingParams
from serving.engine.requests import INVALID_ARGUMENT, EngineRequest, RequestError


class RequestChecks:
    """Mixed into Scheduler: reads its engine, tokenizer, kv, grammar, spec and limits."""

    def make_request(self, request_id: str, prompt_ids, sampling: dict | SamplingParams,
                     skip_special_tokens: bool = True,
                     truncate_prompt_tokens: int | None = None, variants=None,
                     steering=None) -> EngineRequest:
        """Validate everything a request carries; RequestError(INVALID_ARGUMENT) names the field."""
        try:
            params = (sampling if isinstance(sampling, SamplingParams)
                      else SamplingParams.from_dict(dict(sampling or {}), self.vocab_size,
                                                    self.max_len))
            params.validate(self.vocab_size, self.max_len)   # windows bounded by the context
            if params.bad_words:        # strings -> token sequences (gRPC, in process)
                if self.tokenizer is None:
                    raise ValueError("bad_words: this engine has no tokenizer; send "
                                     "bad_words_ids")
                params = resolve_bad_words(params, self.tokenizer.encode)
        except (ValueError, TypeError) as e:
            raise RequestError(INVALID_ARGUMENT, f"sampling: {e}") from None
        ids = [int(t) for t in prompt_ids]
        if truncate_prompt_tokens is not None:
            if truncate_prompt_tokens < 1:
                raise RequestError(INVALID_ARGUMENT, "truncate_prompt_tokens must be >= 1, got "
                                   f"{truncate_prompt_tokens}")
            ids = ids[-truncate_prompt_tokens:]
        if not ids:
            raise RequestError(INVALID_ARGUMENT, "prompt_ids must hold at least one token")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(INVALID_ARGUMENT, f"prompt_ids must be token ids in "
                               f"[0, {self.vocab_size}), got {bad[0]}")
        if len(ids) + 1 > self.max_len:
            raise RequestError(INVALID_ARGUMENT, f"prompt_ids: the prompt has {len(ids)} tokens; "
                               f"with at least 1 to generate it exceeds max_model_len "
                               f"{self.max_len} (use truncate_prompt_tokens to keep the last N)")
        if params.use_beam_search:       # its own loop and cache: serving/engine/beam_jobs.py
            if variants is not None or steering not in (None, []):
                raise RequestError(INVALID_ARGUMENT, "use_beam_search: not combined with "
                                   "variants or steering")
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            return EngineRequest(request_id=request_id, prompt_ids=ids, sampling=params,
                                 seed=seed, skip_special_tokens=skip_special_tokens)
        if self.kv is not None:
            total = (None if params.max_tokens is None
                     else min(len(ids) + params.max_tokens, self.max_len))
            why = self.kv.never_fits(len(ids), params.n, total)
            if why is not None:
                raise RequestError(INVALID_ARGUMENT, why)
        if params.n > self.engine.max_slots:
            raise RequestError(INVALID_ARGUMENT, f"n must be <= {self.engine.max_slots} (the "
                               f"engine's slots), got {params.n}")
        if params.best_of is not None and params.best_of != params.n:
            raise RequestError(INVALID_ARGUMENT, "best_of: only best_of == n is supported, got "
                               f"best_of={params.best_of}, n={params.n}")
        if params.top_logprobs > self.engine.num_top_logprobs:
            raise RequestError(INVALID_ARGUMENT, f"top_logprobs must be <= "
                               f"{self.engine.num_top_logprobs}, got {params.top_logprobs}")
        if params.stop and self.tokenizer is None:
            raise RequestError(INVALID_ARGUMENT, "stop: this engine has no tokenizer to match "
                               "stop strings (use stop_token_ids)")
        grammar = None
        if params.thinking_end_ids and self.grammar is None:
            raise RequestError(INVALID_ARGUMENT, "thinking_end_ids: this engine has no "
                               "tokenizer")
        if params.guided is not None:
            if self.grammar is None:
                raise RequestError(INVALID_ARGUMENT, f"{params.guided}: this engine has no "
                                   "tokenizer to constrain decoding with")
            try:
                grammar = self.grammar.check(params)
            except ValueError as e:
                raise RequestError(INVALID_ARGUMENT, str(e)) from None
        configs = self._variants(params, variants) if variants is not None else None
        samples = params.n * (len(configs) if configs else 1)
        if configs and samples > self.engine.max_slots:
            raise RequestError(INVALID_ARGUMENT, f"variants: {len(configs)} variants x n="
                               f"{params.n} samples must be <= {self.engine.max_slots} (the "
                               f"engine's slots)")
        if configs and self.kv is not None:
            longest = max((c.max_tokens for c in configs), default=None,
                          key=lambda m: float("inf") if m is None else m)
            why = self.kv.never_fits(len(ids), samples, None if longest is None
                                     else min(len(ids) + longest, self.max_len))
            if why is not None:
                raise RequestError(INVALID_ARGUMENT, why)
        steer, key = self._steering(steering, params)
        if params.deterministic:   # its KV comes from the grid prefill (DeviceEngine.
            key = b"deterministic" + key   # _grid_prefill): shared with its own kind only
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        speculative = self.spec.choose(params, configs, steer)   # serving/engine/spec_jobs.py
        return EngineRequest(request_id=request_id, prompt_ids=ids, sampling=params, seed=seed,
                             skip_special_tokens=skip_special_tokens, grammar=grammar,
                             variants=configs, steering=steer, steering_key=key,
                             speculative=speculative)

    def _variants(self, params: SamplingParams, variants) -> list[SamplingParams]:
        """Paired variants (sampling/variants.py): the request's params with each variant's
        overrides; a variant may not change the request's constraint."""
        from sampling import variants as pv
        from sampling.grammar import GUIDED_FIELDS
        for i, v in enumerate(variants if isinstance(variants, list) else []):
            bad = [k for k in (v if isinstance(v, dict) else ())
                   if k in GUIDED_FIELDS or k == "thinking_end_ids"]
            if bad:
                raise RequestError(INVALID_ARGUMENT, f"variants[{i}].{bad[0]}: set "
                                   "constraints on the request, not per variant")
        base = {k: v for k, v in params.to_dict().items() if k not in ("n", "seed")}
        try:
            configs = pv.expand(base, variants, self.vocab_size)
            out = []
            for i, c in enumerate(configs):
                c.validate(self.vocab_size, self.max_len)
                if c.bad_words and self.tokenizer is not None:
                    c = resolve_bad_words(c, self.tokenizer.encode)
                elif c.bad_words:
                    raise ValueError(f"variants[{i}].bad_words: this engine has no tokenizer")
                if c.stop and self.tokenizer is None:
                    raise ValueError(f"variants[{i}].stop: this engine has no tokenizer")
                out.append(dataclasses.replace(c, return_entropy=True))
        except (ValueError, TypeError) as e:
            raise RequestError(INVALID_ARGUMENT, str(e)) from None
        return out

    def _steering(self, spec, params: SamplingParams):
        """A request's steering entries -> ([layers, hidden] array or None, its digest)."""
        if spec is None or spec == []:
            return None, b""
        if not getattr(self.engine, "steering", False):
            raise RequestError(INVALID_ARGUMENT, "steering: this engine was started without "
                               "steering (start it with --steering-vectors FILE.npz)")
        if params.prompt_logprobs is not None:
            raise RequestError(INVALID_ARGUMENT, "prompt_logprobs: not available with "
                               "steering (the scoring pass runs the unsteered model)")
        from model.steering import steering_array
        cfg = self.engine.config
        try:
            arr = steering_array(spec, cfg.num_layers, cfg.hidden_size, self.steering_vectors)
        except (ValueError, TypeError) as e:
            raise RequestError(INVALID_ARGUMENT, str(e)) from None
        if arr is None:
            return None, b""
        import hashlib
        return arr, hashlib.blake2b(arr.tobytes(), digest_size=16).digest()
