"""In-process generation for notebooks and scripts: no servers, real batching.

`LocalModel` loads a model once and runs a list of prompts through the same
`DeviceEngine` (and so the same fused jitted step and sampler) that the batch server
uses: prompts fill the slots, finished sequences free theirs for the next prompt. One
thread, no queue, no network: what a researcher comparing samplers needs.

    lm = LocalModel("default")
    outs = lm.generate(["Once upon a time"] * 4, SamplingParams(temperature=0.8, min_p=0.1,
                                                                 max_tokens=40), seeds=[0, 1, 2, 3])
    outs[0].text, outs[0].logprobs, outs[0].entropies
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import numpy as np

from sampling.params import SamplingParams


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    finish_reason: str | None = None   # "stop" | "length"
    seed: int = 0
    text: str = ""
    raw_logprobs: list[float] = field(default_factory=list)   # the model's, always
    variant: int | None = None          # generate_variants: which variant
    metrics: dict | None = None         # generate_variants: sampling/variants.py metrics
    # logprobs_mode "unconstrained" / "all" (docs/research.md), one per token
    constrained_logprobs: list[float] = field(default_factory=list)
    unconstrained_logprobs: list[float] = field(default_factory=list)
    removed_mass: list[float] = field(default_factory=list)


class LocalModel:
    def __init__(self, model: str = "default", *, max_slots: int = 8, max_len: int | None = None,
                 dtype: str | None = None, steering: bool = False,
                 steering_vectors: str | dict | None = None, quantize: str | None = None):
        from checkpoints.loader import load_model
        from serving.engine.device import DeviceEngine

        self.config, self.params, self.model_dir = load_model(model, dtype=dtype,
                                                              quantize=quantize)
        try:
            from checkpoints.tokenizer import load_tokenizer
            self.tokenizer = load_tokenizer(self.model_dir)
        except (ImportError, ValueError, OSError):
            self.tokenizer = None
        max_len = max_len or min(self.config.max_position_embeddings, 1024)
        self.stop_ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None:
            self.stop_ids |= set(self.tokenizer.stop_ids)
        self._grammar = None
        # activation steering (model/steering.py): named vectors from an .npz or a dict
        if isinstance(steering_vectors, str):
            from model.steering import load_vectors
            steering_vectors = load_vectors(steering_vectors)
        self.steering_vectors = dict(steering_vectors or {})
        steering = steering or bool(self.steering_vectors)
        self.engine = DeviceEngine(self.config, self.params, max_slots=max_slots,
                                   max_len=max_len, eos_ids=tuple(sorted(self.stop_ids)),
                                   token_limit=self.tokenizer.vocab_size
                                   if self.tokenizer else None, steering=steering)

    # -- text helpers ---------------------------------------------------------------------

    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render messages with the model's chat template (sandboxed Jinja)."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ValueError("this model has no chat template")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(template).render(messages=messages,
                                                add_generation_prompt=add_generation_prompt,
                                                **kwargs)

    def score(self, prompt, continuation) -> float:
        """Log-likelihood of `continuation` after `prompt` under the model."""
        from model.scoring import continuation_logprob

        return continuation_logprob(self.config, self.params, self.encode(prompt),
                                    self.encode(continuation) if not isinstance(continuation, list)
                                    else continuation)

    # -- generation -----------------------------------------------------------------------

    def _steering(self, steering, count: int) -> list:
        """Per-prompt [layers, hidden] arrays (None: no steering) from request entries."""
        from model.steering import steering_array

        if steering is None:
            return [None] * count
        if not self.engine.steering:
            raise ValueError("steering: build LocalModel(steering=True) to steer")
        if not isinstance(steering, list):
            raise ValueError("steering: expected a list")
        if not steering or not all(s is None or isinstance(s, list) for s in steering):
            steering = [steering] * count           # one spec for every prompt
        if len(steering) != count:
            raise ValueError("steering: one list of entries per prompt (or one for all)")
        return [steering_array(s, self.config.num_layers, self.config.hidden_size,
                               self.steering_vectors) for s in steering]

    def _constraint(self, params: SamplingParams):
        """The guided_* constraint of one request (sampling/grammar.py), or None."""
        from sampling.grammar import GUIDED_FIELDS, GrammarCompiler

        if not any(getattr(params, f, None) for f in GUIDED_FIELDS):
            return None
        if self.tokenizer is None:
            raise ValueError("guided decoding needs a tokenizer")
        if self._grammar is None:
            self._grammar = GrammarCompiler(self.tokenizer, self.config.vocab_size,
                                            sorted(self.stop_ids))
        return self._grammar.constraint(self._grammar.check(params), params)

    def beam_search(self, prompt, params: SamplingParams) -> list:
        """Beam search (`use_beam_search=True`; serving/beam_search.py): the n best beams,
        best first, each a `Beam` with token_ids, text, score, cumulative_logprob and
        finish_reason. Equal to transformers' generate(num_beams=...) on the same weights."""
        from serving.beam_search import BeamSearcher
        params.validate(self.config.vocab_size, self.engine.max_len)
        if not params.use_beam_search:
            raise ValueError("use_beam_search: beam_search needs use_beam_search=True")
        if getattr(self, "_beams", None) is None:
            self._beams = BeamSearcher(self.config, self.params, self.engine.max_len,
                                       sorted(self.stop_ids))
        beams = self._beams.run(self.encode(prompt), params)
        if self.tokenizer is not None:
            for b in beams:
                b.text = self.tokenizer.decode(b.token_ids)
        return beams

    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams],
                 seeds: list[int] | None = None,
                 sample_indices: list[int] | None = None,
                 steering: list | None = None) -> list[Completion]:
        """Generate for every prompt (text or token ids); params may differ per prompt.

        `sample_indices` (default all 0) feed each row's PRNG key with its seed: the same
        (seed, index) pair draws the same uniforms in any slot and beside any other rows.
        `steering`: one list of {layer, vector | name, scale} (or None) per prompt, or one
        list for all; needs LocalModel(steering=True) (model/steering.py)."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("params: one SamplingParams per prompt (or one for all)")
        for p in params:
            p.validate(self.config.vocab_size)
            if p.speculative is not None and p.speculative.get("method", "ngram") != "none":
                raise ValueError("speculative: LocalModel.generate runs the batched path; "
                                 "use generate_speculative(prompts, params, method, "
                                 "num_tokens)")
        seeds = list(seeds) if seeds is not None else [
            p.seed if p.seed is not None else secrets.randbits(63) for p in params]
        # entropy is free to ask for here, and the analysis helpers use it
        params = [SamplingParams(**{**p.to_dict(), "return_entropy": True}) for p in params]
        results = [Completion(self.encode(pr), seed=s) for pr, s in zip(prompts, seeds)]
        constraints = [self._constraint(p) for p in params]
        indices = list(sample_indices) if sample_indices is not None else [0] * len(prompts)
        steer = self._steering(steering, len(prompts))
        if len(indices) != len(prompts):
            raise ValueError("sample_indices: one per prompt")
        from sampling.grammar import all_ones
        for r in results:
            if len(r.prompt_ids) + 1 > self.engine.max_len:
                raise ValueError(f"prompt of {len(r.prompt_ids)} tokens exceeds max_len "
                                 f"{self.engine.max_len}")
        engine = self.engine
        pending = list(range(len(prompts)))[::-1]
        running: dict[int, int] = {}  # slot -> request index
        free = list(range(engine.max_slots))[::-1]

        def record(i, out, row):
            r, p = results[i], params[i]
            tok = int(out.tokens[row])
            r.token_ids.append(tok)
            r.logprobs.append(float(out.logprobs[row]))
            r.entropies.append(float(out.entropies[row]))
            r.raw_logprobs.append(float(out.raw_logprobs[row]))
            if p.logprobs_mode in ("unconstrained", "all"):
                r.constrained_logprobs.append(float(out.processed_logprobs[row]))
                r.unconstrained_logprobs.append(float(out.unconstrained_logprobs[row]))
                r.removed_mass.append(float(out.removed_mass[row]))
            if constraints[i] is not None:
                constraints[i].consume(tok)
                if constraints[i].finished:
                    r.finish_reason = "stop"
                    return True
            limit = min(p.max_tokens or engine.max_len, engine.max_len - len(r.prompt_ids))
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else self.stop_ids)
            if tok in stops and len(r.token_ids) > p.min_tokens:
                r.finish_reason = "stop"
            elif p.stop and self.tokenizer is not None and any(
                    s in self.tokenizer.decode(r.token_ids) for s in p.stop):
                r.finish_reason = "stop"
            elif len(r.token_ids) >= limit:
                r.finish_reason = "length"
            return r.finish_reason is not None

        while pending or running:
            while pending and free:
                i, slot = pending.pop(), free.pop()
                ids = np.asarray(results[i].prompt_ids, np.int32)
                if engine.steering:
                    engine.set_steering(slot, steer[i])
                start, chunk = 0, engine.prefill_buckets[-1]
                while len(ids) - start > chunk and not params[i].deterministic:  # insert grids it
                    engine.prefill_chunk(slot, ids[start:start + chunk], start)
                    start += chunk
                mask = None
                if constraints[i] is not None and constraints[i].active:
                    mask = all_ones(1, self.config.vocab_size)[0]
                    constraints[i].fill(mask)
                out = engine.insert(slot, ids, start, params[i], seeds[i], mask=mask,
                                    sample_index=indices[i]).result()
                if out.errors[0]:
                    raise ValueError(f"prompt {i}: every token was masked by its sampling params")
                if record(i, out, 0):
                    engine.release(slot)
                    free.append(slot)
                else:
                    running[slot] = i
            if not running:
                continue
            mask = None
            if any(constraints[i] is not None for i in running.values()):
                mask = all_ones(engine.max_slots, self.config.vocab_size)
                for slot, i in running.items():
                    if constraints[i] is not None and constraints[i].active:
                        constraints[i].fill(mask[slot])
            out = engine.step(mask).result()
            for slot, i in list(running.items()):
                if out.errors[slot]:
                    raise ValueError(f"prompt {i}: every token was masked by its sampling params")
                if record(i, out, slot):
                    engine.release(slot)
                    del running[slot]
                    free.append(slot)
        for r, p in zip(results, params):
            if self.tokenizer is not None:
                r.text = self.tokenizer.decode(r.token_ids)
                for s in p.stop:
                    cut = r.text.find(s)
                    if cut >= 0:
                        r.text = r.text[:cut + len(s)] if p.include_stop_str_in_output else r.text[:cut]
        return results

    def generate_speculative(self, prompts: list, params: SamplingParams | list[SamplingParams],
                             method: str = "ngram", num_tokens: int = 4, draft_model=None,
                             seeds: list[int] | None = None) -> list[Completion]:
        """Exact speculative decoding (serving/speculative.py, docs/speed.md), one prompt at
        a time (batch 1, where it pays): the distribution of `generate` (greedy: the same
        tokens) with fewer target forwards. `draft_model` (a model reference, or a
        LocalModel sharing this tokenizer) for method "draft". Each Completion's
        metrics["speculative"] holds the draft and acceptance counts."""
        from serving.speculative import SpeculativeDecoder, load_draft, parse_options

        method, num_tokens = parse_options({"method": method, "num_tokens": num_tokens})
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("params: one SamplingParams per prompt (or one for all)")
        seeds = list(seeds) if seeds is not None else [
            p.seed if p.seed is not None else secrets.randbits(63) for p in params]
        cache = self.__dict__.setdefault("_speculative", {})
        key = (method, num_tokens, id(draft_model) if isinstance(draft_model, LocalModel)
               else draft_model)
        if key not in cache:
            draft = (None, None)
            if isinstance(draft_model, LocalModel):
                draft = (draft_model.config, draft_model.params)
            elif draft_model is not None:
                draft = load_draft(draft_model)
            cache[key] = SpeculativeDecoder(
                self.config, self.params, method=method, num_tokens=num_tokens,
                max_len=self.engine.max_len, draft_config=draft[0], draft_params=draft[1],
                token_limit=self.tokenizer.vocab_size if self.tokenizer else None)
        decoder = cache[key]
        results = []
        for prompt, p, seed in zip(prompts, params, seeds):
            stop_check = None
            if p.stop and self.tokenizer is not None:
                stop_check = lambda toks, p=p: any(s in self.tokenizer.decode(toks) for s in p.stop)
            r = decoder.generate(self.encode(prompt), p, seed, self.stop_ids, stop_check)
            c = Completion(self.encode(prompt), token_ids=r.token_ids, logprobs=r.logprobs,
                           raw_logprobs=list(r.logprobs), finish_reason=r.finish_reason,
                           seed=seed, metrics={"speculative": r.usage()})
            if self.tokenizer is not None:
                c.text = self.tokenizer.decode(c.token_ids)
                for s in p.stop:
                    cut = c.text.find(s)
                    if cut >= 0:
                        c.text = c.text[:cut + len(s)] if p.include_stop_str_in_output \
                            else c.text[:cut]
            results.append(c)
        return results

    def generate_variants(self, prompt, params: SamplingParams, variants: list[dict],
                          seed: int | None = None) -> list[list[Completion]]:
        """Paired sampling variants (sampling/variants.py): `params` with each variant's
        overrides, `params.n` samples each, decoded side by side in one batch with common
        random numbers (sample j of every variant uses `seed` and sample index j).

        Returns one list per variant of `n` Completions, each with `.variant` and
        `.metrics` (length, mean_entropy, distinct_1/2, perplexity under the raw model)."""
        from sampling import variants as pv

        seed = params.seed if seed is None else seed
        seed = secrets.randbits(63) if seed is None else seed
        base = {k: v for k, v in params.to_dict().items() if k not in ("n", "seed")}
        configs = pv.expand(base, variants, self.config.vocab_size)
        n = params.n
        flat = [c for c in configs for _ in range(n)]
        outs = self.generate([prompt] * len(flat), flat, seeds=[seed] * len(flat),
                             sample_indices=[j for _ in configs for j in range(n)])
        result = []
        for i in range(len(configs)):
            group = outs[i * n:(i + 1) * n]
            for c in group:
                c.variant = i
                c.metrics = pv.metrics(c.token_ids, c.raw_logprobs, c.entropies)
            result.append(group)
        return result
