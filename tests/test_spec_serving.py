"""Speculative decoding inside the batch server (serving/engine/spec_jobs.py).

One in-process engine (tiny random model, byte-level tokenizer) started with the server
default `--speculative ngram:3` and `--speculative-max-batch 1`, and one gunicorn front end
on it. The exact acceptance rule keeps the target's distribution, not its tokens, so what
is checked is what must hold: greedy output equals the batched path's, stop strings /
stop ids / max_tokens end it the same way, the counts are consistent, a cancelled job is
freed, a busy engine answers on the batched path, and bad fields name themselves.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import grpc
import pytest

from tests.http_fixtures import API_KEY, ROOT, _env, _stop, _wait, free_port, health_ok

GREEDY = {"temperature": 0.0, "max_tokens": 24, "ignore_eos": True}
OFF = {"speculative": None}                       # opt out of the server default
PROMPT = ("Hello world, the quick brown fox jumps over the lazy dog. Hello world, the "
          "quick brown fox")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from checkpoints.tokenizer import load_tokenizer
    from model.config import named_config
    from model.decoder import init_params
    from serving.client import EngineClient
    from serving.engine.server import start_in_process
    from serving.engine.spec_jobs import SpecConfig
    from tests.tokenizer_fixtures import build_bytelevel_dir

    tok_dir = build_bytelevel_dir(tmp_path_factory.mktemp("tok"))
    tok = load_tokenizer(str(tok_dir))
    cfg = dataclasses.replace(named_config("tiny", dtype="float32"), vocab_size=tok.vocab_size)
    srv = start_in_process(cfg, init_params(cfg, seed=2), max_slots=4, max_len=128,
                           prefill_buckets=(16, 32), tokenizer=tok, model_name="tiny-spec",
                           model_dir=str(tok_dir),
                           speculative=SpecConfig(method="ngram", num_tokens=3, max_batch=1),
                           warmup=False)
    client = EngineClient(f"127.0.0.1:{srv.port}")
    yield client, tok, srv
    client.close()
    srv.stop(grace_s=5)


def _code(client, ids, sampling) -> tuple:
    with pytest.raises(grpc.RpcError) as err:
        client.generate(ids, sampling)
    return err.value.code(), err.value.details()


def _wait_idle(client, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = client.stats()
        if s.spec_running == 0 and s.slots_in_use == 0 and s.queue_depth == 0:
            return
        time.sleep(0.05)
    raise AssertionError("the engine did not go idle")


def test_greedy_speculative_equals_the_batched_path_with_consistent_counts(engine):
    client, tok, _ = engine
    ids = tok.encode(PROMPT)
    before = client.stats()
    plain = client.generate(ids, {**GREEDY, **OFF})
    assert not plain.usage.HasField("speculative")
    default = client.generate(ids, GREEDY)                       # the server default
    # (one K everywhere: each K is its own set of compiled programs)
    asked = client.generate(ids, {**GREEDY, "speculative": {"method": "ngram",
                                                            "num_tokens": 3}})
    for g, k in ((default, 3), (asked, 3)):
        c = g.choices[0]
        assert c.token_ids == plain.choices[0].token_ids and c.text == plain.choices[0].text
        assert c.finish_reason == "length" and g.usage.completion_tokens == 24
        s = g.usage.speculative
        assert s.method == "ngram" and s.num_tokens == k
        assert 0 < s.draft_tokens and 0 <= s.accepted_tokens <= s.draft_tokens
        # every verify emits its accepted drafts plus one token (the first is the prompt's)
        assert s.verify_steps + s.accepted_tokens + 1 >= 24
    after = client.stats()
    assert after.spec_requests - before.spec_requests == 2
    drafted = after.spec_draft_tokens - before.spec_draft_tokens
    accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
    assert drafted == default.usage.speculative.draft_tokens + asked.usage.speculative.draft_tokens
    assert accepted == (default.usage.speculative.accepted_tokens
                        + asked.usage.speculative.accepted_tokens)
    assert after.spec_acceptance_rate == pytest.approx(after.spec_accepted_tokens
                                                       / after.spec_draft_tokens)


def test_stop_strings_stop_ids_and_max_tokens_end_it_like_the_batched_path(engine):
    client, tok, _ = engine
    ids = tok.encode(PROMPT)
    plain = client.generate(ids, {**GREEDY, **OFF}).choices[0]
    stop = plain.text[8:11]                 # a stop string the output is known to hold
    cases = [({"stop": [stop]}, "stop"), ({"stop_token_ids": [plain.token_ids[5]]}, "stop"),
             ({"max_tokens": 5}, "length")]
    for extra, reason in cases:
        ref = client.generate(ids, {**GREEDY, **OFF, **extra})
        got = client.generate(ids, {**GREEDY, **extra})
        assert got.usage.HasField("speculative"), extra
        a, b = ref.choices[0], got.choices[0]
        assert b.finish_reason == reason and len(b.token_ids) < 24, extra
        assert (b.text, b.finish_reason, b.stop_sequence, b.stop_token_id) == (
            a.text, a.finish_reason, a.stop_sequence, a.stop_token_id), extra
        assert b.token_ids == a.token_ids and got.usage.completion_tokens == len(a.token_ids)


def test_bad_fields_and_parameters_it_cannot_honour_name_themselves(engine):
    client, tok, _ = engine
    ids = tok.encode("Hello world")
    bad = {"method": "medusa"}, {"num_tokens": 0}, {"method": "ngram", "k": 2}, "ngram"
    names = "speculative.method", "speculative.num_tokens", "speculative", "speculative"
    for value, name in zip(bad, names):
        code, details = _code(client, ids, {**GREEDY, "speculative": value})
        assert code == grpc.StatusCode.INVALID_ARGUMENT and name in details, details
    ask = {"speculative": {"method": "ngram"}}
    for extra, name in (({"repetition_penalty": 1.3}, "repetition_penalty"),
                        ({"n": 2}, "n"), ({"logprobs": True}, "logprobs"),
                        ({"guided_regex": "[a-z]+"}, "guided_regex"),
                        ({"speculative": {"method": "draft"}}, "--draft-model")):
        code, details = _code(client, ids, {**GREEDY, **ask, **extra})
        assert code == grpc.StatusCode.INVALID_ARGUMENT and name in details, details
    # with only the server default, such a request simply runs batched
    g = client.generate(ids, {**GREEDY, "repetition_penalty": 1.3, "max_tokens": 4})
    assert not g.usage.HasField("speculative") and g.usage.completion_tokens == 4


def test_a_busy_engine_answers_batched(engine):
    client, tok, _ = engine
    ids = tok.encode(PROMPT)
    _wait_idle(client)
    fallbacks = client.stats().spec_fallbacks
    long = client.stream(ids, {"temperature": 0.0, "max_tokens": 70, "ignore_eos": True})
    deadline = time.monotonic() + 30    # gRPC's threads may hand the two over in any order:
    while client.stats().spec_running == 0 and time.monotonic() < deadline:
        time.sleep(0.002)               # the long one holds the one speculative job first
    # --speculative-max-batch 1: a request arriving meanwhile (even one that asks) is
    # answered on the batched path, with the same greedy tokens
    second = client.generate(ids, {**GREEDY, "speculative": {"method": "ngram"}})
    usage = [r.usage for r in long if r.HasField("usage")][0]
    assert usage.HasField("speculative") and usage.completion_tokens == 70
    assert not second.usage.HasField("speculative")
    assert client.stats().spec_fallbacks == fallbacks + 1
    plain = client.generate(ids, {**GREEDY, **OFF})
    assert second.choices[0].token_ids == plain.choices[0].token_ids


def test_cancel_ends_the_job_with_abort_and_frees_it(engine):
    from serving.engine.requests import Delta, Usage

    client, tok, srv = engine
    _wait_idle(client)
    s = srv.scheduler
    req = s.make_request("cancel-me", tok.encode(PROMPT),
                         {"temperature": 0.0, "max_tokens": 70, "ignore_eos": True})
    handle = s.submit(req)
    handle.cancel()                     # long before its 70 tokens
    events = list(handle)
    assert isinstance(events[-1], Usage) and events[-1].speculative is not None
    deltas = [e for e in events if isinstance(e, Delta)]
    assert deltas[-1].finish_reason == "abort"
    assert sum(len(d.token_ids) for d in deltas) < 70
    _wait_idle(client)                  # the job is gone
    assert client.generate(tok.encode(PROMPT), {**GREEDY, "max_tokens": 3}).usage.HasField(
        "speculative")


@pytest.fixture(scope="module")
def http(engine, tmp_path_factory):
    _, _, srv = engine
    port = free_port()
    log = open(tmp_path_factory.mktemp("spec-http") / "http.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "serving.http.main", "--engine",
                             f"127.0.0.1:{srv.port}", "--port", str(port), "--workers", "1",
                             "--served-model-name", "tiny", "--api-key", API_KEY],
                            cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)

    up = lambda: health_ok(f"http://127.0.0.1:{port}")
    try:
        _wait(up, proc, "flaxserve http", 60)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)
        log.close()


def test_openai_sdk_extra_body_usage_metrics_and_a_400(http):
    import openai

    client = openai.OpenAI(base_url=http + "/v1", api_key=API_KEY, max_retries=0)
    body = {"ignore_eos": True, "speculative": {"method": "ngram", "num_tokens": 3}}
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0.0)
    spec = client.completions.create(**kw, extra_body=body)
    plain = client.completions.create(**kw, extra_body={"ignore_eos": True,
                                                        "speculative": None})
    assert spec.choices[0].text == plain.choices[0].text
    s = spec.usage.model_extra["speculative"]
    assert s["method"] == "ngram" and 0 <= s["accepted_tokens"] <= s["draft_tokens"]
    assert "speculative" not in (plain.usage.model_extra or {})
    # the server default (--speculative ngram:3) reaches a request that does not say
    default = client.completions.create(**kw, extra_body={"ignore_eos": True})
    assert default.choices[0].text == plain.choices[0].text
    assert default.usage.model_extra["speculative"]["num_tokens"] == 3
    chat = client.chat.completions.create(model="tiny", max_tokens=6, temperature=0.0,
                                          messages=[{"role": "user", "content": PROMPT}],
                                          extra_body=body)
    assert chat.usage.model_extra["speculative"]["draft_tokens"] >= 0
    import anthropic
    claude = anthropic.Anthropic(base_url=http, api_key=API_KEY, max_retries=0)
    msg = claude.messages.create(model="tiny", max_tokens=6,
                                 messages=[{"role": "user", "content": PROMPT}],
                                 extra_body={"temperature": 0.0, **body})
    s = msg.usage.model_extra["speculative"]
    assert s["num_tokens"] == 3 and 0 <= s["accepted_tokens"] <= s["draft_tokens"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**kw, extra_body={"speculative": {"num_tokens": 99}})
    assert "speculative.num_tokens" in str(err.value)
    import urllib.request
    req = urllib.request.Request(http + "/metrics",
                                 headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read().decode()
    assert "flaxserve_engine_spec_draft_tokens" in text
    assert "flaxserve_engine_spec_acceptance_rate" in text
