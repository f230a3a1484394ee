"""Each sampling stage against its reference, on the same logits.

transformers' own logits processors where one exists (temperature, top-k, top-p, min-p,
typical, epsilon, eta, repetition penalty, no-repeat n-gram, min new tokens, bad words),
a plain numpy transcription of the published rule where none does (llama.cpp DRY, XTC,
top-n-sigma, dynamic temperature, mirostat v2), OpenAI's formula for presence/frequency.
Everything runs through the real sampler (`process_logits` / `sample`) with one row per
case, so the per-row gating is exercised too.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation import logits_process as hf

from sampling.filters import CANDIDATES
from sampling.params import SamplingParams
from sampling.rows import make_rows
from sampling.sampler import process_logits, sample
from sampling.state import append, init_state, reset_row

V = 64
MAX_LEN = 48
EOS = 2


def _logits(seed: int, rows: int = 1, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, V)) * scale).astype(np.float32)


def _state(params: list, prompt: list[int], output: list[int] = (), vocab: int = V):
    """Sampler state holding `prompt` then `output` for every row."""
    rows = make_rows(params, vocab, [0] * len(params), [0] * len(params), eos_ids=[EOS])
    st = init_state(len(params), vocab, MAX_LEN)
    ids = np.zeros(MAX_LEN, np.int32)
    ids[:len(prompt)] = prompt
    for slot in range(len(params)):
        one = jax.tree.map(lambda a: a[slot:slot + 1], rows)
        st = reset_row(st, slot, jnp.asarray(ids), len(prompt), one)
    for t in output:
        st = append(st, jnp.full((len(params),), t, jnp.int32), st.mu)
    return rows, st


_process = jax.jit(process_logits)


def ours(params: SamplingParams, logits: np.ndarray, prompt=(5,), output=()) -> np.ndarray:
    rows, st = _state([params], list(prompt), list(output), vocab=logits.shape[-1])
    return np.asarray(_process(jnp.asarray(logits), rows, st))


def check_same(got: np.ndarray, want: np.ndarray) -> None:
    """Same removed set (-inf) and the same values on the kept tokens."""
    want = np.asarray(want, np.float32)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    kept = ~np.isneginf(want)
    np.testing.assert_allclose(got[kept], want[kept], rtol=1e-5, atol=1e-5)


def hf_apply(proc, logits: np.ndarray, input_ids=(5,)) -> np.ndarray:
    ids = torch.tensor([list(input_ids)], dtype=torch.long)
    return proc(ids, torch.from_numpy(logits.copy())).numpy()


# -- warpers vs transformers ---------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name,params,proc", [
    ("temperature", dict(temperature=0.7), hf.TemperatureLogitsWarper(0.7)),
    ("top_k", dict(top_k=7), hf.TopKLogitsWarper(7)),
    ("top_p", dict(top_p=0.8), hf.TopPLogitsWarper(0.8)),
    ("top_p_small", dict(top_p=0.05), hf.TopPLogitsWarper(0.05)),
    ("min_p", dict(min_p=0.1), hf.MinPLogitsWarper(0.1)),
    ("typical", dict(typical_p=0.7), hf.TypicalLogitsWarper(0.7)),
    ("epsilon", dict(epsilon_cutoff=0.02), hf.EpsilonLogitsWarper(0.02)),
    ("eta", dict(eta_cutoff=0.05), hf.EtaLogitsWarper(0.05)),
])
def test_warpers_match_transformers(seed, name, params, proc):
    logits = _logits(seed)
    check_same(ours(SamplingParams(**params), logits)[0], hf_apply(proc, logits)[0])


def test_candidate_and_bisection_paths_match_transformers():
    """With a vocabulary larger than filters.CANDIDATES, rows whose cut lies among their most
    likely tokens take the top_k path and the others the bisection, in one batch: both
    equal transformers' warpers on their own row."""
    vocab = 4 * CANDIDATES
    rng = np.random.default_rng(7)
    peaked = (rng.standard_normal(vocab) * 4).astype(np.float32)
    flat = (rng.standard_normal(vocab) * 0.5).astype(np.float32)
    mass_in_candidates = lambda x: np.sort(np.exp(x - x.max()) / np.exp(x - x.max()).sum())[
        ::-1][:CANDIDATES].sum()
    assert mass_in_candidates(peaked) > 0.9 > mass_in_candidates(flat)   # fast and slow top_p
    cases = [(dict(top_k=7), hf.TopKLogitsWarper(7), peaked),                 # candidates
             (dict(top_k=CANDIDATES + 40), hf.TopKLogitsWarper(CANDIDATES + 40), flat),  # bisection
             (dict(top_p=0.9), hf.TopPLogitsWarper(0.9), peaked),             # candidates
             (dict(top_p=0.9), hf.TopPLogitsWarper(0.9), flat),               # bisection
             (dict(typical_p=0.7), hf.TypicalLogitsWarper(0.7), flat)]        # bisection
    rows, st = _state([SamplingParams(**c[0]) for c in cases], [5], vocab=vocab)
    logits = np.stack([c[2] for c in cases])
    got = np.asarray(_process(jnp.asarray(logits), rows, st))
    for row, (_, proc, x) in enumerate(cases):
        check_same(got[row], hf_apply(proc, x[None])[0])
    # typical over few finite tokens (after min_p): the candidate path
    x = peaked.copy()
    x[np.argsort(x)[:-50]] = -np.inf
    check_same(ours(SamplingParams(typical_p=0.7), x[None])[0],
               hf_apply(hf.TypicalLogitsWarper(0.7), x[None])[0])


def test_top_k_keeps_ties_like_transformers():
    """Tie policy: every token equal to the k-th largest logit survives (HF's rule), so a
    top_k=3 row with four tied logits keeps all four."""
    logits = _logits(3)
    logits[0, [4, 9, 17, 30]] = 10.0
    got = ours(SamplingParams(top_k=3), logits)[0]
    check_same(got, hf_apply(hf.TopKLogitsWarper(3), logits)[0])
    assert np.isfinite(got).sum() == 4


def test_chained_order_matches_transformers_chain():
    """Default order temperature -> min_p -> top_k -> top_p equals the same HF chain;
    top_p does not commute with top_k, so the reverse order differs."""
    logits = _logits(4, scale=2.0)
    chain = [hf.TemperatureLogitsWarper(0.8), hf.MinPLogitsWarper(0.02), hf.TopKLogitsWarper(12),
             hf.TopPLogitsWarper(0.7)]
    want = logits.copy()
    for proc in chain:
        want = hf_apply(proc, want)
    params = dict(temperature=0.8, min_p=0.02, top_k=12, top_p=0.7)
    check_same(ours(SamplingParams(**params), logits)[0], want[0])
    reverse = hf_apply(hf.TopKLogitsWarper(12), hf_apply(hf.TopPLogitsWarper(0.7), hf_apply(
        hf.MinPLogitsWarper(0.02), hf_apply(hf.TemperatureLogitsWarper(0.8), logits))))
    custom = SamplingParams(**params, sampler_order=["temperature", "min_p", "top_p", "top_k"])
    check_same(ours(custom, logits)[0], reverse[0])


# -- penalties and masks vs transformers ---------------------------------------------------------

PROMPT = [5, 7, 7, 11, 3]
OUTPUT = [9, 5, 13, 9]


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_prompt_and_output(penalty):
    logits = _logits(5)
    got = ours(SamplingParams(repetition_penalty=penalty), logits, PROMPT, OUTPUT)[0]
    want = hf_apply(hf.RepetitionPenaltyLogitsProcessor(penalty), logits, PROMPT + OUTPUT)[0]
    check_same(got, want)


def test_repetition_penalty_output_scope():
    logits = _logits(6)
    params = SamplingParams(repetition_penalty=1.5, repetition_penalty_scope="output")
    got = ours(params, logits, PROMPT, OUTPUT)[0]
    proc = hf.RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=len(PROMPT))
    check_same(got, hf_apply(proc, logits, PROMPT + OUTPUT)[0])
    assert got[7] == logits[0, 7]                      # prompt-only token untouched


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram(n):
    logits = _logits(7)
    seq = [4, 8, 4, 9, 4, 8, 15, 4]
    got = ours(SamplingParams(no_repeat_ngram_size=n), logits, seq[:3], seq[3:])[0]
    check_same(got, hf_apply(hf.NoRepeatNGramLogitsProcessor(n), logits, seq)[0])


@pytest.mark.parametrize("generated", [0, 2, 3])
def test_min_tokens_masks_eos_and_stop_ids(generated):
    logits = _logits(8)
    params = SamplingParams(min_tokens=3, stop_token_ids=[20])
    got = ours(params, logits, PROMPT, OUTPUT[:generated])[0]
    proc = hf.MinNewTokensLengthLogitsProcessor(len(PROMPT), 3, [EOS, 20])
    check_same(got, hf_apply(proc, logits, PROMPT + OUTPUT[:generated])[0])


@pytest.mark.parametrize("output", [[9, 5], [9, 6], [5]])
def test_bad_words_match_transformers(output):
    logits = _logits(9)
    words = [[5, 30], [9, 5, 31], [40]]
    got = ours(SamplingParams(bad_words_ids=words), logits, PROMPT, output)[0]
    proc = hf.NoBadWordsLogitsProcessor(words)
    check_same(got, hf_apply(proc, logits, PROMPT + output)[0])


def test_presence_frequency_output_scope_and_window():
    """OpenAI: logit -= f * count + p * (count > 0), counts over the output only by default;
    with penalty_window the last N tokens of the scope; prompt+output when asked."""
    logits = _logits(10)
    output = [9, 9, 5, 13, 9]
    f, p = 0.4, 0.7

    def expect(tokens):
        counts = np.bincount(tokens, minlength=V).astype(np.float32)
        return logits[0] - f * counts - p * (counts > 0)

    got = ours(SamplingParams(frequency_penalty=f, presence_penalty=p), logits, PROMPT, output)
    check_same(got[0], expect(output))
    got = ours(SamplingParams(frequency_penalty=f, presence_penalty=p, penalty_window=3),
               logits, PROMPT, output)
    check_same(got[0], expect(output[-3:]))
    got = ours(SamplingParams(frequency_penalty=f, presence_penalty=p,
                              presence_frequency_scope="prompt_and_output"), logits, PROMPT, output)
    check_same(got[0], expect(PROMPT + output))


def test_repetition_penalty_window_counts_last_tokens_only():
    logits = _logits(11)
    seq = PROMPT + OUTPUT
    got = ours(SamplingParams(repetition_penalty=1.4, penalty_window=4), logits, PROMPT, OUTPUT)[0]
    want = hf_apply(hf.RepetitionPenaltyLogitsProcessor(1.4), logits, seq[-4:])[0]
    check_same(got, want)


# -- numpy transcriptions of llama.cpp rules --------------------------------------------------------

def np_softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum()


def np_dry(logits, tokens, mult, base, allowed, last_n, breakers):
    """llama.cpp llama_sampler_dry_apply (single-token breakers), written as loops."""
    out = logits.astype(np.float64).copy()
    window = len(tokens) if last_n in (0, -1) else min(last_n, len(tokens))
    if window <= allowed:
        return out
    rat = lambda i: tokens[len(tokens) - 1 - i]
    rep_limit = window
    for i in range(window):
        if rat(i) in breakers:
            rep_limit = i
            break
    if rep_limit < allowed:
        return out
    counts = [0] * window
    for k in range(1, window):
        n = 0
        while n + k < window and rat(n) == rat(n + k):
            n += 1
        counts[window - 1 - k] = min(n, rep_limit)
    best = {}
    for i in range(window - 1):
        if counts[i] >= allowed:
            tok = rat(window - 2 - i)
            best[tok] = max(best.get(tok, 0), counts[i])
    max_exp = int(88.7228391 / math.log(base)) if base > 1.000001 else 0
    for tok, length in best.items():
        if tok in breakers:
            continue
        e = length - allowed
        if max_exp > 0:
            e = min(e, max_exp)
        out[tok] -= mult * base ** e
    return out


@pytest.mark.parametrize("seq,allowed,last_n,changes", [
    ([1, 4, 5, 6, 8, 1, 4, 5, 6], 2, 0, True),          # repeat of 4 -> token 8 penalised
    ([1, 4, 5, 6, 8, 1, 4, 5, 6], 3, 0, True),
    ([1, 4, 5, 6, 8, 1, 4, 5, 6], 2, 6, False),         # window cuts the first occurrence
    ([1, 4, 5, 6, 8, 1, 4, 5, 6], 2, 8, True),
    ([4, 5, 6, 9, 4, 5, 6, 10, 4, 5, 6], 2, 0, True),   # two continuations, both penalised
    ([4, 5, 3, 6, 7, 4, 5, 3, 6], 2, 0, False),         # 3 is a breaker: match stops there
    ([4, 5, 6, 7, 4, 5, 6, 3], 1, 0, False),            # ends on a breaker
    ([7, 7, 7, 7, 7, 7], 1, 0, True),
    ([7, 7, 7, 7, 7, 7] * 6, 2, 0, True),              # long repeat, exponent grows
])
def test_dry_matches_llama_cpp_rule(seq, allowed, last_n, changes):
    logits = _logits(12)
    params = SamplingParams(dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=allowed,
                            dry_penalty_last_n=last_n, dry_sequence_breaker_ids=[3])
    got = ours(params, logits, seq[:2], seq[2:])[0]
    want = np_dry(logits[0], seq, 0.8, 1.75, allowed, last_n, {3})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert np.allclose(got, logits[0]) != changes


def test_xtc_matches_llama_cpp_rule():
    """probability 1 always fires: every token with p >= threshold except the least likely
    of them is removed, when at least two qualify."""
    logits = _logits(13)
    logits[0, [3, 8, 20]] = [6.0, 5.5, 5.0]
    threshold = 0.1
    got = ours(SamplingParams(xtc_probability=1.0, xtc_threshold=threshold), logits)[0]
    p = np_softmax(logits[0].astype(np.float64))
    above = p >= threshold
    assert above.sum() >= 2
    want = np.where(above & (p > p[above].min()), -np.inf, logits[0])
    check_same(got, want)
    # with one token above the threshold nothing happens
    got = ours(SamplingParams(xtc_probability=1.0, xtc_threshold=0.5), logits)[0]
    check_same(got, logits[0]) if (p >= 0.5).sum() < 2 else None


def test_top_n_sigma_matches_llama_cpp_rule():
    logits = _logits(14)
    logits[0, 10] = -np.inf
    got = ours(SamplingParams(top_n_sigma=1.0), logits)[0]
    finite = logits[0][np.isfinite(logits[0])]
    cut = finite.max() - 1.0 * finite.std()
    check_same(got, np.where(logits[0] < cut, -np.inf, logits[0]))


@pytest.mark.parametrize("exponent", [1.0, 0.5])
def test_dynamic_temperature_matches_llama_cpp_rule(exponent):
    logits = _logits(15)
    t, r = 0.9, 0.5
    got = ours(SamplingParams(temperature=t, dynatemp_range=r, dynatemp_exponent=exponent), logits)
    p = np_softmax(logits[0].astype(np.float64))
    entropy = -np.sum(p * np.log(p))
    dyn = max(0.0, t - r) + 2 * r * (entropy / math.log(V)) ** exponent
    check_same(got[0], logits[0] / dyn)


def test_mirostat_v2_matches_llama_cpp_rule():
    """Truncate surprise > mu, sample from the renormalised rest, mu -= eta * (s - tau)."""
    tau, eta = 3.0, 0.1
    params = SamplingParams(mirostat_mode=2, mirostat_tau=tau, mirostat_eta=eta, seed=1,
                            logprobs_mode="processed")
    rows, st = _state([params], [5])
    logits = _logits(16)
    mu = 2 * tau
    assert float(st.mu[0]) == mu
    for _ in range(4):
        out, st = jax.jit(sample, static_argnames="num_top")(jnp.asarray(logits), rows, st,
                                                             num_top=V)
        p = np_softmax(logits[0].astype(np.float64))
        kept = -np.log2(p) <= mu
        kept[np.argmax(p)] = True
        q = np.where(kept, p, 0.0) / p[kept].sum()
        tok = int(out.tokens[0])
        assert kept[tok]
        lp = np.full(V, -9999.0)
        lp[np.asarray(out.top_ids[0])] = np.asarray(out.top_logprobs[0])
        np.testing.assert_allclose(np.exp(lp), q, atol=1e-5)
        mu = mu - eta * (-np.log2(q[tok]) - tau)
        np.testing.assert_allclose(float(st.mu[0]), mu, rtol=1e-4)
