"""Min-k and p-less: two truncations that need no tuned cutoff.

Min-k (Ding et al., "Min-k Sampling: Decoupling Truncation from Temperature Scaling via
Relative Logit Dynamics", ACL 2026, arXiv 2604.11012; proposed to vLLM in PR #48142).
Sort the finite logits l_1 >= l_2 >= ... >= l_n, R = l_1 - l_n, and weigh each drop by its
rank:  w_i = (l_i - l_{i+1}) / R / i  (i = 1..n-1).  The cut is the "semantic cliff"
k_cliff = argmax_i w_i (the first on ties); a fallback keeps k_fb = floor(tau / R) tokens
when the distribution is flat; keep the k = max(k_cliff, k_fb) most likely tokens (every
token tied with the k-th stays, our tie policy). R == 0 keeps everything. Tokens removed
by an earlier stage (-inf) are not part of the sorted list. The paper applies it before
temperature (the cut is invariant to T, the fallback is not), and so does our default
order. Exact without a full sort when the cliff lies among the 128 most likely tokens: every
later w_i is below (l_129 - l_n) / R / 129, or below the best candidate's when a bucket
test shows no later drop is that large (`_no_tail_gap`); the other rows are sorted.

p-less (Tan, Wu and Howard, "p-less Sampling: A Robust Hyperparameter-Free Approach for
LLM Decoding", ICLR 2026, arXiv 2509.23234; vLLM PR #48136): keep the tokens with
p >= sum_j p_j^2 (the collision probability, exp(-H_2)) of the current (temperature-
scaled) distribution. The most likely token always qualifies (sum p^2 <= max p); it is
also kept explicitly, against float rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sampling.rows import SamplingRows
from sampling.state import SamplerState

CANDIDATES = 128


def _cut(sorted_desc: jax.Array, n: jax.Array, lo: jax.Array, tau: jax.Array):
    """From the m largest logits of each row (descending, -inf padded) with n finite logits
    and lo the smallest finite one: the kept count k [S], the best weight among these
    candidates [S] and the range R [S]."""
    m = sorted_desc.shape[1]
    hi = sorted_desc[:, 0]
    r = hi - lo
    drops = sorted_desc[:, :-1] - sorted_desc[:, 1:]                 # [S, m-1]
    i = jnp.arange(1, m, dtype=jnp.float32)
    valid = i[None, :] < n[:, None]                                  # both ends finite
    w = jnp.where(valid, drops / jnp.where(r > 0, r, 1.0)[:, None] / i[None, :], -1.0)
    k_cliff = jnp.argmax(w, axis=-1) + 1
    k_fb = jnp.floor(tau / jnp.where(r > 0, r, 1.0))
    k = jnp.maximum(k_cliff.astype(jnp.float32), k_fb)
    k = jnp.where(r > 0, jnp.minimum(k, n.astype(jnp.float32)), n.astype(jnp.float32))
    return k.astype(jnp.int32), jnp.max(w, axis=-1), r


TAIL_BUCKETS = 64


def _no_tail_gap(logits, lo, edge, gap):
    """bool [S]: every drop between consecutive sorted logits in [lo, edge] is below `gap`
    (so no tail drop, whose rank is >= m, can beat the best candidate). Exact test without a
    sort: buckets of width gap / 2 over [lo, edge] all occupied => every drop < gap. Rows
    needing more than TAIL_BUCKETS buckets answer False (they are sorted)."""
    s = logits.shape[0]
    width = gap / 2.0
    count = jnp.ceil((edge - lo) / jnp.where(width > 0, width, 1.0))
    usable = (width > 0) & (count <= TAIL_BUCKETS)
    tail = jnp.isfinite(logits) & (logits <= edge[:, None])
    b = jnp.floor((logits - lo[:, None]) / jnp.where(width > 0, width, 1.0)[:, None])
    b = jnp.clip(jnp.where(tail, b, TAIL_BUCKETS), 0, TAIL_BUCKETS).astype(jnp.int32)
    b = jnp.minimum(b, jnp.maximum(count - 1, 0).astype(jnp.int32)[:, None])
    b = jnp.where(tail, b, TAIL_BUCKETS)
    occupied = jnp.zeros((s, TAIL_BUCKETS + 1), bool).at[jnp.arange(s)[:, None], b].set(True)
    need = jnp.arange(TAIL_BUCKETS)[None, :] < count[:, None]
    return usable & jnp.all(occupied[:, :TAIL_BUCKETS] | ~need, axis=-1)


def apply_min_k(logits: jax.Array, rows: SamplingRows, state: SamplerState) -> jax.Array:
    """Keep each row's min-k set (module docstring)."""
    s, v = logits.shape
    finite = jnp.isfinite(logits)
    n = jnp.sum(finite, axis=-1).astype(jnp.int32)
    lo = jnp.min(jnp.where(finite, logits, jnp.inf), axis=-1)
    tau = rows.min_k_tau
    m = min(CANDIDATES + 1, v)
    # the barrier keeps XLA's CPU backend on its top-k kernel: slicing the result directly
    # makes it lower top_k to a full sort (10x slower at [16, 4096])
    top = jax.lax.optimization_barrier(jax.lax.top_k(logits, m)[0])
    k, best, r = _cut(top, n, lo, tau)
    # every drop past the candidates is part of (l_m - lo), and its rank is >= m
    rest = jnp.where(n > m, (top[:, -1] - lo) / jnp.where(r > 0, r, 1.0) / m, 0.0)
    fast = (n <= m) | ((best > rest) & (k <= m))
    fast = fast | jax.lax.cond(jnp.any(~fast),
                               lambda: _no_tail_gap(logits, lo, top[:, -1], best * r * m) & (k <= m),
                               lambda: fast)

    def full():
        return _cut(-jnp.sort(-logits, axis=-1), n, lo, tau)[0]

    k = jnp.where(fast, k, jax.lax.cond(jnp.any(~fast), full, lambda: k))
    kth_from = lambda a: jnp.take_along_axis(a, jnp.clip(k - 1, 0, a.shape[1] - 1)[:, None],
                                             axis=-1)
    kth = jax.lax.cond(jnp.all(k <= m), lambda: kth_from(top),
                       lambda: kth_from(-jnp.sort(-logits, axis=-1)))
    return jnp.where(logits >= kth, logits, -jnp.inf)


def apply_p_less(logits: jax.Array, rows: SamplingRows, state: SamplerState) -> jax.Array:
    """Keep p >= sum p^2 (and the most likely token)."""
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    logp = logits - lse
    collision = jnp.sum(jnp.where(jnp.isfinite(logp), jnp.exp(2.0 * logp), 0.0), axis=-1,
                        keepdims=True)
    keep = (logp >= jnp.log(collision)) | (logits >= jnp.max(logits, axis=-1, keepdims=True))
    return jnp.where(keep, logits, -jnp.inf)
