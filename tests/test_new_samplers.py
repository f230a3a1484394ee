"""Min-k, p-less and adaptive-p inside the jitted sampler, against numpy references of the
published rules (sampling/min_k.py, sampling/adaptive_p.py cite them).

The logits are synthetic rows built to reach every path: a clear cliff at the head, a
cliff past the 128 candidates (the sorted path), a flat row where min-k's fallback
decides, masked tokens, an all-equal row. Adaptive-p is stepped through the sampler and
its processed distribution and EMA state compared with the reference at every step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sampling.params import SamplingParams
from sampling.rows import make_rows
from sampling.sampler import process_logits, sample
from sampling.state import init_state

V = 1000
_process = jax.jit(process_logits, static_argnames=("custom_order",))
_sample = jax.jit(sample, static_argnames=("num_top", "custom_order"))


def _rows(params):
    s = len(params)
    return jax.tree.map(jnp.asarray, make_rows(params, V, list(range(1, s + 1)), [0] * s))


def _logit_rows() -> np.ndarray:
    rng = np.random.default_rng(0)
    head = rng.normal(0, 1, V)
    head[[3, 70, 500]] = [9.0, 8.5, 8.7]                     # a cliff after three tokens
    flat = rng.uniform(0.0, 0.01, V)                         # R small: the fallback decides
    masked = rng.normal(0, 2, V)
    masked[::2] = -np.inf                                    # half removed by an earlier stage
    wide = rng.normal(0, 0.3, V)
    wide[rng.permutation(V)[:200]] = 10.0 + rng.uniform(0, 0.002, 200)  # cliff at rank 200
    equal = np.zeros(V)
    gumbel = rng.gumbel(0, 1.5, V)
    return np.stack([head, flat, masked, wide, equal, gumbel]).astype(np.float32)


def ref_min_k(logits: np.ndarray, tau: float) -> np.ndarray:
    """The paper's rule over the finite logits (float64)."""
    x = logits.astype(np.float64)
    srt = np.sort(x[np.isfinite(x)])[::-1]
    n = len(srt)
    r = srt[0] - srt[-1]
    if r == 0:
        return np.isfinite(x)
    w = (srt[:-1] - srt[1:]) / r / np.arange(1, n)
    k = max(int(np.argmax(w)) + 1, int(np.floor(tau / r)))
    return x >= srt[min(k, n) - 1]


def ref_p_less(logits: np.ndarray, temperature: float) -> np.ndarray:
    x = logits.astype(np.float64) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    return (p >= np.sum(p * p)) | (x == x.max())


@pytest.mark.parametrize("tau", [3.0, 0.0, 40.0])
def test_min_k_matches_the_reference_and_ignores_temperature(tau):
    logits = _logit_rows()
    keeps = {}
    for t in (1.0, 3.0):
        params = [SamplingParams(min_k=True, min_k_tau=tau, temperature=t)] * len(logits)
        keeps[t] = np.isfinite(np.asarray(_process(jnp.asarray(logits), _rows(params),
                                                   init_state(len(logits), V, 8))))
    for r, row in enumerate(logits):
        np.testing.assert_array_equal(keeps[1.0][r], ref_min_k(row, tau), err_msg=f"row {r}")
    np.testing.assert_array_equal(keeps[1.0], keeps[3.0])     # before temperature: same set
    counts = keeps[1.0].sum(axis=1)
    if tau == 3.0:
        assert counts[0] == 3 and counts[3] == 200 and counts[4] == V   # the paths ran
        assert counts[1] > 128                                # fallback floor(3 / R)


def test_p_less_matches_the_reference():
    logits = _logit_rows()
    for t in (0.7, 1.0, 2.5):
        params = [SamplingParams(p_less=True, temperature=t)] * len(logits)
        keep = np.isfinite(np.asarray(_process(jnp.asarray(logits), _rows(params),
                                               init_state(len(logits), V, 8))))
        for r, row in enumerate(logits):
            np.testing.assert_array_equal(keep[r], ref_p_less(row, t), err_msg=f"T {t} row {r}")
    # a sharper distribution keeps fewer tokens
    assert ref_p_less(logits[5], 0.7).sum() <= ref_p_less(logits[5], 2.5).sum()


def ref_adaptive(x: np.ndarray, target, weighted_sum, total_weight) -> np.ndarray:
    """llama.cpp's transform of the (already truncated) logits x; -inf stays -inf."""
    x = x.astype(np.float64)
    p = np.exp(x - x.max())
    p /= p.sum()
    adapted = np.clip(2 * np.clip(target, 0, 1) - weighted_sum / total_weight, 0, 1)
    dist = np.abs(p - adapted) / 0.3
    return np.where(np.isfinite(x), 5.0 - 10.0 * dist * dist / (1.0 + dist), -np.inf)


def _log_softmax(x):
    x = x.astype(np.float64)
    m = x[np.isfinite(x)].max()
    return x - m - np.log(np.sum(np.exp(x[np.isfinite(x)] - m)))


def test_adaptive_p_transform_and_ema_follow_llama_cpp():
    logits = _logit_rows()
    rng = np.random.default_rng(1)
    params = [SamplingParams(adaptive_p_target=0.5, adaptive_p_decay=0.9, min_p=0.05,
                             seed=1),
              SamplingParams(adaptive_p_target=0.2, adaptive_p_decay=0.5, top_k=20, seed=2),
              SamplingParams(min_p=0.05, seed=3)]             # off: untouched by it
    rows = _rows(params)
    state = init_state(3, V, 64)
    ref_ema = [(p.adaptive_p_target / np.float32(1 - p.adaptive_p_decay),
                1 / np.float32(1 - p.adaptive_p_decay)) for p in params[:2]]
    for step in range(12):
        lg = np.stack([logits[5] + rng.normal(0, 1.0, V).astype(np.float32)] * 3)
        lg = jnp.asarray(lg, jnp.float32)
        plain = np.asarray(_process(lg, _rows([SamplingParams(min_p=0.05),
                                               SamplingParams(top_k=20),
                                               SamplingParams(min_p=0.05)]), state))
        got = np.asarray(_process(lg, rows, state))
        np.testing.assert_array_equal(got[2], plain[2])
        out, state = _sample(lg, rows, state, num_top=0)
        tokens = np.asarray(out.tokens)
        for r in range(2):
            p = params[r]
            ws, tw = ref_ema[r]
            ref = ref_adaptive(plain[r], p.adaptive_p_target, ws, tw)
            np.testing.assert_allclose(_log_softmax(got[r]), _log_softmax(ref), atol=2e-5,
                                       err_msg=f"step {step} row {r}")
            assert np.isfinite(plain[r][tokens[r]])           # drawn from the kept set
            orig = np.exp(_log_softmax(plain[r])[tokens[r]])
            ref_ema[r] = (orig + p.adaptive_p_decay * ws, 1 + p.adaptive_p_decay * tw)
            np.testing.assert_allclose(np.asarray(state.ap_sum)[r], ref_ema[r][0], rtol=1e-5)
            np.testing.assert_allclose(np.asarray(state.ap_weight)[r], ref_ema[r][1], rtol=1e-5)
    assert float(state.ap_weight[2]) == 0.0


@pytest.mark.parametrize("fields,name", [
    ({"adaptive_p_target": 1.5}, "adaptive_p_target"),
    ({"adaptive_p_decay": 1.0}, "adaptive_p_decay"),
    ({"adaptive_p_target": 0.5, "mirostat_mode": 2}, "adaptive_p_target"),
    ({"min_k": "yes"}, "min_k"),
    ({"min_k_tau": -1.0}, "min_k_tau"),
    ({"p_less": 1}, "p_less"),
    ({"sampler_order": ["min_kk"]}, "sampler_order"),
])
def test_bad_values_name_the_field(fields, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams.from_dict(fields, vocab_size=V)


def test_the_http_routes_accept_the_fields():
    """The OpenAI routes take every SamplingParams field (gRPC's sampling_json and the
    in-process API build the same SamplingParams)."""
    from serving.http.openai_fields import CHAT_FIELDS, COMPLETION_FIELDS
    from serving.http.openapi import spec
    for name in ("adaptive_p_target", "adaptive_p_decay", "min_k", "min_k_tau", "p_less"):
        assert name in CHAT_FIELDS and name in COMPLETION_FIELDS
    assert "min_k" in str(spec()) and "adaptive_p_decay" in str(spec())
    assert SamplingParams.from_dict({"sampler_order": ["min_k", "p_less", "temperature"]})
