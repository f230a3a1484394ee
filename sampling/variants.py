"""Paired sampling variants: K sampling configurations of one prompt, compared fairly.

A request names a base configuration and `variants: [{...field overrides...}, ...]`; every
variant's samples decode side by side in one batch with common random numbers: variant i's
sample j uses the request's seed and sample index j, so its PRNG key at step t is the same
in every variant (sampling/sampler.py `row_keys` never looks at the row's position). Two
identical variants then give identical samples, and a variant's output equals the same
configuration sent alone with that seed: differences between variants are the sampler's,
not the noise's.

This module is pure: expanding variants into SamplingParams and the per-sample metrics
(length, mean entropy, distinct-n, perplexity under the raw model).
"""

from __future__ import annotations

import dataclasses
import math
import re

from sampling.params import SamplingParams

_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}

MAX_VARIANTS = 16
# fields a variant may not change: they are the request's, shared by every variant
FIXED_FIELDS = ("seed", "n", "best_of", "logprobs", "top_logprobs", "prompt_logprobs")


def expand(base: dict, variants, vocab_size: int) -> list[SamplingParams]:
    """One validated SamplingParams per variant: the base fields, then the variant's."""
    if not isinstance(variants, list) or not variants:
        raise ValueError("variants: expected a non-empty list of objects of sampling fields")
    if len(variants) > MAX_VARIANTS:
        raise ValueError(f"variants: at most {MAX_VARIANTS} variants, got {len(variants)}")
    out = []
    for i, v in enumerate(variants):
        if not isinstance(v, dict):
            raise ValueError(f"variants[{i}]: expected an object of sampling fields")
        fixed = [k for k in v if k in FIXED_FIELDS or k == "variants"]
        if fixed:
            raise ValueError(f"variants[{i}].{fixed[0]}: set it on the request, not per variant")
        try:
            p = SamplingParams.from_dict({**base, **v})
            p.validate(vocab_size)
        except (TypeError, ValueError) as e:
            raise ValueError(f"variants[{i}]{_field_of(str(e))}: {e}") from None
        out.append(p)
    return out


def _field_of(message: str) -> str:
    """".field" when a SamplingParams error names one (its messages start with it)."""
    if message.startswith("unknown sampling parameter"):
        name = message.split(":", 1)[-1].strip().split(",")[0]
        return f".{name}" if re.fullmatch(r"[A-Za-z_]\w*", name) else ""
    else:
        m = re.match(r"[A-Za-z_]\w*", message)
        name = m.group(0) if m else ""
    return f".{name}" if name in _FIELDS else ""


def distinct_n(tokens: list[int], n: int) -> float:
    """Distinct n-grams / n-grams of one sample (0 when it has fewer than n tokens)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def metrics(tokens: list[int], raw_logprobs: list[float], entropies: list[float]) -> dict:
    """A sample's length, mean entropy (nats), distinct-1/2 and perplexity under the raw
    model (exp of minus the mean raw logprob of its tokens)."""
    length = len(tokens)
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0
    return {"length": length,
            "mean_entropy": mean(entropies),
            "distinct_1": distinct_n(tokens, 1),
            "distinct_2": distinct_n(tokens, 2),
            "perplexity": math.exp(-mean(raw_logprobs)) if raw_logprobs else 1.0}
