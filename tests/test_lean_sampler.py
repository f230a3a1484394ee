"""The lean sampler program (sampling/sampler.py, `lean=True`) against the full one.

The engine runs the lean program while no live row needs a stage outside the common ones
(`needs_full`), and the full one otherwise, so a row moves between the two as other
requests come and go: for rows that only use lean stages both must give bitwise the same
tokens, logprobs, top logprobs and sampler state, step after step.
"""

import jax
import jax.numpy as jnp
import numpy as np
from sampling.params import SamplingParams
from sampling.rows import make_rows
from sampling.sampler import needs_full, sample
from sampling.state import init_state, reset_row

V, L, TOP = 300, 64, 5

LEAN = [
    SamplingParams(temperature=0.0, logprobs=True, top_logprobs=5),
    SamplingParams(temperature=0.8, top_p=0.9, seed=1),
    SamplingParams(temperature=1.3, top_k=20, seed=2, logprobs_mode="processed"),
    SamplingParams(temperature=0.7, min_p=0.1, seed=3, top_k=150),     # top-k past the candidates
    SamplingParams(temperature=0.9, top_p=0.5, repetition_penalty=1.3, frequency_penalty=0.5,
                   presence_penalty=0.4, seed=4, logit_bias={7: 3.0, 9: -100.0}),
    SamplingParams(temperature=1.0, min_tokens=3, stop_token_ids=[11], seed=5,
                   presence_frequency_scope="prompt_and_output"),
]
FULL = [
    SamplingParams(typical_p=0.9), SamplingParams(mirostat_mode=2),
    SamplingParams(return_entropy=True), SamplingParams(logprobs_mode="all"),
    SamplingParams(logprobs_mode="unconstrained"), SamplingParams(top_p=0.9, top_p_decay=0.9),
    SamplingParams(repetition_penalty=1.2, penalty_window=8), SamplingParams(dynatemp_range=0.5),
    SamplingParams(dry_multiplier=0.8), SamplingParams(no_repeat_ngram_size=2),
    SamplingParams(bad_words_ids=[[5, 6]]), SamplingParams(temperature_last=True),
    SamplingParams(sampler_order=["top_k", "temperature"]), SamplingParams(xtc_probability=0.5),
    SamplingParams(adaptive_p_target=0.5), SamplingParams(min_k=True), SamplingParams(p_less=True),
    SamplingParams(top_n_sigma=1.0), SamplingParams(epsilon_cutoff=0.01),
    SamplingParams(eta_cutoff=0.01),
]


def _rows(params):
    return make_rows(params, V, [p.seed or 0 for p in params], [0] * len(params), eos_ids=(2,))


def test_needs_full_picks_the_rows_a_lean_program_cannot_serve():
    assert not needs_full(_rows(LEAN)).any()
    assert needs_full(_rows(FULL)).all()
    # a stage that is off for greedy rows does not need the full program there
    assert not needs_full(_rows([SamplingParams(temperature=0.0, typical_p=0.5)]))[0]


def test_lean_equals_full_bitwise():
    rng = np.random.default_rng(0)
    s = len(LEAN) + 1
    state = init_state(s, V, L)
    for slot in range(s):      # a prompt per row (penalties and min_tokens read it)
        prompt = np.zeros(L, np.int32)
        prompt[:12] = rng.integers(0, V, 12)
        state = reset_row(state, slot, jnp.asarray(prompt), 12, _rows([LEAN[0]]))
    # the last row: greedy (a lean batch) or typical-p (the full program must run)
    lean_rows = jax.tree.map(jnp.asarray, _rows(LEAN + [SamplingParams(temperature=0.0)]))
    full_rows = jax.tree.map(jnp.asarray, _rows(LEAN + [SamplingParams(typical_p=0.5, seed=9)]))
    mask = jnp.asarray(rng.random((s, V)) > 0.2)     # the engine always passes one
    run = jax.jit(lambda lg, r, st, lean: sample(lg, r, st, num_top=TOP, mask=mask,
                                                 custom_order=False, lean=lean),
                  static_argnums=(3,))
    lean_state = full_state = state
    for step in range(4):
        logits = jnp.asarray(rng.normal(0.0, 3.0, (s, V)).astype(np.float32))
        a, lean_state = run(logits, lean_rows, lean_state, True)
        b, full_state = run(logits, full_rows, full_state, False)
        for field in ("tokens", "logprob", "raw_logprob", "processed_logprob", "rank",
                      "top_ids", "top_logprobs", "error", "unconstrained_logprob",
                      "removed_mass", "entropy"):
            x, y = np.asarray(getattr(a, field))[:-1], np.asarray(getattr(b, field))[:-1]
            assert x.tobytes() == y.tobytes(), (step, field, x, y)
        for field, x in vars(lean_state).items():
            y = getattr(full_state, field)
            assert np.asarray(x)[:-1].tobytes() == np.asarray(y)[:-1].tobytes(), (step, field)
        full_state = lean_state    # the same history from here (only the last rows differ)
