"""Temperature and truncation stages over [S, V] logits with per-row parameters.

No sort: on a CPU a full sort of [64, 151936] logits costs seconds. Thresholds that
depend on ranks (top-k, top-p, typical) come from the row's CANDIDATES most likely tokens
(`lax.top_k`, one pass) when the answer lies among them: top_k <= CANDIDATES, the
candidates' mass reaches top_p, every finite token is a candidate (typical; the usual case
after top-k or min-p). Rows where it does not are found exactly by bisection over the
float32 bit patterns (32 passes of compare-and-sum, run only when some row needs it). Which
path a row takes depends on that row alone, so batch invariance holds. Both keep every
token tied with the threshold value (documented tie policy: ties at the cut are all kept,
as HF's top-k does). Every filter keeps at least one token: the most likely one, except
typical, which keeps the most typical one (HF's rule).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sampling.rows import SamplingRows
from sampling.state import SamplerState

NEG_INF = -jnp.inf
CANDIDATES = 128    # tokens per row looked at before falling back to bisection


def sort_key(x: jax.Array) -> jax.Array:
    """uint32 keys ordered like the float32 values (for x without NaN)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    signed = jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return jax.lax.bitcast_convert_type(signed, jnp.uint32) ^ jnp.uint32(0x80000000)


def largest_true(pred, lo, hi):
    """Per row, the largest uint32 t in [lo, hi] with pred(t) true (pred monotone decreasing,
    pred(lo) true). 32 halvings reach the exact value."""

    def body(_, bounds):
        lo, hi = bounds
        gap = hi - lo
        mid = lo + (gap >> 1) + (gap & 1)
        ok = pred(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo, hi = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return lo


def _row_max(logits):
    return jnp.max(logits, axis=-1, keepdims=True)


def _lse(logits):
    return jax.nn.logsumexp(logits, axis=-1, keepdims=True)


def entropy(logits, lse):
    """Entropy in nats of softmax(logits), one fused pass (no [S, V] probabilities kept)."""
    logp = logits - lse
    return -jnp.sum(jnp.where(jnp.isfinite(logp), jnp.exp(logp) * logp, 0.0), axis=-1,
                    keepdims=True)


def apply_temperature(logits, rows: SamplingRows, state: SamplerState, dynatemp: bool = True):
    """logits / T; with dynatemp_range > 0, llama.cpp's entropy-scaled temperature
    (dynatemp=False, a lean sampler program: no row has one)."""
    t = rows.temperature
    if not dynatemp:
        return logits / jnp.maximum(t, 1e-6)[:, None]
    dyn = rows.dynatemp_range > 0

    def dynamic(t):
        ent = entropy(logits, _lse(logits))[:, 0]
        candidates = jnp.sum(jnp.isfinite(logits), axis=-1)
        max_entropy = jnp.log(jnp.maximum(candidates, 2).astype(jnp.float32))
        normalized = jnp.clip(ent / max_entropy, 0.0, 1.0)
        lo = jnp.maximum(t - rows.dynatemp_range, 0.0)
        hi = t + rows.dynatemp_range
        return jnp.where(dyn, lo + (hi - lo) * normalized ** rows.dynatemp_exponent, t)

    t = jax.lax.cond(jnp.any(dyn), dynamic, lambda t: t, t)   # entropy only when needed
    return logits / jnp.maximum(t, 1e-6)[:, None]


def apply_top_n_sigma(logits, rows: SamplingRows, state: SamplerState):
    """Keep logits >= max - n * std (std over the finite logits)."""
    finite = jnp.isfinite(logits)
    count = jnp.maximum(jnp.sum(finite, axis=-1, keepdims=True), 1)
    mean = jnp.sum(jnp.where(finite, logits, 0.0), axis=-1, keepdims=True) / count
    var = jnp.sum(jnp.where(finite, (logits - mean) ** 2, 0.0), axis=-1, keepdims=True) / count
    cut = _row_max(logits) - rows.top_n_sigma[:, None] * jnp.sqrt(var)
    return jnp.where(logits >= cut, logits, NEG_INF)


def apply_min_p(logits, rows: SamplingRows, state: SamplerState):
    """Drop tokens with p < min_p * p_max (in logit space: logit < max + log(min_p))."""
    cut = _row_max(logits) + jnp.log(rows.min_p)[:, None]
    return jnp.where(logits >= cut, logits, NEG_INF)


def _candidates(logits):
    """The row's CANDIDATES largest logits, largest first ([S, K])."""
    return jax.lax.top_k(logits, min(CANDIDATES, logits.shape[1]))[0]


def _first_reaching(values, masses, target):
    """values, masses [S, K] in the order tokens join the set: the value of the token that
    brings the summed mass to `target` [S], and whether any does."""
    reach = jnp.cumsum(masses, axis=-1) >= target[:, None]
    j = jnp.argmax(reach, axis=-1)
    return jnp.take_along_axis(values, j[:, None], axis=-1)[:, 0], reach[:, -1]


def _bisected_keep(slow, logits, key_of, weight_of, target):
    """Keep mask [S, V] by bisection for the rows in `slow`: with keys = key_of(logits)
    and weights = weight_of(logits), keep keys >= the largest t such that the tokens with
    key >= t weigh at least `target` [S]. All False, with no pass over the logits, when no
    row is slow (everything is computed inside the cond)."""
    s = logits.shape[0]

    def bisect():
        keys, w = key_of(logits), weight_of(logits)
        enough = lambda t: jnp.sum(jnp.where(keys >= t[:, None], w, 0.0), axis=-1) >= target
        cut = largest_true(enough, jnp.zeros((s,), jnp.uint32), jnp.max(keys, axis=-1))
        return keys >= cut[:, None]

    return jax.lax.cond(jnp.any(slow), bisect, lambda: jnp.zeros(logits.shape, bool))


def apply_top_k(logits, rows: SamplingRows, state: SamplerState):
    """Keep the k largest (and every token tied with the k-th)."""
    v = logits.shape[1]
    k = rows.top_k
    top = _candidates(logits)
    fast = (k <= top.shape[1]) | (k >= v)
    kth = jnp.take_along_axis(top, jnp.clip(k - 1, 0, top.shape[1] - 1)[:, None], axis=-1)
    slow = _bisected_keep(~fast, logits, sort_key, jnp.ones_like, k.astype(jnp.float32))
    keep = jnp.where(fast[:, None], logits >= kth, slow) | (k >= v)[:, None]
    return jnp.where(keep, logits, NEG_INF)


def apply_top_p(logits, rows: SamplingRows, state: SamplerState):
    """Smallest set of most likely tokens whose mass >= top_p; the max is always kept."""
    lse = _lse(logits)
    top = _candidates(logits)
    p = lambda x: jnp.exp(x - lse)
    cut, fast = _first_reaching(top, p(top), rows.top_p)
    slow = _bisected_keep(~fast & (rows.top_p < 1.0), logits, lambda x: sort_key(p(x)), p,
                          rows.top_p)
    keep = jnp.where(fast[:, None], logits >= cut[:, None], slow)
    keep = keep | (logits >= _row_max(logits))
    return jnp.where(keep, logits, NEG_INF)


def apply_typical(logits, rows: SamplingRows, state: SamplerState):
    """HF TypicalLogitsWarper: keep the tokens whose surprise is closest to the entropy,
    fewest first, until their mass reaches typical_p."""
    lse = _lse(logits)
    h = entropy(logits, lse)

    def shift(x):   # |surprise - entropy|, inf for removed tokens
        return jnp.where(jnp.isfinite(x), jnp.abs(lse - x - h), jnp.inf)

    p = lambda x: jnp.exp(x - lse)
    mass = rows.typical_p
    # candidates: the most likely tokens, in order of shift; exact when they are all the
    # finite ones
    top = _candidates(logits)
    top = jnp.take_along_axis(top, jnp.argsort(shift(top), axis=-1, stable=True), axis=-1)
    cut, reached = _first_reaching(shift(top), p(top), mass)
    fast = reached & (jnp.sum(jnp.isfinite(logits), axis=-1) <= top.shape[1])
    # bisection: smallest s with mass(shift <= s) >= typical_p == largest reversed key
    slow = _bisected_keep(~fast & (mass < 1.0), logits, lambda x: ~sort_key(shift(x)), p,
                          mass)
    # HF's rule keeps the most typical token, not the most likely one (which can be atypical)
    keep = jnp.where(fast[:, None], shift(logits) <= cut[:, None], slow)
    return jnp.where(keep, logits, NEG_INF)


# The probability thresholds below compare in log space (p >= c <=> logit - lse >= log c):
# one reduction pass instead of a softmax materialised over [S, V].

def apply_epsilon(logits, rows: SamplingRows, state: SamplerState):
    """HF EpsilonLogitsWarper: drop p < epsilon, keeping the most likely token."""
    cut = _lse(logits) + jnp.log(rows.epsilon)[:, None]
    keep = (logits >= cut) | (logits >= _row_max(logits))
    return jnp.where(keep, logits, NEG_INF)


def apply_eta(logits, rows: SamplingRows, state: SamplerState):
    """HF EtaLogitsWarper: drop p < min(eta, sqrt(eta) * exp(-entropy)), keeping the max."""
    lse = _lse(logits)
    eta = rows.eta[:, None]
    cut = jnp.minimum(eta, jnp.sqrt(eta) * jnp.exp(-entropy(logits, lse)))
    keep = (logits >= lse + jnp.log(cut)) | (logits >= _row_max(logits))
    return jnp.where(keep, logits, NEG_INF)


def apply_xtc(logits, rows: SamplingRows, state: SamplerState, uniform):
    """llama.cpp XTC: with probability P, drop every token with p >= threshold except the
    least likely of them (only when at least two are above the threshold)."""
    above = logits >= _lse(logits) + jnp.log(rows.xtc_threshold)[:, None]
    n_above = jnp.sum(above, axis=-1)
    least = jnp.min(jnp.where(above, logits, jnp.inf), axis=-1, keepdims=True)
    fire = (uniform < rows.xtc_probability) & (n_above >= 2)
    drop = above & (logits > least) & fire[:, None]
    return jnp.where(drop, NEG_INF, logits)


def apply_mirostat(logits, rows: SamplingRows, mu):
    """Mirostat v2 truncation: drop tokens whose surprise -log2 p exceeds mu (keep the max)."""
    # -log2 p <= mu  <=>  logit >= lse - mu ln 2
    keep = (logits >= _lse(logits) - mu[:, None] * math.log(2.0)) | (logits >= _row_max(logits))
    return jnp.where(keep, logits, NEG_INF)
