"""Metrics for comparing sampler variants: diversity, repetition, entropy, likelihood.

Plain numpy over token-id lists, so the numbers in the notebooks are tested code rather
than notebook cells. Log-likelihoods come from the model (serving.local.LocalModel.score)
and are passed in.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np


def distinct_n(sequences: list[list[int]], n: int) -> float:
    """Distinct n-grams / total n-grams over all sequences (Li et al. 2016); 0 if none."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [tuple(seq[i:i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(sequence: list[int], n: int = 1) -> float:
    """Fraction of n-grams in a sequence that already appeared earlier in it."""
    grams = [tuple(sequence[i:i + n]) for i in range(len(sequence) - n + 1)]
    if not grams:
        return 0.0
    seen, repeats = set(), 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


def mean_entropy(entropies: list[list[float]]) -> float:
    """Mean per-token entropy (nats) of the sampled distributions."""
    flat = [e for seq in entropies for e in seq]
    return float(np.mean(flat)) if flat else 0.0


@dataclass
class VariantReport:
    name: str
    distinct_1: float
    distinct_2: float
    repetition: float
    entropy: float
    log_likelihood: float       # mean per-token log-likelihood under the model
    mean_length: float

    def row(self) -> dict:
        return dict(self.__dict__)


def report(name: str, sequences: list[list[int]], entropies: list[list[float]],
           log_likelihoods: list[float]) -> VariantReport:
    """All metrics for one variant; log_likelihoods are totals per sequence."""
    tokens = sum(len(s) for s in sequences)
    return VariantReport(
        name=name,
        distinct_1=distinct_n(sequences, 1),
        distinct_2=distinct_n(sequences, 2),
        repetition=float(np.mean([repetition_rate(s, 1) for s in sequences])) if sequences else 0.0,
        entropy=mean_entropy(entropies),
        log_likelihood=float(np.sum(log_likelihoods) / tokens) if tokens else 0.0,
        mean_length=tokens / len(sequences) if sequences else 0.0,
    )


def most_common_ngrams(sequences: list[list[int]], n: int = 2, k: int = 5):
    grams = Counter(tuple(s[i:i + n]) for s in sequences for i in range(len(s) - n + 1))
    return grams.most_common(k)
