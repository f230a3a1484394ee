"""Edge cases and validation: greedy, no-op settings, all-masked rows, logit_bias, -inf,
the -9999 floor, out-of-range values, per-row sampler_order and registered processors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sampling import registry
from sampling.params import SamplingParams
from sampling.rows import make_rows
from sampling.sampler import LOGPROB_FLOOR, process_logits, sample
from sampling.state import init_state, reset_row

V = 50
MAX_LEN = 16

_sample = jax.jit(sample, static_argnames="num_top")
_process = jax.jit(process_logits)


ROWS = 4   # every test pads its batch to 4 rows (None = a disabled greedy row): one compile


def setup(params, seeds=None, prompt=(1, 2)):
    params = list(params) + [None] * (ROWS - len(params))
    n = ROWS
    seeds = list(seeds or range(len(params))) + [0] * (ROWS - len(seeds or params))
    rows = make_rows(params, V, seeds, [0] * n, eos_ids=[0])
    st = init_state(n, V, MAX_LEN)
    ids = np.zeros(MAX_LEN, np.int32)
    ids[:len(prompt)] = prompt
    for slot in range(n):
        st = reset_row(st, slot, jnp.asarray(ids), len(prompt),
                       jax.tree.map(lambda a: a[slot:slot + 1], rows))
    return rows, st


def logits_for(n=ROWS, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((ROWS, V)).astype(np.float32) * 2)


def pad(x):
    x = np.asarray(x, np.float32)
    return jnp.asarray(np.concatenate([x, np.zeros((ROWS - len(x), V), np.float32)]))


def test_temperature_zero_is_argmax_whatever_the_warpers():
    params = [SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.0, top_k=3, top_p=0.1, xtc_probability=1.0,
                             typical_p=0.2, min_p=0.9)]
    rows, st = setup(params)
    x = logits_for(2)
    for _ in range(3):
        out, st = _sample(x, rows, st, num_top=5)
        np.testing.assert_array_equal(out.tokens[:2], np.argmax(np.asarray(x), axis=-1)[:2])


@pytest.mark.parametrize("params", [dict(top_k=V + 10), dict(top_k=V), dict(top_p=1.0),
                                    dict(top_k=-1), dict(min_p=0.0), dict(typical_p=1.0)])
def test_noop_settings_change_nothing(params):
    rows, st = setup([SamplingParams(**params)])
    x = logits_for(1)
    np.testing.assert_array_equal(_process(x, rows, st)[0], x[0])


def test_all_masked_row_is_an_error_not_nan():
    bad = SamplingParams(allowed_token_ids=[3, 4], bad_words_ids=[[3], [4]], seed=1)
    ok = SamplingParams(seed=2, logprobs=True, top_logprobs=5)
    rows, st = setup([bad, ok])
    out, st = _sample(logits_for(2), rows, st, num_top=5)
    assert bool(out.error[0]) and not bool(out.error[1])
    assert int(out.tokens[0]) == 0
    for field in (out.logprob, out.raw_logprob, out.processed_logprob, out.top_logprobs,
                  out.entropy):
        assert np.all(np.isfinite(np.asarray(field)))
    assert float(out.logprob[0]) == LOGPROB_FLOOR


def test_nan_logits_flag_the_row_only():
    x = np.asarray(logits_for(2)).copy()
    x[0, 7] = np.nan
    rows, st = setup([SamplingParams(seed=1), SamplingParams(seed=2)])
    out, _ = _sample(pad(x), rows, st, num_top=5)
    assert out.error.tolist() == [True, False, False, False]
    assert np.all(np.isfinite(np.asarray(out.top_logprobs)))


def test_logit_bias_plus_100_forces_the_token():
    rows, st = setup([SamplingParams(logit_bias={17: 100.0}, seed=s) for s in range(4)])
    out, _ = _sample(logits_for(4), rows, st, num_top=5)
    assert out.tokens.tolist() == [17] * 4  # 4 seeds


def test_minus_inf_is_never_turned_finite():
    x = np.asarray(logits_for(1)).copy()
    x[0, [5, 6]] = -np.inf
    params = SamplingParams(logit_bias={5: 100.0}, repetition_penalty=0.5,
                            frequency_penalty=-2.0, presence_penalty=-2.0, temperature=0.5,
                            dry_multiplier=1.0)
    rows, st = setup([params], prompt=(5, 6, 5, 6, 5))
    got = np.asarray(_process(pad(x), rows, st))
    assert np.isneginf(got[0, 5]) and np.isneginf(got[0, 6])
    rows, st = setup([SamplingParams(logit_bias={5: 100.0}, seed=3)])
    out, _ = _sample(pad(x), rows, st, num_top=5)
    assert int(out.tokens[0]) not in (5, 6)


def test_sampled_token_logprob_is_returned_outside_the_top_n_and_floored():
    params = SamplingParams(logit_bias={11: 100.0}, logprobs=True, top_logprobs=2)
    x = np.asarray(logits_for(1)).copy()
    x[0, 11] = -30.0
    rows, st = setup([params])
    out, _ = _sample(pad(x), rows, st, num_top=2)
    assert int(out.tokens[0]) == 11 and 11 not in out.top_ids[0].tolist()
    lp = np.asarray(jax.nn.log_softmax(jnp.asarray(x)))[0, 11]
    np.testing.assert_allclose(float(out.logprob[0]), lp, rtol=1e-5)      # raw mode
    assert int(out.rank[0]) == 1 + int(np.sum(x[0] > x[0, 11]))
    processed = SamplingParams(top_k=1, logprobs_mode="processed", logprobs=True, top_logprobs=5)
    rows, st = setup([processed])
    out, _ = _sample(pad(x), rows, st, num_top=5)
    assert float(out.logprob[0]) == 0.0
    assert np.asarray(out.top_logprobs)[0, 1:].tolist() == [LOGPROB_FLOOR] * 4


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 1.2),
    ("typical_p", 0.0), ("epsilon_cutoff", 1.0), ("eta_cutoff", -0.1), ("top_n_sigma", -1.0),
    ("xtc_probability", 1.1), ("xtc_threshold", 0.6), ("dynatemp_range", -1.0),
    ("mirostat_mode", 1), ("repetition_penalty", 0.0), ("presence_penalty", 2.5),
    ("frequency_penalty", -2.1), ("penalty_window", -1), ("dry_base", 1.0),
    ("no_repeat_ngram_size", -1), ("min_tokens", -1), ("max_tokens", 0),
    ("top_logprobs", 21), ("logprobs_mode", "weird"), ("seed", 2 ** 64), ("n", 0),
    ("temperature", float("nan")), ("logit_bias", {3: 100.5}), ("logit_bias", {V: 1.0}),
    ("allowed_token_ids", [V]), ("sampler_order", ["top_k", "nope"]),
    ("repetition_penalty_scope", "all"), ("logits_processors", [{"name": "missing"}]),
])
def test_out_of_range_is_a_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field.split("_")[0]):
        SamplingParams.from_dict({field: value}, vocab_size=V)


def test_unknown_keys_are_an_error():
    with pytest.raises(ValueError, match="top_kk"):
        SamplingParams.from_dict({"top_kk": 3})


def test_valid_extremes_are_accepted_unchanged():
    p = SamplingParams.from_dict({"logit_bias": {"3": -100}, "seed": 2 ** 64 - 1, "top_p": 1.0,
                                  "presence_penalty": 2.0, "temperature": 0.0}, vocab_size=V)
    assert p.logit_bias == {3: -100} and p.seed == 2 ** 64 - 1 and p.presence_penalty == 2.0


def test_sampler_order_is_per_row():
    """top_p before top_k differs from top_k before top_p; both in one batch."""
    x = np.zeros((2, V), np.float32)
    x[:, :6] = [3.0, 2.9, 2.8, 0.5, 0.4, 0.3]
    base = dict(top_k=2, top_p=0.6)
    params = [SamplingParams(**base),
              SamplingParams(**base, sampler_order=["top_p", "top_k"])]
    rows, st = setup(params)
    got = np.asarray(_process(pad(x), rows, st))
    # default: top_k keeps 2 of the three near-equal ones; renormalised, top_p 0.6 keeps both
    assert np.isfinite(got[0]).sum() == 2
    # top_p first on the full distribution keeps the three big ones, then top_k keeps 2
    p = np.exp(x[1]) / np.exp(x[1]).sum()
    order = np.argsort(-p)
    n_top_p = int(np.searchsorted(np.cumsum(p[order]), 0.6) + 1)
    assert np.isfinite(got[1]).sum() == min(2, n_top_p)
    # a row that leaves a stage out of its order does not run it
    rows, st = setup([SamplingParams(top_k=1, temperature=0.5, sampler_order=["temperature"])])
    assert np.isfinite(np.asarray(_process(pad(x[:1]), rows, st))[0]).sum() == V


def test_temperature_last_preset():
    p = SamplingParams(temperature_last=True)
    assert p.order()[-1] == "temperature"


def test_registered_processor_runs_per_row_and_rejects_unknown_args():
    @registry.register("test_shift", amount=0.0)
    def shift(logits, args, state):
        return logits + args["amount"][:, None] * (jnp.arange(logits.shape[1]) == 3)

    try:
        params = [SamplingParams(logits_processors=[{"name": "test_shift", "args": {"amount": 50.0}}],
                                 seed=1),
                  SamplingParams(seed=1)]
        rows, st = setup(params)
        x = logits_for(2)
        got = np.asarray(jax.jit(process_logits)(x, rows, st))  # compiles: the registry grew
        np.testing.assert_allclose(got[0, 3], np.asarray(x)[0, 3] + 50.0)
        np.testing.assert_array_equal(got[1], np.asarray(x)[1])
        with pytest.raises(ValueError, match="unknown parameter"):
            SamplingParams(logits_processors=[{"name": "test_shift", "args": {"amnt": 1}}]).validate()
    finally:
        registry.unregister("test_shift")
    with pytest.raises(ValueError, match="unknown processor"):
        SamplingParams(logits_processors=[{"name": "test_shift"}]).validate()
