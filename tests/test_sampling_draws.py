"""The draw: empirical frequencies match the processed distribution (chi-square, fixed
seeds, so deterministic), and seeds are batch invariant (SAMPLING.md trap 1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from sampling.params import SamplingParams
from sampling.rows import make_rows
from sampling.sampler import sample
from sampling.state import init_state

V = 12
MAX_LEN = 24
DRAWS = 4000          # one row per draw, each with its own seed, in one call
ROWS = 6              # the batch of the other tests (one compile)

_sample = jax.jit(sample, static_argnames="num_top")


def batch(params, seeds, prompt=(1, 2, 3)):
    """Rows for `params` and a state where every row has just read `prompt` (the same
    state reset_row builds, written directly so thousands of rows cost nothing)."""
    n = len(params)
    rows = jax.tree.map(jnp.asarray, make_rows(params, V, seeds, [0] * n))
    history = np.zeros((n, MAX_LEN), np.int32)
    history[:, :len(prompt)] = prompt
    counts = np.tile(np.bincount(prompt, minlength=V).astype(np.int32), (n, 1))
    st = init_state(n, V, MAX_LEN).replace(
        history=jnp.asarray(history), length=jnp.full((n,), len(prompt), jnp.int32),
        prompt_len=jnp.full((n,), len(prompt), jnp.int32), prompt_counts=jnp.asarray(counts),
        mu=2.0 * rows.mirostat_tau)
    return rows, st


BASE = np.array([2.0, 1.5, 1.2, 1.0, 0.4, 0.1, 0.0, -0.5, -1.0, -2.0, -3.0, -np.inf], np.float32)


@pytest.mark.parametrize("params", [
    dict(),
    dict(temperature=0.7, top_k=6, top_p=0.9),
    dict(temperature=1.3, min_p=0.05, repetition_penalty=1.5),
])
def test_frequencies_match_the_processed_distribution(params):
    p = SamplingParams(**params, logprobs_mode="processed", logprobs=True, top_logprobs=V)
    rows, st = batch([p] * DRAWS, list(range(DRAWS)))
    logits = jnp.asarray(np.tile(BASE, (DRAWS, 1)))
    out, _ = _sample(logits, rows, st, num_top=V)
    # the processed distribution, as the sampler reports it (checked against transformers
    # in test_sampling_reference.py)
    probs = np.zeros(V)
    probs[np.asarray(out.top_ids[0])] = np.exp(np.asarray(out.top_logprobs[0], np.float64))
    probs[probs < 1e-30] = 0.0
    counts = np.bincount(np.asarray(out.tokens), minlength=V)
    assert np.all(counts[probs == 0] == 0)              # removed tokens are never drawn
    support = probs > 0
    expected = probs[support] * DRAWS
    chi2 = np.sum((counts[support] - expected) ** 2 / expected)
    assert chi2 < stats.chi2.ppf(0.999, support.sum() - 1), (counts, expected)
    assert support.sum() > 2


def test_seeded_row_is_batch_invariant_in_any_slot():
    """A seeded request gives the same tokens alone and inside a busy batch of rows with
    other parameters, whatever its slot, over several steps."""
    target = SamplingParams(temperature=0.9, top_p=0.95, repetition_penalty=1.2, seed=42)
    others = [SamplingParams(temperature=0.0), SamplingParams(top_k=3, xtc_probability=0.5),
              SamplingParams(min_p=0.1, dry_multiplier=0.8), None,
              SamplingParams(mirostat_mode=2, sampler_order=["top_k", "temperature"], top_k=4)]
    rng = np.random.default_rng(0)
    steps = [rng.standard_normal((1, V)).astype(np.float32) * 2 for _ in range(4)]

    def run(slot, n):
        """`target` in `slot` of a batch of ROWS with n - 1 busy neighbours (rest idle)."""
        params = others[:n - 1]
        params = params[:slot] + [target] + params[slot:]
        params += [None] * (ROWS - len(params))
        seeds = [7 + i for i in range(ROWS)]
        seeds[slot] = 42
        rows, st = batch(params, seeds)
        got = []
        for x in steps:
            noise = rng.standard_normal((ROWS, V)).astype(np.float32)
            noise[slot] = x[0]
            out, st = _sample(jnp.asarray(noise), rows, st, num_top=3)
            got.append((int(out.tokens[slot]), float(out.logprob[slot])))
        return got

    alone = run(0, 1)
    assert len(set(t for t, _ in alone)) > 1
    for slot, n in [(0, 6), (3, 6), (5, 6), (1, 3)]:
        assert run(slot, n) == alone


def test_seeds_decide_the_draw():
    p = SamplingParams(temperature=1.0)
    logits = jnp.zeros((ROWS, V))
    seeds = [1, 1, 2, 1 + 2 ** 40, 3, 4]
    rows, st = batch([p] * ROWS, seeds)
    tokens = []
    for _ in range(12):
        out, st = _sample(logits, rows, st, num_top=3)
        tokens.append(np.asarray(out.tokens))
    tokens = np.stack(tokens, axis=1)
    assert tokens[0].tolist() == tokens[1].tolist()          # same seed, same output
    assert tokens[0].tolist() != tokens[2].tolist()          # different seed
    assert tokens[0].tolist() != tokens[3].tolist()          # the high 32 bits count


def test_sample_index_gives_independent_samples():
    """n > 1: same seed, different sample index -> different keys."""
    p = SamplingParams()
    rows = make_rows([p] * ROWS, V, [5] * ROWS, list(range(ROWS)))
    st = init_state(ROWS, V, MAX_LEN)
    toks = []
    for _ in range(12):
        out, st = _sample(jnp.zeros((ROWS, V)), rows, st, num_top=3)
        toks.append(np.asarray(out.tokens))
    toks = np.stack(toks, axis=1)
    assert toks[0].tolist() != toks[1].tolist()
