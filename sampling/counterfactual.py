"""Counterfactual logprobs under a constraint: what the sampler would have given without it.

A grammar, JSON schema or forced tool choice reaches the sampler as a caller mask (stage 1,
sampling/sampler.py). The sampled-from ("processed") distribution is the constrained one;
the "raw" one is the model's before anything. Neither says what the request's own sampler
(its penalties, temperature, top-p ...) would have given had the constraint not been
there, nor how much probability the constraint took away: that needs stages 1-9 run a
second time without the mask. It runs only when a row asks (logprobs_mode "unconstrained"
or "all"), skipped with one batch-level `lax.cond` otherwise, so it costs nothing to rows
that do not ask, and a second sampler pass to steps that have one that does.

`removed_mass` is the probability the unconstrained distribution puts on the tokens the
constraint disallows (0 when nothing was removed, 1 - p_allowed in general).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def _pick(a: jax.Array, tokens: jax.Array) -> jax.Array:
    return jnp.take_along_axis(a, tokens[:, None], axis=-1)[:, 0]


def removed_mass(unconstrained_logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Mass of softmax(unconstrained_logits) on the tokens `mask` (True = allowed) drops.

    As 1 - the allowed mass, that mass taken from two logsumexps: summing the dropped
    probabilities in float32 left an error of ~1e-6 on a mass near 1, so 1 - removed (what
    a reader renormalises by) was off by a relative 0.4% when 3e-4 of the mass was kept."""
    lse = jax.nn.logsumexp(unconstrained_logits, axis=-1)
    allowed = jax.nn.logsumexp(jnp.where(mask, unconstrained_logits, -jnp.inf), axis=-1)
    return jnp.clip(1.0 - jnp.exp(allowed - lse), 0.0, 1.0)


def unconstrained(process: Callable[[], jax.Array], wanted: jax.Array, mask: jax.Array | None,
                  constrained: jax.Array, tokens: jax.Array):
    """(logits [S, V], logprob of `tokens` [S], removed mass [S]) without the constraint.

    `process()` runs the sampler's stages without the mask; it is called only when a row
    in `wanted` asks. Rows that did not ask (or steps without a mask) get the constrained
    logits back and a removed mass of 0."""
    def skip():
        lse = jax.nn.logsumexp(constrained, axis=-1)
        return (constrained, _pick(constrained, tokens) - lse,
                jnp.zeros(tokens.shape, jnp.float32))

    if mask is None:
        return skip()

    def compute():
        x = process()
        lse = jax.nn.logsumexp(x, axis=-1)
        return x, _pick(x, tokens) - lse, removed_mass(x, mask)

    return jax.lax.cond(jnp.any(wanted), compute, skip)
