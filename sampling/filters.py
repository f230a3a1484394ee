"""Temperature and truncation stages over [S, V] logits with per-row parameters.

No sort: on a CPU a full sort of [64, 151936] logits costs seconds. Thresholds that
depend on ranks (top-k, top-p, typical) are found exactly by bisection over the float32
bit patterns (32 passes of compare-and-sum), which keeps every token tied with the
threshold value (documented tie policy: ties at the cut are all kept, as HF's top-k does).
Every filter keeps at least the most likely token.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sampling.rows import SamplingRows
from sampling.state import SamplerState

NEG_INF = -jnp.inf


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


def apply_temperature(logits, rows: SamplingRows, state: SamplerState):
    """logits / T; with dynatemp_range > 0, llama.cpp's entropy-scaled temperature."""
    t = rows.temperature
    dyn = rows.dynatemp_range > 0
    logp = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(logp)
    entropy = -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)
    candidates = jnp.sum(jnp.isfinite(logits), axis=-1)
    max_entropy = jnp.log(jnp.maximum(candidates, 2).astype(jnp.float32))
    normalized = jnp.clip(entropy / max_entropy, 0.0, 1.0)
    lo = jnp.maximum(t - rows.dynatemp_range, 0.0)
    hi = t + rows.dynatemp_range
    dyn_t = lo + (hi - lo) * normalized ** rows.dynatemp_exponent
    t = jnp.where(dyn, dyn_t, t)
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


def apply_top_k(logits, rows: SamplingRows, state: SamplerState):
    """Keep the k largest (and every token tied with the k-th)."""
    keys = sort_key(logits)
    k = rows.top_k[:, None]
    s = logits.shape[0]
    lo = jnp.zeros((s,), jnp.uint32)
    hi = jnp.max(keys, axis=-1)
    pred = lambda t: jnp.sum(keys >= t[:, None], axis=-1, keepdims=True)[:, 0] >= k[:, 0]
    cut = largest_true(pred, lo, hi)
    keep = (keys >= cut[:, None]) | (k >= logits.shape[1])
    return jnp.where(keep, logits, NEG_INF)


def _mass_threshold(p, mass):
    """Largest t such that the tokens with p >= t carry at least `mass` ([S] -> key [S])."""
    keys = sort_key(p)
    s = p.shape[0]
    pred = lambda t: jnp.sum(jnp.where(keys >= t[:, None], p, 0.0), axis=-1) >= mass
    return keys, largest_true(pred, jnp.zeros((s,), jnp.uint32), jnp.max(keys, axis=-1))


def apply_top_p(logits, rows: SamplingRows, state: SamplerState):
    """Smallest set of most likely tokens whose mass >= top_p; the max is always kept."""
    p = jax.nn.softmax(logits, axis=-1)
    keys, cut = _mass_threshold(p, rows.top_p)
    keep = (keys >= cut[:, None]) | (logits >= _row_max(logits))
    return jnp.where(keep, logits, NEG_INF)


def apply_typical(logits, rows: SamplingRows, state: SamplerState):
    """HF TypicalLogitsWarper: keep the tokens whose surprise is closest to the entropy,
    fewest first, until their mass reaches typical_p."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(logp)
    entropy = -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1, keepdims=True)
    shifted = jnp.abs(-logp - entropy)
    shifted = jnp.where(jnp.isfinite(shifted), shifted, jnp.inf)
    # smallest s with mass(shifted <= s) >= typical_p == largest on the reversed key
    keys = ~sort_key(shifted)   # larger key == smaller shift
    s = logits.shape[0]
    mass = rows.typical_p
    pred = lambda t: jnp.sum(jnp.where(keys >= t[:, None], p, 0.0), axis=-1) >= mass
    cut = largest_true(pred, jnp.zeros((s,), jnp.uint32), jnp.max(keys, axis=-1))
    keep = (keys >= cut[:, None]) | (logits >= _row_max(logits))
    return jnp.where(keep, logits, NEG_INF)


def apply_epsilon(logits, rows: SamplingRows, state: SamplerState):
    """HF EpsilonLogitsWarper: drop p < epsilon, keeping the most likely token."""
    p = jax.nn.softmax(logits, axis=-1)
    keep = (p >= rows.epsilon[:, None]) | (logits >= _row_max(logits))
    return jnp.where(keep, logits, NEG_INF)


def apply_eta(logits, rows: SamplingRows, state: SamplerState):
    """HF EtaLogitsWarper: drop p < min(eta, sqrt(eta) * exp(-entropy)), keeping the max."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(logp)
    entropy = -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)
    eta = rows.eta
    cut = jnp.minimum(eta, jnp.sqrt(eta) * jnp.exp(-entropy))[:, None]
    keep = (p >= cut) | (logits >= _row_max(logits))
    return jnp.where(keep, logits, NEG_INF)


def apply_xtc(logits, rows: SamplingRows, state: SamplerState, uniform):
    """llama.cpp XTC: with probability P, drop every token with p >= threshold except the
    least likely of them (only when at least two are above the threshold)."""
    p = jax.nn.softmax(logits, axis=-1)
    above = p >= rows.xtc_threshold[:, None]
    n_above = jnp.sum(above, axis=-1)
    least = jnp.min(jnp.where(above, p, jnp.inf), axis=-1, keepdims=True)
    fire = (uniform < rows.xtc_probability) & (n_above >= 2)
    drop = above & (p > least) & fire[:, None]
    return jnp.where(drop, NEG_INF, logits)


def apply_mirostat(logits, rows: SamplingRows, mu):
    """Mirostat v2 truncation: drop tokens whose surprise -log2 p exceeds mu (keep the max)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    surprise = -logp / math.log(2.0)
    keep = (surprise <= mu[:, None]) | (logits >= _row_max(logits))
    return jnp.where(keep, logits, NEG_INF)
