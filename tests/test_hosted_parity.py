"""Parity with the hosted APIs researchers move from (issue 17, docs/fields.md): each row a
behaviour through the official openai SDK (our extensions in `extra_body`) against the
default model behind `flaxserve engine` + gunicorn, with a small context (--max-model-len
128) so the context edge is quick to reach.

Rows: temperature up to 4 on the OpenAI routes (Anthropic keeps [0, 1]); 32 stop strings
on chat and more on /v1/completions; `bad_words` as strings; dynamic top-p carried by the
engine; beam search served (its bad fields refused clearly); `max_tokens` over the context
clamped to the edge (or a 400 with --strict-max-tokens); chat `echo`.
"""

from __future__ import annotations

import collections
import re

import anthropic
import openai
import pytest

from tests.http_fixtures import API_KEY, Servers

CONTEXT = 128
ASK = [{"role": "user", "content": "Tell me something about science."}]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    with Servers(tmp_path_factory.mktemp("parity"), [API_KEY],
                 ["--max-slots", "4", "--max-model-len", str(CONTEXT)], model="default",
                 served_names=("default",)) as s:
        yield s


@pytest.fixture(scope="module")
def client(servers):
    return openai.OpenAI(base_url=servers.base_url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def claude(servers):
    return anthropic.Anthropic(base_url=servers.base_url, api_key=API_KEY, max_retries=0)


def _chat(client, **kw):
    kw.setdefault("messages", ASK)
    return client.chat.completions.create(model="default", **kw)


# ---- temperature ---------------------------------------------------------------------------

def test_temperature_up_to_4_on_openai_and_1_on_anthropic(client, claude):
    def mean_logprob(t):
        lps = []
        for seed in (1, 2):
            r = _chat(client, max_tokens=16, temperature=t, seed=seed, logprobs=True,
                      extra_body={"ignore_eos": True})
            lps += [x.logprob for x in r.choices[0].logprobs.content]
        return sum(lps) / len(lps)
    # raw logprobs of what was drawn: at 3.5 the draw is close to uniform over the vocab
    assert mean_logprob(3.5) < mean_logprob(0.7) - 2.0
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, max_tokens=4, temperature=4.5)
    assert e.value.body["param"] == "temperature"
    ok = claude.messages.create(model="default", max_tokens=4, messages=ASK,
                                extra_body={"temperature": 1.0})
    assert ok.usage.output_tokens >= 1
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model="default", max_tokens=4, messages=ASK,
                               extra_body={"temperature": 1.5})
    assert "temperature" in e.value.message


# ---- stop strings --------------------------------------------------------------------------

def _stop_from(text: str) -> str:
    """A stop string from the middle of a greedy output: a word, at its first occurrence."""
    words = [m for m in re.finditer(r" [A-Za-z]{3,}", text) if m.start() > len(text) // 3]
    for m in words:
        if text.find(m.group()) == m.start():
            return m.group()
    raise AssertionError(f"no usable stop string in {text!r}")


def _stops(real: str, total: int, at: int, text: str) -> list[str]:
    fillers = [f"#{i}qz" for i in range(total)]
    assert not any(f in text for f in fillers)
    return fillers[:at] + [real] + fillers[at:total - 1]


def test_32_stop_strings_the_20th_matches(client):
    free = _chat(client, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    text = free.choices[0].message.content
    stop = _stop_from(text)
    stops = _stops(stop, 32, 19, text)
    assert stops[19] == stop and len(stops) == 32
    cut = _chat(client, max_tokens=40, temperature=0, stop=stops,
                extra_body={"ignore_eos": True})
    assert cut.choices[0].message.content == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, max_tokens=4, stop=stops + ["one more"])
    assert e.value.body["param"] == "stop"


def test_completions_take_more_stop_strings(client):
    # lm-evaluation-harness sends 5 and more (issue 13); /v1/completions takes 128
    prompt = "The old man walked into the village at dawn."
    free = client.completions.create(model="default", prompt=prompt, max_tokens=40,
                                     temperature=0, extra_body={"ignore_eos": True})
    text = free.choices[0].text
    stop = _stop_from(text)
    stops = _stops(stop, 100, 60, text)
    cut = client.completions.create(model="default", prompt=prompt, max_tokens=40,
                                    temperature=0, stop=stops,
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].text == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="default", prompt=prompt, max_tokens=4,
                                  stop=[f"#{i}" for i in range(129)])


# ---- bad_words -----------------------------------------------------------------------------

SEEDS = range(20)


def _samples(client, **extra) -> list[str]:
    return [_chat(client, max_tokens=24, temperature=1.0, seed=seed,
                  extra_body={"ignore_eos": True, **extra}).choices[0].message.content
            for seed in SEEDS]


def _has(word: str, text: str) -> bool:
    return re.search(rf"(?<![A-Za-z]){re.escape(word)}(?![A-Za-z])", text) is not None


def test_bad_words_never_appear_in_seeded_samples(client):
    free = _samples(client)
    counts = collections.Counter(w for text in free for w in set(re.findall(r"[a-z]+", text)))
    tokenizer = _tokenizer()
    # a phrase ("words or phrases"): a sequence of tokens in both tokenizations
    pairs = collections.Counter(p for text in free for p in set(
        m.group(1) for m in re.finditer(r"(?=(?<![A-Za-z])([a-z]+ [a-z]+)(?![A-Za-z]))", text)))
    multi = [p for p, c in pairs.most_common() if c >= 2
             and min(len(_ids(tokenizer, p)), len(_ids(tokenizer, " " + p))) >= 2]
    assert multi, pairs
    # and a word of one token (a -inf bias) that is not part of the phrase
    one = [w for w, c in counts.most_common() if c >= 3 and len(_ids(tokenizer, w)) == 1
           and w not in multi[0].split()]
    assert one, counts
    words = [one[0], multi[0]]
    for w in words:
        assert sum(_has(w, t) for t in free) >= 2, (w, free)
    banned = _samples(client, bad_words=words)
    for w in words:
        hits = [t for t in banned if _has(w, t)]
        assert not hits, (w, hits)
    assert banned != free            # the ban changed the samples, and nothing else broke
    # too long a word, and the token-id form still beside it
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, max_tokens=4, extra_body={"bad_words": ["x" * 65]})
    assert e.value.body["param"] == "bad_words"
    r = _chat(client, max_tokens=4, extra_body={"bad_words": ["the"],
                                               "bad_words_ids": [[5, 6]]})
    assert r.choices[0].finish_reason in ("stop", "length")


def test_bad_words_resolve_to_both_tokenizations():
    from sampling.bad_words import resolve_bad_words
    from sampling.params import SamplingParams
    from sampling.rows import make_rows
    tok = _tokenizer()
    p = resolve_bad_words(SamplingParams(bad_words=["village", "the"],
                                         bad_words_ids=[[5, 6]]), tok.encode)
    assert p.bad_words == []
    assert p.bad_words_ids == [[5, 6], _ids(tok, "village"), _ids(tok, " village"),
                               _ids(tok, "the"), _ids(tok, " the")]
    assert _ids(tok, "village") != _ids(tok, " village")
    with pytest.raises(ValueError, match="bad_words"):   # never ignored unresolved
        make_rows([SamplingParams(bad_words=["the"])], 4096, [0], [0])
    with pytest.raises(ValueError, match="bad_words"):
        resolve_bad_words(SamplingParams(bad_words=["a b c d e f g h i j"]), tok.encode)


def test_bad_words_over_grpc_are_tokenized_by_the_engine(servers):
    """A gRPC client (no front end) sends the strings; the engine's tokenizer resolves them."""
    from sampling.params import SamplingParams
    from serving.http.errors import APIError
    from serving.http.generation import GenRequest, accumulate
    tok = _tokenizer()
    ids = _ids(tok, "Tell me something about science. ")
    servers.link.token_bytes = tok.token_bytes      # what a front end sets from the model

    def greedy(**kw) -> str:
        sampling = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, **kw)
        stream = servers.link.generate(GenRequest("grpc-bw", "default", ids, sampling))
        try:
            return accumulate((e for e in stream if e is not None), 1)[0][0].text
        finally:
            stream.cancel()

    free = greedy()
    word = max(set(re.findall(r"[a-z]{2,}", free)), key=lambda w: (free.count(w), w))
    assert _has(word, free)
    banned = greedy(bad_words=[word])
    assert not _has(word, banned) and banned != free
    with pytest.raises(APIError) as e:
        greedy(bad_words=["a b c d e f g h i j"])      # 10 tokens: over the 8 of a sequence
    assert e.value.status == 400 and "bad_words" in e.value.message


def _tokenizer():
    from serving.http.prompt import load_prompt_tokenizer
    return load_prompt_tokenizer("checkpoints/default")


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


# ---- dynamic top-p ---------------------------------------------------------------------------

def test_dynamic_top_p_is_carried_by_the_engine(client):
    """top_p 1 then decayed to 0.01 after the first token: the first token is the seeded
    draw, the rest is the greedy continuation of it (the reference rule itself is checked
    on recorded logits in tests/test_dynamic_top_p.py)."""
    prompt = _ids(_tokenizer(), "The old man walked into the village at dawn.")
    common = dict(model="default", max_tokens=10, seed=3, temperature=1.0)
    plain = client.completions.create(prompt=prompt, **common, extra_body={
        "ignore_eos": True, "return_token_ids": True})
    decayed = client.completions.create(prompt=prompt, **common, extra_body={
        "ignore_eos": True, "return_token_ids": True, "top_p_decay": 0.01,
        "top_p_min": 1e-6})
    a = plain.choices[0].model_extra["token_ids"]
    b = decayed.choices[0].model_extra["token_ids"]
    assert a[0] == b[0]                          # the same first draw
    greedy = client.completions.create(
        model="default", prompt=prompt + b[:1], max_tokens=9, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True})
    assert b[1:] == greedy.choices[0].model_extra["token_ids"]
    assert a != b
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, max_tokens=4, top_p=0.5, extra_body={"top_p_min": 0.6})
    assert e.value.body["param"] == "top_p_min"


# ---- beam search fields ------------------------------------------------------------------------

@pytest.mark.parametrize("extra,param", [
    ({"length_penalty": 0.8}, "length_penalty"),
    ({"early_stopping": True}, "early_stopping"),
    ({"use_beam_search": True, "top_p": 0.5}, "top_p"),
    ({"use_beam_search": True, "temperature": 0.7}, "temperature"),
])
def test_beam_search_fields_are_a_clear_400(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, max_tokens=4, extra_body=extra)
    assert e.value.body["param"] == param
    assert "use_beam_search" in e.value.message


def test_beam_search_over_http_equals_in_process(client):
    """use_beam_search on /v1/completions and chat: the engine's beams (run on its device
    thread, serving/engine/beam_jobs.py) are LocalModel.beam_search's, with their scores;
    streaming it is a 400."""
    from sampling.params import SamplingParams
    from serving.local import LocalModel
    prompt = [15, 220, 1012, 318, 257, 922]
    r = client.completions.create(model="default", prompt=prompt, max_tokens=6, extra_body={
        "use_beam_search": True, "n": 3, "length_penalty": 0.5, "return_token_ids": True})
    lm = LocalModel("default", max_slots=1, max_len=CONTEXT)
    ref = lm.beam_search(prompt, SamplingParams(use_beam_search=True, n=3, length_penalty=0.5,
                                                max_tokens=6))
    assert [c.model_extra["token_ids"] for c in r.choices] == [b.token_ids for b in ref]
    assert [c.text for c in r.choices] == [b.text for b in ref]
    for c, b in zip(r.choices, ref):
        assert c.model_extra["beam_score"] == pytest.approx(b.score, abs=1e-4)
        assert c.model_extra["cumulative_logprob"] == pytest.approx(b.cumulative_logprob,
                                                                   abs=1e-4)
    assert r.usage.completion_tokens == sum(len(b.token_ids) for b in ref)
    chat = _chat(client, max_tokens=5, n=2, temperature=0, extra_body={"use_beam_search": True})
    scores = [c.model_extra["beam_score"] for c in chat.choices]
    assert len(chat.choices) == 2 and scores == sorted(scores, reverse=True)
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, max_tokens=4, stream=True, extra_body={"use_beam_search": True})
    assert e.value.body["param"] == "use_beam_search"


def test_neutral_beam_search_values_are_accepted(client):
    # clients that serialise vLLM's whole request send the defaults
    r = _chat(client, max_tokens=4, extra_body={"length_penalty": 1.0, "early_stopping": False,
                                                "use_beam_search": False})
    assert r.usage.completion_tokens >= 1


# ---- max_tokens over the context ------------------------------------------------------------

def test_max_tokens_over_the_context_ends_at_its_edge(client):
    raw = client.chat.completions.with_raw_response.create(
        model="default", messages=ASK, max_tokens=10_000, temperature=0,
        extra_body={"ignore_eos": True})
    r = raw.parse()
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens == CONTEXT
    assert int(raw.headers["x-flaxserve-max-tokens"]) == CONTEXT - r.usage.prompt_tokens
    # within the context: the value asked for, reported as is
    raw = client.chat.completions.with_raw_response.create(
        model="default", messages=ASK, max_tokens=5, extra_body={"ignore_eos": True})
    assert raw.headers["x-flaxserve-max-tokens"] == "5"
    assert raw.parse().usage.completion_tokens == 5
    # completions, two prompts of different lengths: one value each
    raw = client.completions.with_raw_response.create(
        model="default", prompt=["Hello there.", "The old man walked into the village."],
        max_tokens=500, temperature=0, extra_body={"ignore_eos": True})
    c = raw.parse()
    limits = [int(x) for x in raw.headers["x-flaxserve-max-tokens"].split(",")]
    assert len(limits) == 2 and limits[0] > limits[1]
    assert all(ch.finish_reason == "length" for ch in c.choices)
    assert c.usage.total_tokens == 2 * CONTEXT
    # a prompt that fills the context is still a 400
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="default", prompt=[7] * CONTEXT, max_tokens=5)
    assert e.value.code == "context_length_exceeded"


def test_strict_max_tokens_restores_the_400():
    from serving.http import openai_chat_request
    from serving.http.errors import APIError
    from serving.http.generation import ModelInfo
    from serving.http.main import add_arguments, settings_from_args
    import argparse
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert settings_from_args(parser.parse_args(
        ["--engine", "127.0.0.1:1", "--strict-max-tokens"])).strict_max_tokens is True
    assert settings_from_args(parser.parse_args(
        ["--engine", "127.0.0.1:1"])).strict_max_tokens is False
    from serving import serve             # `flaxserve serve` hands the flag to its front end
    serve_parser = argparse.ArgumentParser()
    serve.add_arguments(serve_parser)
    assert "--strict-max-tokens" in serve.http_command(
        serve_parser.parse_args(["--strict-max-tokens"]))
    assert "--strict-max-tokens" not in serve.http_command(serve_parser.parse_args([]))
    body = {"model": "default", "messages": ASK, "max_tokens": 10_000}
    for strict in (False, True):
        info = ModelInfo(["default"], _tokenizer(), max_model_len=CONTEXT,
                         strict_max_tokens=strict)
        if strict:
            with pytest.raises(APIError) as e:
                openai_chat_request.parse_chat(dict(body), info)
            assert (e.value.status, e.value.param, e.value.code) == (
                400, "max_tokens", "context_length_exceeded")
        else:
            plan = openai_chat_request.parse_chat(dict(body), info)
            room = CONTEXT - len(plan.requests[0].prompt_ids)
            assert plan.requests[0].sampling.max_tokens == room == plan.max_tokens[0]


# ---- chat echo -----------------------------------------------------------------------------------

def test_chat_echo_prepends_the_final_assistant_message(client):
    start = "Once upon a time"
    messages = ASK + [{"role": "assistant", "content": start}]
    extra = {"add_generation_prompt": False, "continue_final_message": True}
    plain = _chat(client, messages=messages, max_tokens=12, temperature=0, extra_body=extra)
    echoed = _chat(client, messages=messages, max_tokens=12, temperature=0,
                   extra_body={**extra, "echo": True})
    rest = plain.choices[0].message.content
    assert rest and not rest.startswith(start)
    assert echoed.choices[0].message.content == start + rest
    chunks = list(_chat(client, messages=messages, max_tokens=12, temperature=0, stream=True,
                        extra_body={**extra, "echo": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        start + rest
    # the last message is the user's: nothing to echo
    user_last = _chat(client, max_tokens=6, temperature=0, extra_body={"echo": True})
    assert user_last.choices[0].message.content == _chat(
        client, max_tokens=6, temperature=0).choices[0].message.content
