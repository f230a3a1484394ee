"""Activation steering and paired variants over HTTP and gRPC (docs/research.md), against
one engine started with `--steering-vectors` and the tiny random model: a steered request
equals LocalModel's steered output for the same seed while a concurrent unsteered one is
bitwise unchanged; identical variants give identical choices and a variant equals its
configuration sent alone; bad entries are a 400 / INVALID_ARGUMENT naming the field."""

import json
import math
import threading

import numpy as np
import pytest

from tests.http_fixtures import API_KEY, Servers

PROMPT = "hello world"          # under one KV block: no prefix-cache hits between runs
STEER = [{"layer": 1, "name": "v", "scale": 4.0}]
SAMPLED = {"temperature": 1.0, "max_tokens": 10, "seed": 5}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("research")
    rng = np.random.default_rng(0)
    vec = rng.normal(size=64).astype(np.float32)          # the tiny model's hidden size
    npz = root / "vectors.npz"
    np.savez(npz, v=vec, per_layer=rng.normal(size=(2, 64)).astype(np.float32))
    with Servers(root, [API_KEY], ["--max-slots", "8", "--max-model-len", "256",
                                   "--steering-vectors", str(npz)]) as servers:
        from openai import OpenAI
        client = OpenAI(base_url=servers.base_url + "/v1", api_key=API_KEY, max_retries=0)
        yield servers, client, vec, npz


@pytest.fixture(scope="module")
def local(env):
    """The same weights and vectors in process (serving/local.py)."""
    from serving.local import LocalModel
    return LocalModel(str(env[0].model_dir), max_slots=1, max_len=256, dtype="float32",
                      steering_vectors=str(env[3]))


def _complete(client, **kw):
    extra = kw.pop("extra", {})
    r = client.completions.create(model="tiny", prompt=PROMPT, logprobs=1,
                                  extra_body={"return_token_ids": True, "ignore_eos": True,
                                              **extra}, **{**SAMPLED, **kw})
    return r


def _tokens(choice):
    return choice.model_extra["token_ids"], choice.logprobs.token_logprobs


def test_steering_matches_local_model_and_leaves_others_bitwise(env, local):
    servers, client, vec, npz = env
    # the unsteered baseline alone; `deterministic` makes its logprobs independent of the
    # batch it runs in, so "unchanged" can be bitwise
    plain = {"deterministic": True}
    base = _tokens(_complete(client, max_tokens=40, extra=plain).choices[0])
    out = {}
    go = threading.Event()

    def unsteered():
        go.set()
        out["plain"] = _complete(client, max_tokens=40, extra=plain)

    t = threading.Thread(target=unsteered)
    t.start()
    go.wait()
    steered = _complete(client, extra={"steering": STEER})
    t.join(60)
    assert _tokens(out["plain"].choices[0]) == base            # bitwise: ids and logprobs
    ids, lps = _tokens(steered.choices[0])
    unsteered_same_seed = _tokens(_complete(client).choices[0])
    assert (ids, lps) != unsteered_same_seed                   # steering changed it
    # inline: the same vector sent as numbers
    inline = _complete(client, extra={"steering": [{"layer": 1, "vector": vec.tolist(),
                                                    "scale": 4.0}]})
    assert _tokens(inline.choices[0])[0] == ids
    # in process, same weights, seed and vector
    from sampling.params import SamplingParams
    mine = local.generate([PROMPT], SamplingParams(temperature=1.0, max_tokens=10, seed=5,
                                                   ignore_eos=True), steering=STEER)[0]
    assert mine.token_ids == ids
    np.testing.assert_allclose(mine.logprobs, lps, atol=1e-4)


@pytest.mark.parametrize("entry, param", [
    ({"layer": 2, "name": "v"}, "steering[0].layer"),             # the model has 2 layers
    ({"layer": 0, "vector": [1.0, 2.0]}, "steering[0].vector"),   # not hidden_size numbers
    ({"layer": 0, "name": "nope"}, "steering[0].name"),
    ({"layer": 0, "name": "v", "vector": [0.0]}, "steering[0]"),
    ({"layer": 0, "name": "v", "scale": 1e9}, "steering[0].scale"),
    ({"layer": "0", "name": "v"}, "steering[0].layer"),
])
def test_bad_steering_is_a_400_naming_the_field(env, entry, param):
    import openai
    client = env[1]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", max_tokens=2,
                                       messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"steering": [entry]})
    assert e.value.body["param"] == param, e.value.body


def test_variants_over_chat(env):
    client = env[1]
    variants = [{"top_p": 0.9}, {"min_p": 0.1}, {"top_p": 0.9}]
    msgs = [{"role": "user", "content": "say hi"}]
    r = client.chat.completions.create(
        model="tiny", messages=msgs, n=2, seed=11, temperature=0.9, max_tokens=12,
        logprobs=True, extra_body={"variants": variants, "ignore_eos": True,
                                   # bitwise: the forked samples' last prompt chunk runs
                                   # on the grid, as the prefilling sample's did
                                   "deterministic": True})
    assert [c.index for c in r.choices] == list(range(6))
    assert [c.model_extra["variant"] for c in r.choices] == [0, 0, 1, 1, 2, 2]
    text = [c.message.content for c in r.choices]
    lps = [[t.logprob for t in c.logprobs.content] for c in r.choices]
    assert text[0:2] == text[4:6] and lps[0:2] == lps[4:6]      # identical variants
    assert (text[0], lps[0]) != (text[1], lps[1])                # two samples, two streams
    for c, lp in zip(r.choices, lps):
        m = c.model_extra["metrics"]
        assert m["length"] == len(lp) == 12
        assert math.isclose(m["perplexity"], math.exp(-np.mean(lp)), rel_tol=1e-5)
        assert 0 < m["distinct_1"] <= 1 and m["mean_entropy"] > 0
    assert r.usage.completion_tokens == 72
    # variant 1's sample 0 equals its configuration sent alone with the same seed
    alone = client.chat.completions.create(
        model="tiny", messages=msgs, seed=11, temperature=0.9, max_tokens=12, logprobs=True,
        extra_body={"min_p": 0.1, "ignore_eos": True})
    assert alone.choices[0].message.content == text[2]
    np.testing.assert_allclose([t.logprob for t in alone.choices[0].logprobs.content],
                               lps[2], atol=1e-5)


def test_variants_over_completions_and_errors(env):
    import openai
    client = env[1]
    r = _complete(client, n=1, extra={"variants": [{"temperature": 0.0}, {"top_k": 3}]})
    assert [(c.index, c.model_extra["variant"]) for c in r.choices] == [(0, 0), (1, 1)]
    assert all(c.model_extra["metrics"]["length"] == 10 for c in r.choices)
    greedy = _complete(client, temperature=0.0)
    assert r.choices[0].text == greedy.choices[0].text
    for extra, param in [({"variants": [{"top_p": 0.5}, {"top_p": 2.0}]}, "variants[1].top_p"),
                         ({"variants": [{"seed": 3}]}, "variants[0].seed"),
                         ({"variants": []}, "variants"),
                         ({"variants": [{"guided_choice": ["a"]}]}, "variants[0].guided_choice")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2,
                                      extra_body=extra)
        assert e.value.body["param"] == param, e.value.body


def test_variants_stream(env):
    """Streamed, the chunks carry `index` and `variant`; the finishing chunk the metrics."""
    client = env[1]
    kw = dict(model="tiny", messages=[{"role": "user", "content": "go"}], seed=3,
              temperature=0.9, max_tokens=8,
              extra_body={"variants": [{"top_k": 4}, {"top_p": 0.8}], "ignore_eos": True})
    whole = client.chat.completions.create(**kw)
    text, variant, metrics = {}, {}, {}
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            text[c.index] = text.get(c.index, "") + (c.delta.content or "")
            variant[c.index] = c.model_extra["variant"]
            if c.finish_reason:
                metrics[c.index] = c.model_extra["metrics"]
    assert text == {c.index: c.message.content for c in whole.choices}
    assert variant == {0: 0, 1: 1}
    for c in whole.choices:
        assert metrics[c.index] == pytest.approx(c.model_extra["metrics"], rel=1e-5)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3,
                                            stream=True, extra_body=kw["extra_body"]))
    assert {(c.index, c.model_extra["variant"]) for ch in chunks for c in ch.choices} == \
        {(0, 0), (1, 1)}


def test_grpc_fields(env):
    import grpc
    from serving.client import EngineClient
    servers = env[0]
    client = EngineClient(f"127.0.0.1:{servers.grpc_port}")
    try:
        msg = client.request([5, 17, 42], {"temperature": 1.0, "max_tokens": 4, "seed": 2,
                                           "ignore_eos": True, "n": 2})
        msg.variants_json = json.dumps([{"top_k": 5}, {"top_k": 5}])
        msg.steering.add(layer=0, name="per_layer", scale=2.0)
        tokens, finals = {}, {}
        for r in client.stub.Generate(msg, timeout=60):
            if r.HasField("delta"):
                d = r.delta
                assert d.variant == d.index // 2
                tokens.setdefault(d.index, []).extend(d.token_ids)
                if d.finish_reason:
                    finals[d.index] = d.metrics
        assert sorted(tokens) == [0, 1, 2, 3] and tokens[0] == tokens[2]
        assert all(finals[i].length == 4 for i in range(4))
        bad = client.request([5, 17], {"max_tokens": 2})
        bad.steering.add(layer=7, name="v")
        with pytest.raises(grpc.RpcError) as e:
            list(client.stub.Generate(bad, timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "steering[0].layer" in e.value.details()
    finally:
        client.close()


def test_engine_without_steering_refuses_it(local):
    """The engine's check that the HTTP front end turns into a 400 (param `steering`)."""
    from serving.engine.device import DeviceEngine
    from serving.engine.requests import INVALID_ARGUMENT, RequestError
    from serving.engine.scheduler import Scheduler
    from serving.http.errors import from_value_error
    engine = DeviceEngine(local.config, local.params, max_slots=1, max_len=32)
    with pytest.raises(RequestError) as e:
        Scheduler(engine).make_request("r", [1, 2], {}, steering=STEER)
    assert e.value.kind == INVALID_ARGUMENT and "--steering-vectors" in e.value.message
    assert from_value_error(ValueError(e.value.message)).param == "steering"


def test_deterministic_is_bitwise_after_a_prefix_hit(env):
    """The second identical `deterministic` request reuses the first one's prompt blocks
    (cached_tokens > 0) and still gives its answer bitwise: the prompt is prefilled on a
    fixed grid (DeviceEngine._grid_prefill), so resuming behind cached blocks runs the
    same programs at the same positions."""
    client = env[1]
    prompt = "the quick brown fox jumps over the lazy dog " * 6    # several KV blocks
    runs = [client.completions.create(
        model="tiny", prompt=prompt, logprobs=3, max_tokens=6,
        extra_body={"return_token_ids": True, "ignore_eos": True, "deterministic": True},
        **{k: v for k, v in SAMPLED.items() if k != "max_tokens"}) for _ in range(2)]
    cached = [r.usage.prompt_tokens_details.cached_tokens if r.usage.prompt_tokens_details
              else 0 for r in runs]
    assert cached[1] > cached[0] and cached[1] >= 16, cached
    first, second = (r.choices[0] for r in runs)
    assert _tokens(first) == _tokens(second)
    assert first.logprobs.top_logprobs == second.logprobs.top_logprobs


MSGS = [{"role": "user", "content": "say hi"}]
SEEDED = {"seed": 7, "ignore_eos": True}
SAME_TWICE = [{"top_k": 4}, {"temperature": 0.0}, {"top_k": 4}]


def _chat_text(client, **extra):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=8,
                                       temperature=1.0, extra_body={**SEEDED, **extra})
    return r.choices[0].message.content


def test_anthropic_messages_steering_and_variants(env):
    """/v1/messages takes the chat route's `steering` and `variants` (extra_body with the
    official SDK); variants come back as a `variants` array beside variant 0's message."""
    import anthropic
    servers, client = env[0], env[1]
    claude = anthropic.Anthropic(base_url=servers.base_url, api_key=API_KEY, max_retries=0)

    def create(**extra):
        return claude.messages.create(model="tiny", max_tokens=8, messages=MSGS,
                                      extra_body={"temperature": 1.0, **SEEDED, **extra})

    steered = create(steering=STEER)
    assert steered.content[0].text == _chat_text(client, steering=STEER)   # same prompt
    assert steered.content[0].text != create().content[0].text
    m = create(variants=SAME_TWICE)
    vs = m.model_extra["variants"]
    assert [v["variant"] for v in vs] == [0, 1, 2]
    assert vs[0]["content"] == vs[2]["content"]                  # identical configurations
    assert [b.model_dump(exclude_none=True) for b in m.content] == vs[0]["content"]
    greedy = create(temperature=0.0)
    assert vs[1]["content"][0]["text"] == greedy.content[0].text   # a variant = it alone
    assert all(v["metrics"]["length"] == 8 and v["stop_reason"] == "max_tokens" for v in vs)
    assert m.usage.output_tokens == 24
    for extra, field in [({"variants": [{"top_p": 0.5}, {"top_p": 2.0}]}, "variants[1].top_p"),
                         ({"variants": [{"temperature": 1.5}]}, "variants[0].temperature"),
                         ({"steering": [{"layer": 9, "name": "v"}]}, "steering[0].layer"),
                         ({"steering": {"layer": 0}}, "steering")]:
        with pytest.raises(anthropic.BadRequestError) as e:
            create(**extra)
        assert e.value.body["error"]["type"] == "invalid_request_error"
        assert field in e.value.body["error"]["message"], e.value.body
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model="tiny", max_tokens=4, messages=MSGS, stream=True,
                               extra_body={"variants": [{"top_k": 4}]})
    assert "stream" in e.value.body["error"]["message"]


def test_responses_steering_and_variants(env):
    """/v1/responses passes `steering` and `variants` to the chat route's parser; the
    response is variant 0's, with a `variants` array of every variant's output."""
    import openai
    client = env[1]

    def create(**extra):
        return client.responses.create(model="tiny", input=MSGS[0]["content"],
                                       max_output_tokens=8, temperature=1.0,
                                       extra_body={**SEEDED, **extra})

    assert create(steering=STEER).output_text == _chat_text(client, steering=STEER)
    r = create(variants=SAME_TWICE)
    vs = r.model_extra["variants"]
    text = [v["output"][-1]["content"][0]["text"] for v in vs]
    assert text[0] == text[2] == r.output_text
    assert text[1] == _chat_text(client, temperature=0.0)
    assert [v["status"] for v in vs] == ["incomplete"] * 3          # max_output_tokens
    assert all(v["metrics"]["length"] == 8 for v in vs) and r.usage.output_tokens == 24
    for extra, param in [({"variants": [{"top_p": 2.0}]}, "variants[0].top_p"),
                         ({"steering": [{"layer": 0, "name": "nope"}]}, "steering[0].name")]:
        with pytest.raises(openai.BadRequestError) as e:
            create(**extra)
        assert e.value.body["param"] == param, e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="tiny", input="hi", stream=True,
                                extra_body={"variants": [{"top_k": 4}]})
    assert e.value.body["param"] == "stream"


def test_beam_search_logprobs(env):
    """use_beam_search with logprobs: each beam's tokens carry their logprobs under the
    model (summing to its cumulative_logprob) and top alternatives; one beam is greedy
    decoding, logprobs included."""
    client = env[1]
    beams = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=6, n=2, logprobs=2,
        extra_body={"use_beam_search": True, "best_of": 3, "ignore_eos": True})
    assert len(beams.choices) == 2
    for c in beams.choices:
        lps = c.logprobs.token_logprobs
        assert len(lps) == 6 and all(len(t) >= 1 for t in c.logprobs.top_logprobs)
        assert math.isclose(sum(lps), c.model_extra["cumulative_logprob"], abs_tol=1e-4)
    msgs = [{"role": "user", "content": "go"}]
    one, greedy = (client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=6, logprobs=True, top_logprobs=2,
        extra_body={"ignore_eos": True, **extra})
        for extra in ({"use_beam_search": True}, {"temperature": 0.0}))
    a, b = one.choices[0].logprobs.content, greedy.choices[0].logprobs.content
    # (a token's `token` text depends on how the text was split into deltas: compare bytes)
    assert [t.bytes for t in a] == [t.bytes for t in b] and len(a) == 6
    np.testing.assert_allclose([t.logprob for t in a], [t.logprob for t in b], atol=1e-5)
    assert [[x.bytes for x in t.top_logprobs] for t in a] == \
        [[x.bytes for x in t.top_logprobs] for t in b]
