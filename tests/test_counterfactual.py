"""Counterfactual logprobs under a constraint (logprobs_mode "unconstrained" / "all"):
in the sampler against a numpy reference, in process (LocalModel with a guided regex) and
over a real gRPC server, where the unconstrained logprobs equal a plain request's logprobs
(prompt_logprobs, no constraint) on the same prefix."""

import math

import numpy as np
import pytest

from model.scoring import prompt_logprobs
from sampling.params import SamplingParams
from sampling.rows import make_rows
from sampling.sampler import sample
from sampling.state import init_state

REGEX = r"(yes|no|maybe)-[0-9]{2}"


def _np_log_softmax(x):
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def test_sampler_unconstrained_is_the_unmasked_pass_and_mass_matches_numpy():
    rng = np.random.default_rng(0)
    s, v = 3, 64
    logits = rng.normal(size=(s, v)).astype(np.float32) * 3
    mask = rng.random((s, v)) < 0.3
    mask[:, 0] = True
    params = SamplingParams(temperature=0.7, top_k=40, logprobs=True, top_logprobs=20,
                            logprobs_mode="unconstrained")
    plain = SamplingParams(**{**params.to_dict(), "logprobs_mode": "processed"})
    state = init_state(s, v, 16)
    out, _ = sample(logits, make_rows([params] * s, v, [1, 2, 3], [0] * s), state,
                    mask=mask, num_top=20)
    ref, _ = sample(logits, make_rows([plain] * s, v, [1, 2, 3], [0] * s), state, num_top=20)
    # the unconstrained distribution is exactly the plain, unmasked one
    np.testing.assert_array_equal(np.asarray(out.top_ids), np.asarray(ref.top_ids))
    np.testing.assert_array_equal(np.asarray(out.top_logprobs), np.asarray(ref.top_logprobs))
    # numpy reference of the rule: temperature, top-k 40, then the mass outside the mask
    x = logits / 0.7
    kth = np.sort(x, axis=-1)[:, -40][:, None]
    x = np.where(x >= kth, x, -np.inf)
    p = np.exp(_np_log_softmax(x))
    removed = np.sum(np.where(mask, 0.0, p), axis=-1)
    np.testing.assert_allclose(np.asarray(out.removed_mass), removed, rtol=1e-5, atol=1e-6)
    tok = np.asarray(out.tokens)
    assert mask[np.arange(s), tok].all()                     # sampled under the constraint
    unc = _np_log_softmax(x)[np.arange(s), tok]
    np.testing.assert_allclose(np.asarray(out.unconstrained_logprob), unc, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.logprob), unc, atol=1e-5)  # the mode's logprob
    # (the constrained logprob is not unc - log(1 - removed) here: the mask is stage 1, so
    # top-k keeps the 40 best *allowed* tokens; the in-process test checks that identity)


def test_rows_that_do_not_ask_are_unchanged():
    rng = np.random.default_rng(1)
    s, v = 2, 48
    logits = rng.normal(size=(s, v)).astype(np.float32)
    mask = rng.random((s, v)) < 0.5
    mask[:, 1] = True
    ask = SamplingParams(temperature=0.9, logprobs=True, logprobs_mode="all")
    other = SamplingParams(temperature=0.9, logprobs=True)
    state = init_state(s, v, 8)
    mixed, _ = sample(logits, make_rows([ask, other], v, [5, 6], [0, 0]), state, mask=mask)
    alone, _ = sample(logits, make_rows([other, other], v, [5, 6], [0, 0]), state, mask=mask)
    for f in ("tokens", "logprob", "top_ids", "top_logprobs"):
        assert np.array_equal(np.asarray(getattr(mixed, f))[1], np.asarray(getattr(alone, f))[1])
    assert float(mixed.removed_mass[0]) > 0.0 and float(alone.removed_mass[1]) == 0.0


def test_bad_logprobs_mode_names_the_field():
    with pytest.raises(ValueError, match="logprobs_mode"):
        SamplingParams(logprobs_mode="counterfactual").validate(100)


@pytest.fixture(scope="module")
def lm():
    from serving.local import LocalModel
    return LocalModel("default", max_slots=2, max_len=128)


def test_local_model_guided_all_modes(lm):
    ids = lm.encode("Answer:")
    p = SamplingParams(temperature=1.0, max_tokens=12, guided_regex=REGEX, logprobs=True,
                       logprobs_mode="all")
    c = lm.generate([ids], p, seeds=[3])[0]
    import re
    assert re.fullmatch(REGEX, c.text), c.text
    n = len(c.token_ids)
    assert len(c.unconstrained_logprobs) == len(c.removed_mass) == n
    removed = np.asarray(c.removed_mass)
    assert (removed >= 0).all() and (removed <= 1).all() and removed.max() > 0.5
    # temperature 1 and nothing else: unconstrained = raw; constrained renormalises
    np.testing.assert_allclose(c.unconstrained_logprobs, c.raw_logprobs, atol=1e-6)
    np.testing.assert_allclose(c.constrained_logprobs, np.asarray(c.raw_logprobs)
                               - np.log1p(-np.minimum(removed, 1 - 1e-7)), atol=2e-3)
    assert c.logprobs == c.constrained_logprobs       # "all" reports the sampled-from one
    # the unconstrained logprobs = a plain request's logprobs on the same prefix
    plain = prompt_logprobs(lm.config, lm.params, list(ids) + c.token_ids)[0][len(ids) - 1:]
    np.testing.assert_allclose(c.unconstrained_logprobs, plain, atol=1e-4)


@pytest.fixture(scope="module")
def grpc_setup(lm):
    from serving.client import EngineClient
    from serving.engine.server import start_in_process
    srv = start_in_process(lm.config, lm.params, max_slots=2, max_len=128,
                           prefill_buckets=(16, 32), tokenizer=lm.tokenizer,
                           model_name="default", model_dir=lm.model_dir, warmup=False)
    client = EngineClient(f"127.0.0.1:{srv.port}")
    yield client
    client.close()
    srv.stop(grace_s=5)


def test_grpc_unconstrained_equals_plain_prefix(lm, grpc_setup):
    client = grpc_setup
    ids = lm.encode("The answer is")
    g = client.generate(ids, {"temperature": 1.0, "seed": 7, "max_tokens": 12, "logprobs": True,
                              "guided_regex": REGEX, "logprobs_mode": "unconstrained"})
    toks = list(g.choices[0].token_ids)
    lps = g.choices[0].logprobs
    assert len(lps) == len(toks) and all(lp.HasField("removed_mass") for lp in lps)
    plain = client.generate(list(ids) + toks, {"max_tokens": 1, "prompt_logprobs": 0})
    ref = [lp.logprob for lp in plain.usage.prompt_logprobs][len(ids) - 1:]
    got = [lp.logprob for lp in lps]
    np.testing.assert_allclose(got, ref, atol=1e-4)
    np.testing.assert_allclose(got, [lp.unconstrained_logprob for lp in lps], atol=0)
    assert max(lp.removed_mass for lp in lps) > 0.5
    assert all(math.isfinite(lp.constrained_logprob) for lp in lps)


@pytest.fixture(scope="module")
def http_servers(tmp_path_factory):
    from tests.http_fixtures import start_servers
    yield from start_servers(tmp_path_factory)


def test_http_chat_and_completions_carry_the_counterfactual_fields(http_servers):
    import openai
    from tests.http_fixtures import API_KEY
    client = openai.OpenAI(base_url=http_servers.base_url + "/v1", api_key=API_KEY,
                           max_retries=0)
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "pick"}], logprobs=True,
        max_tokens=10, seed=3, extra_body={"guided_choice": ["yes", "no"],
                                           "logprobs_mode": "all"})
    content = r.choices[0].logprobs.content
    assert r.choices[0].message.content in ("yes", "no") and content
    for t in content:
        x = t.model_extra
        assert t.logprob == x["constrained_logprob"]           # "all": the sampled-from one
        assert 0.0 <= x["removed_mass"] <= 1.0
        assert x["unconstrained_logprob"] == x["raw_logprob"]   # temperature 1, nothing else
    assert max(t.model_extra["removed_mass"] for t in content) > 0.5
    plain = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "pick"}], logprobs=True,
        max_tokens=3, seed=3)
    assert all("removed_mass" not in (t.model_extra or {}) for t in plain.choices[0].logprobs.content)
    c = client.completions.create(model="tiny", prompt="pick", logprobs=0, max_tokens=10,
                                  extra_body={"guided_regex": "(ab|cd)+", "logprobs_mode":
                                              "unconstrained"})
    cf = c.choices[0].logprobs.model_extra["counterfactual"]
    assert len(cf) == len(c.choices[0].logprobs.tokens)
    assert [x["unconstrained_logprob"] for x in cf] == c.choices[0].logprobs.token_logprobs
    with pytest.raises(openai.BadRequestError, match="logprobs_mode"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       extra_body={"logprobs_mode": "sideways"})
