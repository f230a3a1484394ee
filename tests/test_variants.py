"""Paired sampling variants (sampling/variants.py) in process: identical variants give
identical samples, a variant equals its configuration sent alone with the same seed (in a
different slot, beside other rows), metrics against a direct computation, bad variants
name the field."""

import math

import numpy as np
import pytest

from sampling import variants as pv
from sampling.params import SamplingParams


@pytest.fixture(scope="module")
def lm():
    from serving.local import LocalModel
    return LocalModel("default", max_slots=8, max_len=128)


def test_identical_variants_identical_and_equal_to_alone(lm):
    ids = lm.encode("Once upon a time")
    base = SamplingParams(temperature=0.9, max_tokens=16, n=2, ignore_eos=True)
    variants = [{"top_p": 0.9}, {"min_p": 0.1}, {"top_p": 0.9}]
    out = lm.generate_variants(ids, base, variants, seed=11)
    assert [len(g) for g in out] == [2, 2, 2]
    assert [c.variant for g in out for c in g] == [0, 0, 1, 1, 2, 2]
    for a, b in zip(out[0], out[2]):
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
    assert out[0][0].token_ids != out[0][1].token_ids       # two samples, two streams
    # variant 1, sample 1, alone (slot 0, batch of one) with the same seed and index
    alone = lm.generate([ids], SamplingParams(temperature=0.9, max_tokens=16, min_p=0.1,
                                              ignore_eos=True), seeds=[11], sample_indices=[1])
    assert alone[0].token_ids == out[1][1].token_ids
    np.testing.assert_allclose(alone[0].logprobs, out[1][1].logprobs, atol=1e-5)


def test_metrics(lm):
    ids = lm.encode("The weather")
    out = lm.generate_variants(ids, SamplingParams(temperature=1.0, max_tokens=12,
                                                   ignore_eos=True),
                               [{"temperature": 0.3}, {"temperature": 1.5}], seed=2)
    for g in out:
        c = g[0]
        m = c.metrics
        assert m["length"] == len(c.token_ids) == 12
        assert math.isclose(m["perplexity"], math.exp(-np.mean(c.raw_logprobs)), rel_tol=1e-9)
        assert math.isclose(m["mean_entropy"], float(np.mean(c.entropies)), rel_tol=1e-9)
        assert m["distinct_1"] == len(set(c.token_ids)) / 12
    # hotter sampling: a flatter distribution sampled from
    assert out[1][0].metrics["mean_entropy"] > out[0][0].metrics["mean_entropy"]


def test_distinct_n_and_bad_variants():
    assert pv.distinct_n([1, 2, 1, 2], 2) == 2 / 3
    assert pv.distinct_n([1], 2) == 0.0
    with pytest.raises(ValueError, match=r"variants\[1\]"):
        pv.expand({}, [{"top_p": 0.5}, {"top_p": 2.0}], 100)
    with pytest.raises(ValueError, match=r"variants\[0\]\.seed"):
        pv.expand({}, [{"seed": 1}], 100)
    with pytest.raises(ValueError, match="variants"):
        pv.expand({}, [], 100)
    with pytest.raises(ValueError, match=r"variants\[0\]"):
        pv.expand({}, [{"no_such_field": 1}], 100)
