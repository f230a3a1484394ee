"""Schemathesis over our own /openapi.json against a real engine + gunicorn (issue 11).

The document is fetched from the running server (so what is tested is what is served);
schemathesis generates bodies that match each operation's schema (positive) and bodies
that break it (negative), a few hundred per operation in all. No answer may be a 5xx or
take longer than the client timeout. Generation lengths are kept small by narrowing
`max_tokens` in the fetched schema (the server's own bounds are far wider), so the run
stays within a couple of minutes on 2 cores. The table is printed at the end (`-s`).
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import requests

from tests.http_fixtures import API_KEY

pytestmark = pytest.mark.timeout(900)

schemathesis = pytest.importorskip("schemathesis", minversion="4.0")
hypothesis = pytest.importorskip("hypothesis")

# examples per operation and generation mode (positive + negative): the generation
# routes get the most; other POSTs and GETs fewer, so the file stays within minutes
CORE = {"/v1/chat/completions", "/v1/completions", "/v1/messages",
        "/v1/messages/count_tokens"}
POST_EXAMPLES = 40
OTHER_POST_EXAMPLES = 12
GET_EXAMPLES = 10
# routes outside the generation core whose schemas are wide (any-typed fields): few
# examples each, so generating them does not dominate the file's minutes
LIGHT = {"/v1/responses": 10, "/tokenize": 10, "/detokenize": 10}
MAX_TOKENS = 4
TABLE: dict[str, Counter] = {}


def _narrow(node):
    """Small generations: every `max_tokens`-like property at most MAX_TOKENS."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("max_tokens", "max_completion_tokens", "min_tokens",
                       "max_thinking_tokens") and isinstance(value, dict):
                for alt in [value] + list(value.get("anyOf", [])):
                    if alt.get("type") in ("integer", ["integer", "null"]):
                        alt["maximum"] = MAX_TOKENS
            else:
                _narrow(value)
    elif isinstance(node, list):
        for value in node:
            _narrow(value)
    return node


def test_openapi_declares_required_fields(keyed_servers):
    spec = requests.get(keyed_servers.base_url + "/openapi.json", timeout=30).json()
    schemas = spec["components"]["schemas"]
    assert schemas["ChatRequest"]["required"] == ["messages"]
    assert schemas["CompletionRequest"]["required"] == ["prompt"]
    assert schemas["MessagesRequest"]["required"] == ["messages", "max_tokens"]
    top_k = schemas["ChatRequest"]["properties"]["top_k"]
    assert top_k["type"] == "integer" and top_k["maximum"] < 2 ** 31


def test_no_5xx_over_the_schema(keyed_servers):
    from hypothesis import HealthCheck, Phase, settings

    from schemathesis import GenerationMode

    raw = requests.get(keyed_servers.base_url + "/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(_narrow(raw))
    headers = {"Authorization": f"Bearer {API_KEY}"}
    session = requests.Session()
    failures = []
    for result in schema.get_all_operations():
        op = result.ok()
        examples = (LIGHT[op.path] if op.path in LIGHT else
                    POST_EXAMPLES if op.path in CORE else
                    OTHER_POST_EXAMPLES if op.method.upper() == "POST" else GET_EXAMPLES)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            row = TABLE.setdefault(f"{op.label} ({mode.value})", Counter())

            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            @hypothesis.given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                row["sent"] += 1
                try:
                    r = case.call(base_url=keyed_servers.base_url, session=session,
                                  headers=headers, timeout=60)
                except requests.Timeout:
                    row["hangs"] += 1
                    failures.append((op.label, case.body, "no answer in 60 s"))
                    return
                except requests.RequestException as e:   # a body requests cannot send
                    row["unsendable"] += 1
                    return
                kind = ("ok" if r.status_code < 400 else "4xx" if r.status_code < 500
                        else "5xx")
                row[kind] += 1
                if r.status_code >= 500:
                    failures.append((op.label, json.dumps(case.body, default=str)[:300],
                                     r.status_code, r.text[:300]))

            run()
    total = Counter()
    print("\n%-48s %6s %6s %6s %6s %6s" % ("operation", "sent", "ok", "4xx", "5xx", "hangs"))
    for name, row in TABLE.items():
        total.update(row)
        print("%-48s %6d %6d %6d %6d %6d" % (name, row["sent"], row["ok"], row["4xx"],
                                              row["5xx"], row["hangs"]))
    print("%-48s %6d %6d %6d %6d %6d" % ("total", total["sent"], total["ok"], total["4xx"],
                                          total["5xx"], total["hangs"]))
    assert not failures, failures[:5]
    assert total["sent"] >= 5 * POST_EXAMPLES     # a few hundred cases per POST operation
    # the server still serves a normal request afterwards
    r = session.post(keyed_servers.base_url + "/v1/chat/completions", headers=headers,
                     json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                     timeout=60)
    assert r.status_code == 200
