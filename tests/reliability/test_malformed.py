"""A malformed-body corpus: every bad input is a 400 in its protocol's shape (issue 11).

Against a real engine + gunicorn front end (tiny random model, loopback): every bounded
sampling field at 0, -1, 2^31, 2^63, NaN, Infinity, strings, a list and a bool, on the
OpenAI chat, legacy completions and Anthropic routes; JSON nested 1000+ levels, lone
surrogates in any text, invalid UTF-8, wrong types (`max_thinking_tokens: "1"`), oversize
bodies, too many or too long stop strings on every route, too many prompts, template
bombs (`{{ 'a' * 30000000 }}`, unbounded loops, string doubling). An out-of-range value
must be a 400 naming its field; an in-range one must not be a 5xx. After the corpus the
engine still serves a normal request on every route. Each request has a client timeout:
one that does not answer counts as a hang. The table of the run is printed at the end
(`pytest -s`).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter

import pytest
import requests

from sampling.params import BOUNDS, MAX_SEQUENCE, MAX_STOP_STRINGS
from serving.http import limits
from tests.http_fixtures import API_KEY

pytestmark = pytest.mark.timeout(900)

HEADERS = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
USER = [{"role": "user", "content": "hi"}]
CONTEXT = 256                                  # the fixture's --max-model-len
VOCAB = 300                                    # the fixture's tokenizer
TABLE: dict[str, Counter] = {}

VALUES = [0, -1, 2 ** 31, 2 ** 63, math.nan, math.inf, "1", "abc", [1], True]


def _send(servers, path: str, body, table: str, raw: bytes | None = None,
          timeout: float = 60.0):
    row = TABLE.setdefault(table, Counter())
    row["sent"] += 1
    data = raw if raw is not None else json.dumps(body).encode()   # NaN, Infinity as-is
    try:
        r = requests.post(servers.base_url + path, data=data, headers=HEADERS,
                          timeout=timeout)
    except requests.Timeout:
        row["hangs"] += 1
        raise AssertionError(f"no answer in {timeout} s: {path} {data[:200]!r}") from None
    kind = "ok" if r.status_code < 400 else "4xx" if r.status_code < 500 else "5xx"
    row[kind] += 1
    assert r.status_code < 500, (path, data[:300], r.status_code, r.text[:500])
    return r


def _assert_400(r, protocol: str, field: str | None = None):
    assert r.status_code == 400, (r.status_code, r.text[:400])
    body = r.json()
    if protocol == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        message = body["error"]["message"]
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["type"] == "invalid_request_error"
        message = body["error"]["message"]
        if field is not None and body["error"]["param"] is not None:
            assert field in body["error"]["param"] or field in message, body
    if field is not None:
        assert field in message or (protocol == "openai" and field in
                                    (body["error"]["param"] or "")), (field, body)


def _in_bounds(name: str, v) -> bool:
    lo, hi, lo_open, hi_open, integer = BOUNDS[name]
    hi = {"vocab": VOCAB, "context": CONTEXT}.get(hi, hi)
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        return False
    if not math.isfinite(v):
        return False
    return not ((v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi))


ROUTES = {
    "chat": ("/v1/chat/completions", "openai", lambda: {"messages": USER, "max_tokens": 1}),
    "completions": ("/v1/completions", "openai", lambda: {"prompt": "hi", "max_tokens": 1}),
    "messages": ("/v1/messages", "anthropic", lambda: {"messages": USER, "max_tokens": 1}),
}


@pytest.mark.parametrize("route", list(ROUTES))
def test_every_sampling_field_at_every_bad_value(keyed_servers, route):
    path, protocol, base = ROUTES[route]
    for name in BOUNDS:
        for v in VALUES:
            body = base()
            body[name] = v
            r = _send(keyed_servers, path, body, f"sampling fields, {route}")
            if not _in_bounds(name, v) and not (isinstance(v, float) and
                                               not math.isfinite(v)):
                _assert_400(r, protocol, name)
            elif not _in_bounds(name, v):
                _assert_400(r, protocol)      # NaN / Infinity: not JSON at all


def test_the_reproduced_killers(keyed_servers):
    """Issue 11's curl, and its siblings: 400 naming the field; the engine stays up."""
    for name in ("top_k", "penalty_window", "dry_allowed_length", "dry_penalty_last_n"):
        past = VOCAB + 1 if name == "top_k" else CONTEXT + 1   # past what it means
        for v in (2 ** 31, 2 ** 63, past):
            r = _send(keyed_servers, "/v1/chat/completions",
                      {"model": "tiny", "messages": USER, "max_tokens": 4, name: v},
                      "the killers")
            _assert_400(r, "openai", name)
            assert r.json()["error"]["param"] == name     # also when the engine says it
    r = requests.get(keyed_servers.base_url + "/health", timeout=30)
    assert r.status_code == 200


def _deep(n: int) -> bytes:
    return b'{"messages": ' + b"[" * n + b"]" * n + b', "max_tokens": 1}'


@pytest.mark.parametrize("route", list(ROUTES))
def test_structure_and_text(keyed_servers, route):
    path, protocol, base = ROUTES[route]
    text_field = "prompt" if route == "completions" else "messages"
    cases = [
        _deep(1000), _deep(100_000), b"[" * 5000,
        b'{"max_tokens": 1, "x": ' + b'{"a":' * 2000 + b"1" + b"}" * 2000 + b"}",
        b"\xff\xfe not utf-8", b"not json", b"", b"[]", b"null", b'"a string"', b"1e400",
        b'{"max_tokens": 1e400}', b'{"temperature": NaN}', b'{"top_p": -Infinity}',
        b'{"max_tokens": ' + b"9" * 5000 + b"}",
    ]
    for raw in cases:
        _assert_400(_send(keyed_servers, path, None, f"structure, {route}", raw=raw),
                    protocol)
    # a lone surrogate anywhere a text goes: a 400 naming the field, not a 500
    surrogate = "\ud800"
    bodies = [dict(base(), model=surrogate), dict(base(), stop=[surrogate]),
              dict(base(), chat_template_kwargs={"x": surrogate})]
    if route == "completions":
        bodies.append(dict(base(), prompt=surrogate))
        bodies.append(dict(base(), prompt=["ok", "a" + surrogate]))
    else:
        bodies.append(dict(base(), messages=[{"role": "user", "content": surrogate}]))
        bodies.append(dict(base(), messages=[{"role": "user", "content": [
            {"type": "text", "text": "x" + surrogate}]}]))
    if route == "messages":
        bodies.append(dict(base(), system=surrogate))
    for body in bodies:
        r = _send(keyed_servers, path, body, f"structure, {route}")
        _assert_400(r, protocol)
        assert "surrogate" in r.text
    r = _send(keyed_servers, path, dict(base(), messages=[{"role": "user", "content":
                                                           surrogate}]) if route != "completions"
              else dict(base(), prompt=surrogate), f"structure, {route}")
    assert text_field in r.text
    big = b'{"max_tokens": 1, "prompt": "' + b"a" * (limits.MAX_BODY_BYTES + 10) + b'"}'
    r = _send(keyed_servers, path, None, f"structure, {route}", raw=big)
    assert r.status_code == 413


WRONG_TYPES = {
    "chat": [{"messages": "hi"}, {"messages": [1]}, {"messages": []},
             {"messages": [{"role": "wizard", "content": "x"}]},
             {"messages": [{"role": "user", "content": 5}]},
             {"messages": USER, "max_tokens": "1"}, {"messages": USER, "max_tokens": 1.5},
             {"messages": USER, "stream": "yes"}, {"messages": USER, "n": 1.5},
             {"messages": USER, "max_thinking_tokens": "1"},
             {"messages": USER, "logit_bias": {"a": 1}},
             {"messages": USER, "logit_bias": {"1": 1000}},
             {"messages": USER, "logit_bias": []},
             {"messages": USER, "stop": [""]}, {"messages": USER, "stop": 5},
             {"messages": USER, "seed": 2 ** 64}, {"messages": USER, "seed": "7"},
             {"messages": USER, "tools": "x"}, {"messages": USER, "response_format": 1},
             {"messages": USER, "guided_regex": ""}, {"messages": USER, "guided_choice": []},
             {"messages": USER, "logits_processors": [{"name": "nope"}]},
             {"messages": USER, "sampler_order": ["top_k", "top_k"]},
             {"messages": USER, "stop_token_ids": [-1]},
             {"messages": USER, "allowed_token_ids": [10 ** 9]},
             {"messages": USER, "bad_words_ids": [[1] * 100]},
             {"messages": USER, "chat_template": 5},
             {"messages": USER, "chat_template_kwargs": []},
             {"messages": USER, "truncate_prompt_tokens": 0},
             {"messages": USER, "dry_sequence_breakers": ["x" * 1000]}],
    "completions": [{"prompt": 5}, {"prompt": []}, {"prompt": [[]]}, {"prompt": [-1]},
                    {"prompt": [10 ** 12]}, {"prompt": "hi", "max_tokens": "1"},
                    {"prompt": "hi", "logprobs": 99}, {"prompt": "hi", "echo": "yes"},
                    {"prompt": "hi", "top_logprobs": 2 ** 31}],
    "messages": [{"messages": USER}, {"messages": USER, "max_tokens": "1"},
                 {"messages": USER, "max_tokens": 1, "max_thinking_tokens": "1"},
                 {"messages": USER, "max_tokens": 1, "max_thinking_tokens": 3},
                 {"messages": USER, "max_tokens": 1, "temperature": 1.5},
                 {"messages": USER, "max_tokens": 1, "stop": ["x"]},
                 {"messages": USER, "max_tokens": 1, "stop_sequences": "x"},
                 {"messages": USER, "max_tokens": 1, "system": 5},
                 {"messages": USER, "max_tokens": 1, "thinking": {"type": "enabled"}},
                 {"messages": [{"role": "system", "content": "x"}], "max_tokens": 1},
                 {"messages": USER, "max_tokens": 1, "tool_choice": {"type": "any"}}],
}


@pytest.mark.parametrize("route", list(ROUTES))
def test_wrong_types(keyed_servers, route):
    path, protocol, _ = ROUTES[route]
    for body in WRONG_TYPES[route]:
        r = _send(keyed_servers, path, body, f"wrong types, {route}")
        assert r.status_code == 400, (body, r.text[:300])
        _assert_400(r, protocol)
    if route != "completions":      # issue 11: this one was accepted silently
        r = _send(keyed_servers, path, {"messages": USER, "max_tokens": 1,
                                        "max_thinking_tokens": "1"}, f"wrong types, {route}")
        _assert_400(r, protocol, "max_thinking_tokens")


def test_stop_strings_are_capped_on_every_route(keyed_servers):
    from serving.http import openai_fields
    long_stop = "x" * (limits.MAX_STOP_CHARS + 1)
    cases = [
        ("/v1/chat/completions", "openai", "stop",
         {"messages": USER, "max_tokens": 1, "stop": ["s%d" % i for i in
                                                      range(openai_fields.MAX_STOP + 1)]}),
        ("/v1/chat/completions", "openai", "stop",
         {"messages": USER, "max_tokens": 1, "stop": [long_stop]}),
        ("/v1/completions", "openai", "stop",
         {"prompt": "hi", "max_tokens": 1, "stop": ["s%d" % i for i in
                                                    range(MAX_STOP_STRINGS + 1)]}),
        ("/v1/completions", "openai", "stop",
         {"prompt": "hi", "max_tokens": 1, "stop": long_stop}),
        ("/v1/messages", "anthropic", "stop_sequences",
         {"messages": USER, "max_tokens": 1,
          "stop_sequences": ["s%d" % i for i in range(100_000)]}),
        ("/v1/messages", "anthropic", "stop_sequences",
         {"messages": USER, "max_tokens": 1, "stop_sequences": [long_stop]}),
    ]
    for path, protocol, field, body in cases:
        _assert_400(_send(keyed_servers, path, body, "cost limits"), protocol, field)
    # at the caps: accepted
    r = _send(keyed_servers, "/v1/messages", {
        "messages": USER, "max_tokens": 1,
        "stop_sequences": ["s%d" % i for i in range(limits.MAX_STOP_SEQUENCES)]},
        "cost limits")
    assert r.status_code == 200


def test_prompts_are_capped_and_run_as_one_batch(keyed_servers):
    r = _send(keyed_servers, "/v1/completions",
              {"prompt": ["hi"] * (limits.MAX_PROMPTS + 1), "max_tokens": 1}, "cost limits")
    _assert_400(r, "openai", "prompt")
    prompts = [f"prompt {i}" for i in range(8)]
    r = _send(keyed_servers, "/v1/completions",
              {"prompt": prompts, "max_tokens": 3, "temperature": 0, "ignore_eos": True},
              "cost limits")
    assert r.status_code == 200
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == list(range(8))
    # each prompt's text is its own: the same as that prompt alone
    alone = _send(keyed_servers, "/v1/completions",
                  {"prompt": prompts[5], "max_tokens": 3, "temperature": 0,
                   "ignore_eos": True}, "cost limits").json()["choices"][0]["text"]
    assert choices[5]["text"] == alone
    r = _send(keyed_servers, "/v1/completions",
              {"prompt": prompts, "max_tokens": 2, "stream": True}, "cost limits")
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")


BOMBS = ["{{ 'a' * 30000000 }}", "{{ 'a' | center(30000000) }}", "{{ 'a'.ljust(30000000) }}",
         "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
         "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
         "{% endfor %}{{ ns.s }}",
         "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
         "{% endfor %}{{ ns.s }}",
         "{{ ([1] * 100000000) | length }}", "{{ 9 ** 9 ** 9 ** 9 }}",
         "{{ '%s%s' % ('a' * 4000000, 'a' * 4000000) }}",
         "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}",
         "x" * (limits.MAX_TEMPLATE_CHARS + 1)]


@pytest.mark.parametrize("route", ["chat", "messages"])
def test_template_bombs(keyed_servers, route):
    path, protocol, base = ROUTES[route]
    for template in BOMBS:
        start = time.monotonic()
        r = _send(keyed_servers, path, dict(base(), chat_template=template), "cost limits")
        _assert_400(r, protocol)
        assert time.monotonic() - start < 30
    # a normal per-request template still works
    r = _send(keyed_servers, path, dict(base(), chat_template="{{ messages[0]['content'] }}"),
              "cost limits")
    assert r.status_code == 200


def test_auto_compact_of_many_turns(keyed_servers):
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"}
             for i in range(2001)]
    r = _send(keyed_servers, "/v1/chat/completions",
              {"messages": turns, "max_tokens": 2,
               "chat_template_kwargs": {"auto_compact": True}}, "cost limits", timeout=60)
    assert r.status_code == 200
    assert r.json()["compacted_tokens"] > 0
    r = _send(keyed_servers, "/v1/messages",
              {"messages": turns, "max_tokens": 2,
               "chat_template_kwargs": {"auto_compact": True}}, "cost limits", timeout=60)
    assert r.status_code == 200


def test_the_engine_still_serves_and_the_table(keyed_servers):
    """Last in the module: after everything above, every route answers normally."""
    for route, (path, protocol, base) in ROUTES.items():
        r = _send(keyed_servers, path, dict(base(), max_tokens=4), "after the corpus")
        assert r.status_code == 200, r.text
    assert requests.get(keyed_servers.base_url + "/health", timeout=30).status_code == 200
    assert MAX_SEQUENCE > CONTEXT
    total = Counter()
    print("\n%-32s %6s %6s %6s %6s %6s" % ("corpus", "sent", "ok", "4xx", "5xx", "hangs"))
    for name, row in TABLE.items():
        total.update(row)
        print("%-32s %6d %6d %6d %6d %6d" % (name, row["sent"], row["ok"], row["4xx"],
                                              row["5xx"], row["hangs"]))
    print("%-32s %6d %6d %6d %6d %6d" % ("total", total["sent"], total["ok"], total["4xx"],
                                          total["5xx"], total["hangs"]))
    assert total["5xx"] == 0 and total["hangs"] == 0


def test_auto_compact_renders_a_logarithmic_number_of_times():
    """The compaction drops what the one-turn-at-a-time loop dropped, with O(log n)
    renders (that loop rendered once per dropped turn: 2000 turns took 25 s)."""
    import random

    from serving.http.prompt import fit_chat

    def reference(encode, messages, max_tokens, max_model_len):
        text, ids = encode(messages)
        first, dropped = len(ids), 0

        def fits(n):
            return n < max_model_len and (max_tokens is None or n + max_tokens <= max_model_len)

        while not fits(len(ids)):
            i = next((k for k, m in enumerate(messages[:-1]) if m["role"] != "system"), None)
            if i is None:
                break
            j = i + 1
            while j < len(messages) - 1 and messages[j]["role"] == "tool":
                j += 1
            messages, dropped = messages[:i] + messages[j:], dropped + j - i
            text, ids = encode(messages)
        return text, ids, first - len(ids) if dropped else 0, dropped

    calls = Counter()

    def encode(messages):
        calls["renders"] += 1
        text = "|".join(m["content"] for m in messages)
        return text, [0] * len(text)

    rng = random.Random(0)
    for _ in range(500):
        msgs = [{"role": rng.choice(["system", "user", "assistant", "tool"]),
                 "content": "x" * rng.randint(0, 9)} for _ in range(rng.randint(1, 12))]
        limit, max_tokens = rng.randint(1, 60), rng.choice([None, 1, 5])
        got = fit_chat(encode, msgs, max_tokens, limit, True)
        assert (got.text, got.ids, got.compacted_tokens, got.dropped_messages) == \
            reference(encode, msgs, max_tokens, limit)
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"}
             for i in range(2001)]
    calls.clear()
    fitted = fit_chat(encode, turns, 16, 2048, True)
    assert fitted.dropped_messages > 1000 and len(fitted.ids) + 16 <= 2048
    assert calls["renders"] <= 2 + 12          # first render, all dropped, ~log2(2000)
