"""Speculative decoding: the acceptance rule keeps the target distribution exactly, and the
decoding loop (prompt lookup, draft model) gives the plain greedy output token for token."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sampling import speculative as spec
from sampling.params import SamplingParams

V, K = 6, 3


def _rows(rng, n, sharp=1.0):
    x = rng.normal(size=(n, V)) * sharp
    p = np.exp(x)
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def test_residual_mixture_is_exactly_the_target():
    # sum over drafts d ~ q of [accept d w.p. min(1, p/q); else draw from the residual] = p
    rng = np.random.default_rng(0)
    p, q = _rows(rng, 1)[0], _rows(rng, 1)[0]
    total = np.zeros(V)
    for d in range(V):
        a = min(1.0, p[d] / q[d])
        total += q[d] * (a * np.eye(V)[d] + (1 - a) * np.asarray(spec.residual(p, q)))
    np.testing.assert_allclose(total, p, atol=1e-6)
    # a point mass (prompt lookup): keep d w.p. p(d), else p without d, renormalised
    for d in range(V):
        r = np.asarray(spec.residual(p, np.eye(V, dtype=np.float32)[d]))
        assert r[d] == 0.0
        np.testing.assert_allclose(p[d] * np.eye(V)[d] + (1 - p[d]) * r, p, atol=1e-6)
    # p == q: nothing is ever rejected, and the residual falls back to p (no NaN)
    np.testing.assert_allclose(spec.residual(p, p), p)


@pytest.mark.parametrize("draft", ["point", "model"])
def test_monte_carlo_every_position_has_the_target_distribution(draft):
    # p_j is the target after j accepted drafts; P(token j = y | j drafts accepted) must be
    # p_j(y) for every position j, whether the drafts are fixed (prompt lookup) or drawn
    # from q (a draft model)
    rng = np.random.default_rng(1)
    p = jnp.asarray(_rows(rng, K + 1, sharp=1.5))
    q = jnp.asarray(_rows(rng, K, sharp=1.5))
    # likely drafts, so that every position is reached often enough
    fixed = jnp.argmax(p[:K], axis=-1).astype(jnp.int32)
    n_samples = 200_000

    def one(key):
        kd, ka = jax.random.split(key)
        if draft == "point":
            drafts, qq = fixed, None
        else:
            drafts = jax.random.categorical(kd, jnp.log(q)).astype(jnp.int32)
            qq = q
        n, tok = spec.accept_sampled(p, drafts, ka, qq)
        return spec.emitted(drafts, n, tok), n

    keys = jax.random.split(jax.random.key(0), n_samples)
    out, n = jax.device_get(jax.jit(jax.vmap(one))(keys))
    assert out.shape == (n_samples, K + 1)
    for j in range(K + 1):
        reached = out[n >= j, j]          # rows where position j was emitted
        assert reached.size > 2_000
        freq = np.bincount(reached, minlength=V) / reached.size
        sigma = np.sqrt(np.asarray(p[j]) * (1 - np.asarray(p[j])) / reached.size)
        assert np.all(np.abs(freq - np.asarray(p[j])) < 5 * sigma + 1e-4), (j, freq, p[j])
    # the acceptance rate is the textbook one: E[min(1, p/q)] = 1 - TV(p, q) per position
    first_kept = np.mean(n >= 1)
    expected = (float(p[0, fixed[0]]) if draft == "point"
                else float(jnp.sum(jnp.minimum(p[0], q[0]))))
    assert abs(first_kept - expected) < 0.01


def test_greedy_acceptance_stops_at_the_first_mismatch():
    logits = jnp.asarray(np.eye(5, dtype=np.float32)[[1, 3, 0, 4]])   # argmax 1, 3, 0, 4
    n, tok = spec.accept_greedy(logits, jnp.asarray([1, 3, 2]))
    assert (int(n), int(tok)) == (2, 0)
    n, tok = spec.accept_greedy(logits, jnp.asarray([1, 3, 0]))
    assert (int(n), int(tok)) == (3, 4)                               # the bonus token
    assert list(np.asarray(spec.emitted(jnp.asarray([1, 3, 2]), jnp.int32(2), jnp.int32(0)))) \
        == [1, 3, 0, -1]


def test_propose_ngram_copies_what_followed_the_latest_match():
    toks = [5, 6, 7, 8, 9, 1, 5, 6, 7]
    assert list(spec.propose_ngram(toks, 3)) == [8, 9, 1]
    assert list(spec.propose_ngram([1, 2, 3, 4], 3)) == []           # no earlier occurrence
    assert list(spec.propose_ngram([4, 1, 2, 9, 1, 2, 7, 1, 2], 2)) == [7, 1]   # latest wins
    assert list(spec.propose_ngram([3, 3], 4)) == [3]                 # short continuation


# -- the decoding loop on a tiny random model -------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from model.config import named_config
    from model.decoder import init_params
    from serving.engine.device import DeviceEngine
    from serving.generate import generate

    config = named_config("tiny", dtype="float32")
    params = init_params(config, 0)
    rng = np.random.default_rng(0)
    prompt = np.tile(rng.integers(0, config.vocab_size, 12), 3).astype(np.int32)
    engine = DeviceEngine(config, params, max_slots=1, max_len=128, num_top_logprobs=1)
    ref = {}
    for max_tokens in (60, 128 - len(prompt)):
        ref[max_tokens] = generate(engine, None, prompt, SamplingParams(
            temperature=0.0, max_tokens=max_tokens), 0)[0]
    return config, params, prompt, ref


def test_greedy_prompt_lookup_and_draft_model_match_plain_greedy(tiny):
    from serving.speculative import SpeculativeDecoder

    config, params, prompt, ref = tiny
    greedy = SamplingParams(temperature=0.0, max_tokens=60)
    ngram = SpeculativeDecoder(config, params, method="ngram", num_tokens=3, max_len=128)
    r = ngram.generate(prompt, greedy, 0)
    assert r.token_ids == ref[60] and r.finish_reason == "length"
    assert r.accepted > 0 and r.verify_steps < 60          # the drafts did some work
    # up to the last cache row: iterations near the end verify no drafts (no write past
    # the cache) and the output is still the plain one
    limit = 128 - len(prompt)
    r = ngram.generate(prompt, SamplingParams(temperature=0.0, max_tokens=limit), 0)
    assert r.token_ids == ref[limit] and len(r.token_ids) == limit
    # the target as its own draft: every draft is kept
    same = SpeculativeDecoder(config, params, method="draft", num_tokens=3, max_len=128,
                              draft_config=config, draft_params=params)
    r = same.generate(prompt, greedy, 0)
    assert r.token_ids == ref[60] and r.acceptance_rate == 1.0
    # a different (random) draft model: still the target's output
    from model.decoder import init_params
    other = SpeculativeDecoder(config, params, method="draft", num_tokens=3, max_len=128,
                               draft_config=config, draft_params=init_params(config, 1))
    r = other.generate(prompt, greedy, 0)
    assert r.token_ids == ref[60] and r.acceptance_rate < 1.0


def test_adaptive_k_changes_k_mid_request_and_keeps_the_greedy_text(tiny):
    from serving.speculative import SpeculativeDecoder, k_ladder, next_k

    ladder = k_ladder(4)
    assert ladder == (1, 2, 4) and k_ladder(6) == (1, 2, 4, 6)
    assert next_k(ladder, 2, 2, 2) == 4 and next_k(ladder, 4, 4, 4) == 4   # all kept: up
    assert next_k(ladder, 4, 4, 0) == 2 and next_k(ladder, 4, 4, 3) == 4   # at most one down
    assert next_k(ladder, 1, 1, 0) == 1
    config, params, prompt, ref = tiny
    greedy = SamplingParams(temperature=0.0, max_tokens=60)
    r = SpeculativeDecoder(config, params, method="ngram", num_tokens=4,
                           max_len=128).generate(prompt, greedy, 0)
    assert r.token_ids == ref[60]
    assert len(set(r.k_trace) - {0}) >= 2 and r.proposed == sum(r.k_trace)   # K moved
    fixed = SpeculativeDecoder(config, params, method="ngram", num_tokens=4, max_len=128,
                               adaptive=False).generate(prompt, greedy, 0)
    assert fixed.token_ids == ref[60] and set(fixed.k_trace) <= {0, 4}


def test_seeded_sampling_is_reproducible_and_a_perfect_draft_is_always_kept(tiny):
    from serving.speculative import SpeculativeDecoder

    config, params, prompt, _ = tiny
    dec = SpeculativeDecoder(config, params, method="draft", num_tokens=3, max_len=128,
                             draft_config=config, draft_params=params)
    sp = SamplingParams(temperature=0.9, top_k=40, max_tokens=24)
    a, b, c = (dec.generate(prompt, sp, s) for s in (7, 7, 8))
    assert a.token_ids == b.token_ids != c.token_ids
    assert a.acceptance_rate == 1.0                          # p == q: u * q < p always
    assert all(0 <= t < config.vocab_size for t in a.token_ids)
    assert all(lp <= 0 for lp in a.logprobs)


def test_unsupported_parameters_and_bad_options_are_named(tiny):
    from serving.speculative import SpeculativeDecoder, parse_options

    config, params, prompt, _ = tiny
    dec = SpeculativeDecoder(config, params, method="ngram", num_tokens=3, max_len=128)
    for field, value in [("repetition_penalty", 1.2), ("min_tokens", 3),
                         ("mirostat_mode", 2), ("guided_regex", "a+")]:
        with pytest.raises(ValueError, match=field):
            dec.generate(prompt, SamplingParams(**{field: value}), 0)
    with pytest.raises(ValueError, match="leaves no room"):
        dec.generate(np.zeros(128, np.int32), SamplingParams(temperature=0.0), 0)
    with pytest.raises(ValueError, match="speculative.method"):
        parse_options({"method": "medusa"})
    with pytest.raises(ValueError, match="speculative.num_tokens"):
        parse_options({"method": "ngram", "num_tokens": 0})
    assert parse_options({"method": "draft", "num_tokens": 5}) == ("draft", 5)
    with pytest.raises(ValueError, match="draft-model"):
        SpeculativeDecoder(config, params, method="draft", max_len=128)


def test_cli_and_local_model_give_the_plain_greedy_output(capsys):
    # the bundled model through `flaxserve generate` (in process) with and without
    # --speculative, and LocalModel.generate_speculative on the same cache shape
    import json

    from serving.cli import main
    from serving.local import LocalModel

    prompt = "Once upon a time there was a little girl. Once upon a time there was"
    base = ["generate", "--model", "default", "--prompt", prompt, "--max-tokens", "24",
            "--temperature", "0", "--json"]

    def run(*extra):
        assert main(base + list(extra)) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    plain = run()
    fast = run("--speculative", "ngram", "--num-speculative-tokens", "3")
    assert fast["token_ids"] == plain["token_ids"] and fast["text"] == plain["text"]
    usage = fast["speculative"]
    assert usage["method"] == "ngram" and 0 <= usage["acceptance_rate"] <= 1
    assert usage["verify_steps"] + 1 <= len(fast["token_ids"])
    lm = LocalModel("default", max_slots=1, max_len=64)
    [c] = lm.generate_speculative([prompt], SamplingParams(temperature=0.0, max_tokens=24),
                                  num_tokens=3)
    assert c.token_ids == plain["token_ids"] and c.text == plain["text"]
    assert c.metrics["speculative"]["draft_tokens"] == usage["draft_tokens"]
    assert main(base + ["--speculative", "ngram", "--logprobs", "2"]) != 0
    assert "--logprobs is not supported with --speculative" in capsys.readouterr().err


def test_bench_speculative_prints_identical_greedy_and_the_ratios(capsys):
    import json

    from serving.cli import main

    assert main(["bench", "speculative", "--config", "tiny", "--max-tokens", "8",
                 "--num-speculative-tokens", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plain"]["tokens"] == 8 and out["plain"]["decode_tokens_s"] > 0
    [run] = out["runs"]
    assert run["identical"] is True and run["tokens"] == 8
    assert run["speedup"] > 0 and 0 <= run["acceptance_rate"] <= 1
    assert 1 <= run["tokens_per_target_pass"] <= 4
