"""Dynamic top-p (TensorRT-LLM's top_p_decay / top_p_min / top_p_reset_ids) inside the
jitted sampler, against a numpy reference, on logits recorded from the default model.

The reference follows TensorRT-LLM's rule: the first token uses top_p; after each token
p = top_p if the token is a reset id, else max(p * decay, floor); top-p keeps the smallest
set of most likely tokens whose mass reaches p (ties at the cut kept, the max always kept).
Each step feeds the same recorded logits row to every row of the batch, so the sampled
tokens (the sampler's own) decide the schedule, which the reference recomputes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints.loader import load_model
from checkpoints.tokenizer import load_tokenizer
from model.decoder import forward, init_cache
from sampling.params import SamplingParams
from sampling.rows import make_rows, set_row
from sampling.sampler import process_logits, sample
from sampling.state import init_state, reset_row

TEXT = ("The old man walked into the village at dawn. He looked at the river and the trees, "
        "and he thought about the long road that had brought him home.")
STEPS = 24
MAX_LEN = 64

_sample = jax.jit(sample, static_argnames=("num_top", "custom_order"))
_process = jax.jit(process_logits, static_argnames=("custom_order",))
_reset = jax.jit(reset_row)


@pytest.fixture(scope="module")
def recorded():
    """[STEPS, V] float32 logits of the default model at the first STEPS positions of TEXT,
    and the prompt ids."""
    config, params, model_dir = load_model("default")
    ids = load_tokenizer(model_dir).encode(TEXT, add_special_tokens=False)
    assert len(ids) > STEPS
    tokens = jnp.asarray([ids], jnp.int32)
    positions = jnp.arange(len(ids))[None]
    logits, _ = jax.jit(lambda p, t, pos: forward(config, p, init_cache(config, 1, len(ids)),
                                                  t, pos))(params, tokens, positions)
    return np.asarray(logits[0, :STEPS], np.float32), ids[:8]


def ref_keep(logits: np.ndarray, p: float) -> tuple[np.ndarray, float]:
    """Top-p keep mask, and how close the boundary's cumulative mass is to p (ambiguity)."""
    x = logits.astype(np.float64)
    if p >= 1.0:                         # top_p 1 is off: every token stays
        return np.isfinite(x), np.inf
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    order = np.argsort(-x, kind="stable")
    cum = np.cumsum(probs[order])
    j = int(np.argmax(cum >= p)) if np.any(cum >= p) else len(order) - 1
    keep = (x >= x[order[j]]) | (x >= x.max())
    return keep, float(np.min(np.abs(cum[max(j - 1, 0):j + 1] - p)))


def ref_next(p: np.float32, token: int, top_p, decay, floor, reset_ids) -> np.float32:
    if token in reset_ids:
        return np.float32(top_p)
    return np.maximum(np.float32(p) * np.float32(decay), np.float32(floor))


def run(recorded_logits, prompt, params: list[SamplingParams], seeds):
    """Step the jitted sampler STEPS times; per step the keep mask, tokens and state p."""
    s, v = len(params), recorded_logits.shape[1]
    rows = jax.tree.map(jnp.asarray, make_rows(params, v, seeds, [0] * s))
    state = init_state(s, v, MAX_LEN)
    padded = jnp.zeros((MAX_LEN,), jnp.int32).at[:len(prompt)].set(jnp.asarray(prompt))
    one = lambda r: jax.tree.map(lambda a: a[r:r + 1], rows)
    for r in range(s):
        state = _reset(state, r, padded, len(prompt), one(r))
        rows = set_row(rows, r, one(r))
    keeps, tokens, ps = [], [], []
    for t in range(STEPS):
        logits = jnp.asarray(np.tile(recorded_logits[t], (s, 1)))
        keeps.append(np.isfinite(np.asarray(_process(logits, rows, state))))
        ps.append(np.asarray(state.top_p))
        out, state = _sample(logits, rows, state, num_top=0)
        tokens.append(np.asarray(out.tokens))
    return np.array(keeps), np.array(tokens), np.array(ps)


def reference_check(recorded_logits, params, keeps, tokens):
    ambiguous = 0
    for r, p in enumerate(params):
        cur = np.float32(p.top_p)
        for t in range(STEPS):
            keep, margin = ref_keep(recorded_logits[t], float(cur))
            if margin > 1e-6:       # else float32 vs float64 mass may decide either way
                np.testing.assert_array_equal(keeps[t, r], keep, err_msg=f"row {r} step {t}")
            else:
                ambiguous += 1
            assert keep[tokens[t, r]], f"row {r} step {t}: drew a token top-p removes"
            if p.top_p_decay < 1.0:
                cur = ref_next(cur, int(tokens[t, r]), p.top_p, p.top_p_decay, p.top_p_min,
                               p.top_p_reset_ids)
    assert ambiguous <= 2


def test_schedule_and_kept_sets_match_the_reference(recorded):
    logits, prompt = recorded
    params = [
        SamplingParams(top_p=0.95, top_p_decay=0.9, top_p_min=0.3, seed=1),
        SamplingParams(top_p=1.0, top_p_decay=0.8, top_p_min=0.2, seed=2),
        SamplingParams(top_p=0.9, seed=3),                         # static top-p
        SamplingParams(top_p=0.99, top_p_decay=0.5, top_p_min=1e-6, seed=4),
    ]
    keeps, tokens, ps = run(logits, prompt, params, [1, 2, 3, 4])
    reference_check(logits, params, keeps, tokens)
    # the state's p is the reference schedule, bit for bit (float32 multiply and max)
    for r in (0, 1, 3):             # the decaying rows
        p = params[r]
        cur, expected = np.float32(p.top_p), []
        for t in range(STEPS):
            expected.append(cur)
            cur = ref_next(cur, int(tokens[t, r]), p.top_p, p.top_p_decay, p.top_p_min, [])
        got = np.where(ps[:, r] < 0, np.float32(p.top_p), ps[:, r])
        np.testing.assert_array_equal(got, np.array(expected, np.float32))
    # the decay reaches its floor
    assert ps[-1, 0] == np.float32(0.3) and ps[-1, 1] == np.float32(0.2)
    assert keeps[-1, 3].sum() == 1       # p ~ 1e-6: only the most likely token
    assert keeps[0, 3].sum() > 1


def test_reset_ids_restore_top_p(recorded):
    logits, prompt = recorded
    base = dict(top_p=0.97, top_p_decay=0.6, top_p_min=0.05, seed=11)
    _, first, base_ps = run(logits, prompt, [SamplingParams(**base)], [11])
    # a step k >= 3 whose token was not drawn before: the first reset happens there
    k = next(t for t in range(3, STEPS) if first[t, 0] not in first[:t, 0])
    reset_id = int(first[k, 0])
    p = SamplingParams(**base, top_p_reset_ids=[reset_id])
    keeps, tokens, ps = run(logits, prompt, [p], [11])
    np.testing.assert_array_equal(tokens[:k + 1, 0], first[:k + 1, 0])  # same draws up to it
    assert ps[k, 0] == base_ps[k, 0] < np.float32(0.25)     # decayed...
    assert ps[k + 1, 0] == np.float32(0.97)                 # ...and reset after drawing it
    reference_check(logits, [p], keeps, tokens)
    # a bare int is TensorRT-LLM's form (one reset id)
    assert SamplingParams.from_dict({"top_p_reset_ids": reset_id}).top_p_reset_ids == [reset_id]


def test_dynamic_rows_are_batch_invariant(recorded):
    logits, prompt = recorded
    p = SamplingParams(top_p=0.95, top_p_decay=0.85, top_p_min=0.1, seed=7)
    others = [SamplingParams(temperature=0.7, seed=8), SamplingParams(top_p=0.5, seed=9),
              SamplingParams(top_p=1.0, top_p_decay=0.5, top_p_min=0.5, seed=10)]
    _, alone, _ = run(logits, prompt, [p], [7])
    _, mixed, _ = run(logits, prompt, others[:2] + [p] + others[2:], [8, 9, 7, 10])
    np.testing.assert_array_equal(alone[:, 0], mixed[:, 2])


@pytest.mark.parametrize("fields,name", [
    ({"top_p_decay": 0.0}, "top_p_decay"),
    ({"top_p_decay": 1.5}, "top_p_decay"),
    ({"top_p_min": 0.0}, "top_p_min"),
    ({"top_p": 0.5, "top_p_min": 0.6}, "top_p_min"),
    ({"top_p_reset_ids": [-1]}, "top_p_reset_ids"),
    ({"top_p_reset_ids": list(range(9))}, "top_p_reset_ids"),
])
def test_bad_dynamic_top_p_values_name_the_field(fields, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams.from_dict(fields, vocab_size=100)


def test_a_resumed_sample_continues_its_schedule():
    """A sample preempted and resumed (DeviceEngine.insert with its output so far after
    `prompt_len`) draws what it would have drawn uninterrupted: its decayed p is replayed
    from those tokens, not restarted at top_p."""
    from model.config import named_config
    from model.decoder import init_params
    from serving.engine.device import DeviceEngine
    config = named_config("tiny", dtype="float32")
    engine = DeviceEngine(config, init_params(config, seed=3), max_slots=2, max_len=64,
                          prefill_buckets=(16, 32))
    prompt = np.array([5, 17, 99, 3, 250, 8, 41], np.int32)
    p = SamplingParams(top_p=1.0, top_p_decay=0.05, top_p_min=1e-6, seed=5)
    out = engine.insert(0, prompt, 0, p, 5).result()
    whole = [int(out.tokens[0])] + [int(engine.step().result().tokens[0]) for _ in range(9)]
    engine.release(0)
    k = 4
    resumed = np.concatenate([prompt, np.array(whole[:k], np.int32)])
    out = engine.insert(1, resumed, 0, p, 5, prompt_len=len(prompt)).result()
    rest = [int(out.tokens[0])] + [int(engine.step().result().tokens[1])
                                   for _ in range(len(whole) - k - 1)]
    engine.release(1)
    assert rest == whole[k:]
    # the same state by replaying the tokens as by stepping through them
    rows = jax.tree.map(jnp.asarray, make_rows([p], config.vocab_size, [5], [0]))
    tokens = jnp.asarray(resumed)
    expected = np.float32(1.0)
    for t in whole[:k]:
        expected = ref_next(expected, t, 1.0, 0.05, 1e-6, [])
    from sampling.dynamic_top_p import replay
    assert np.float32(replay(rows, tokens, len(prompt), len(resumed))) == expected
    assert float(replay(rows, tokens, 3, 3)) == -1.0
