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


class LocalModel:
    def __init__(self, model: str = "default", *, max_slots: int = 8, max_len: int | None = None,
                 dtype: str | None = None):
        from checkpoints.loader import load_model
        from serving.engine.device import DeviceEngine

        self.config, self.params, self.model_dir = load_model(model, dtype=dtype)
        try:
            from checkpoints.tokenizer import load_tokenizer
            self.tokenizer = load_tokenizer(self.model_dir)
        except (ImportError, ValueError, OSError):
            self.tokenizer = None
        max_len = max_len or min(self.config.max_position_embeddings, 1024)
        self.stop_ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None:
            self.stop_ids |= set(self.tokenizer.stop_ids)
        self.engine = DeviceEngine(self.config, self.params, max_slots=max_slots,
                                   max_len=max_len, eos_ids=tuple(sorted(self.stop_ids)))

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

    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams],
                 seeds: list[int] | None = None) -> list[Completion]:
        """Generate for every prompt (text or token ids); params may differ per prompt."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("params: one SamplingParams per prompt (or one for all)")
        for p in params:
            p.validate(self.config.vocab_size)
        seeds = list(seeds) if seeds is not None else [
            p.seed if p.seed is not None else secrets.randbits(63) for p in params]
        # entropy is free to ask for here, and the analysis helpers use it
        params = [SamplingParams(**{**p.to_dict(), "return_entropy": True}) for p in params]
        results = [Completion(self.encode(pr), seed=s) for pr, s in zip(prompts, seeds)]
        for r in results:
            if len(r.prompt_ids) + 1 > self.engine.max_len:
                raise ValueError(f"prompt of {len(r.prompt_ids)} tokens exceeds max_len "
                                 f"{self.engine.max_len}")
        engine = self.engine
        pending = list(range(len(prompts)))[::-1]
        running: dict[int, int] = {}  # slot -> request index
        free = list(range(engine.max_slots))[::-1]

        def record(i, tok, lp, ent):
            r, p = results[i], params[i]
            r.token_ids.append(tok)
            r.logprobs.append(lp)
            r.entropies.append(ent)
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
                start, chunk = 0, engine.prefill_buckets[-1]
                while len(ids) - start > chunk:
                    engine.prefill_chunk(slot, ids[start:start + chunk], start)
                    start += chunk
                out = engine.insert(slot, ids, start, params[i], seeds[i]).result()
                if out.errors[0]:
                    raise ValueError(f"prompt {i}: every token was masked by its sampling params")
                if record(i, int(out.tokens[0]), float(out.logprobs[0]), float(out.entropies[0])):
                    engine.release(slot)
                    free.append(slot)
                else:
                    running[slot] = i
            if not running:
                continue
            out = engine.step().result()
            for slot, i in list(running.items()):
                if out.errors[slot]:
                    raise ValueError(f"prompt {i}: every token was masked by its sampling params")
                if record(i, int(out.tokens[slot]), float(out.logprobs[slot]),
                          float(out.entropies[slot])):
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
