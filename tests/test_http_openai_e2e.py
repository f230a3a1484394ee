"""End to end, OpenAI side: the official `openai` SDK against gunicorn (a real process)
in front of a real `flaxserve engine` serving a tiny random model. Every non-streaming
body and every chunk is validated against the OpenAI schema subset."""

from __future__ import annotations

import json

import requests
import openai
import pytest

from tests.http_fixtures import API_KEY, sse_events, start_servers, validate_openai

pytestmark = pytest.mark.timeout(300)
MESSAGES = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    yield from start_servers(tmp_path_factory)


@pytest.fixture(scope="module")
def client(servers):
    return openai.OpenAI(base_url=servers.base_url + "/v1", api_key=API_KEY, max_retries=0)


def raw_post(servers, path: str, body: dict, **headers) -> requests.Response:
    headers.setdefault("Authorization", f"Bearer {API_KEY}")
    return requests.post(servers.base_url + path, json=body, headers=headers, timeout=120)


def sse_chunks(response: requests.Response) -> list:
    """The data payloads of an SSE body, `[DONE]` included as a string."""
    assert response.headers["content-type"].startswith("text/event-stream")
    return [data if data == "[DONE]" else json.loads(data)
            for _, data in sse_events(response.content)]


def test_models(client, servers):
    names = [m.id for m in client.models.list()]
    assert names == ["tiny", "tiny-alias"]
    validate_openai(requests.get(servers.base_url + "/v1/models",
                              headers={"x-api-key": API_KEY}, timeout=30).json(),
                   "ListModelsResponse")


def test_create_non_streaming(client, servers):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6,
                                       temperature=0)
    assert r.id.startswith("chatcmpl-") and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    raw = raw_post(servers, "/v1/chat/completions",
                   {"model": "tiny", "messages": MESSAGES, "max_tokens": 6, "n": 2,
                    "logprobs": True, "top_logprobs": 3})
    assert raw.status_code == 200 and raw.headers["x-request-id"]
    body = raw.json()
    validate_openai(body, "CreateChatCompletionResponse")
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for c in body["choices"]:
        content = c["logprobs"]["content"]
        assert "".join(t["token"] for t in content) == c["message"]["content"]
        assert all(len(t["top_logprobs"]) == 3 for t in content)
        assert all(t["logprob"] <= 0 for t in content)
    u = body["usage"]
    assert u["prompt_tokens_details"]["cached_tokens"] >= 0
    assert u["completion_tokens_details"]["reasoning_tokens"] == 0
    assert u["gpu_seconds"] > 0


def test_create_streaming_and_chunks(client, servers):
    text = ""
    for chunk in client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6,
                                                stream=True):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    raw = raw_post(servers, "/v1/chat/completions",
                   {"model": "tiny", "messages": MESSAGES, "max_tokens": 5, "n": 2,
                    "stream": True, "stream_options": {"include_usage": True},
                    "logprobs": True, "top_logprobs": 2})
    chunks = sse_chunks(raw)
    assert chunks[-1] == "[DONE]"
    chunks = chunks[:-1]
    for c in chunks:
        validate_openai(c, "CreateChatCompletionStreamResponse")
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert all(c["usage"] is None for c in chunks[:-1])
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert [m["finish_reason"] is not None for m in mine].count(True) == 1
        assert mine[-1]["finish_reason"] in ("stop", "length") and mine[-1]["delta"] == {}


def test_stream_accumulator(client):
    # The SDK's accumulator refuses a "length" finish, so end on EOS: min_tokens keeps EOS
    # out for 3 tokens, then a logit_bias on it (id 1, "</s>") makes it the next token.
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=12, seed=3,
              extra_body={"min_tokens": 3}, logit_bias={"1": 100})
    with client.chat.completions.stream(**kw) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    plain = client.chat.completions.create(**kw)
    assert final.choices[0].finish_reason == plain.choices[0].finish_reason == "stop"
    assert final.choices[0].message.content == plain.choices[0].message.content
    assert final.usage is None or final.usage.completion_tokens == 4
    assert plain.usage.completion_tokens == 4


def test_seed_reproducible(client):
    def once(seed):
        return client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8,
                                              temperature=1.0, seed=seed,
                                              n=2).choices
    a, b = once(11), once(11)
    assert [c.message.content for c in a] == [c.message.content for c in b]


def test_stop_string(client):
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12,
                                          temperature=0, extra_body={"ignore_eos": True})
    text = full.choices[0].message.content
    assert len(text) >= 3
    stop = text[1:3] if text[1:3].strip() else text[2:4]
    cut = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12,
                                         temperature=0, stop=[stop],
                                         extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[:text.index(stop)]


def test_legacy_completions(client, servers):
    r = client.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0,
                                  echo=True)
    assert r.choices[0].text.startswith("hello")
    body = raw_post(servers, "/v1/completions", {"model": "tiny", "prompt": ["hello", "the"],
                                                 "max_tokens": 3, "logprobs": 2}).json()
    validate_openai(body, "CreateCompletionResponse")
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for c in body["choices"]:
        assert "".join(c["logprobs"]["tokens"]) == c["text"]
    chunks = sse_chunks(raw_post(servers, "/v1/completions", {
        "model": "tiny", "prompt": "hello", "max_tokens": 3, "stream": True}))
    assert chunks[-1] == "[DONE]" and chunks[-2]["choices"][0]["finish_reason"]
    bad = raw_post(servers, "/v1/completions", {"model": "tiny", "prompt": "hi", "echo": True,
                                                "logprobs": 1, "stream": True})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "echo"


def test_paged_prefix_cache_reports_through_usage_and_metrics(client, servers):
    """The engine runs the default paged KV: a repeated 40-token prompt reuses its two full
    blocks of 16 (cached_tokens), and /metrics shows block usage and the hit rate."""
    ids = [(7 * i) % 200 + 10 for i in range(40)]
    first, again = (client.completions.create(model="tiny", prompt=ids, max_tokens=2,
                                              temperature=0) for _ in range(2))
    assert again.usage.prompt_tokens_details.cached_tokens == 32
    assert again.choices[0].text == first.choices[0].text
    text = requests.get(servers.base_url + "/metrics", timeout=30).text
    gauges = {line.split()[0]: float(line.split()[-1]) for line in text.splitlines()
              if line.startswith("flaxserve_engine_")}
    assert gauges["flaxserve_engine_kv_blocks_total"] > 0
    assert 0 <= gauges["flaxserve_engine_kv_block_usage"] <= 1
    assert gauges["flaxserve_engine_prefix_cache_hit_tokens"] >= 32
    assert 0 < gauges["flaxserve_engine_prefix_cache_hit_rate"] <= 1


def test_legacy_echo_logprobs_scores_the_prompt(client):
    """The scoring path: echo + logprobs gives the prompt tokens' logprobs, then the
    completion's; the prompt's log-likelihood does not depend on what is sampled."""
    def score(max_tokens, seed):
        r = client.completions.create(model="tiny", prompt="hello world, the quick fox",
                                      max_tokens=max_tokens, echo=True, logprobs=2, seed=seed)
        return r.choices[0]
    a, b = score(1, 1), score(3, 2)
    lp = a.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    n_prompt = len(lp.tokens) - 1
    assert n_prompt >= 3 and len(b.logprobs.tokens) == n_prompt + 3
    assert a.text.startswith("hello world, the quick fox")
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert lp.token_logprobs[1:n_prompt] == b.logprobs.token_logprobs[1:n_prompt]
    assert all(len(t) >= 1 for t in lp.top_logprobs[1:])


@pytest.mark.parametrize("patch,param", [
    ({"temperature": 4.5}, "temperature"), ({"top_k": -7}, "top_k"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"logit_bias": {"100000": 5}}, "logit_bias"),
    ({"stop": [f"s{i}" for i in range(33)]}, "stop"),
    # tools and response_format are served now; bad values of them are still a 400
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]},
     "tools[0].function.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": 5}}}}, "response_format.json_schema.schema"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_field_is_400_before_any_stream(servers, patch, param, stream):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4, "stream": stream, **patch}
    r = raw_post(servers, "/v1/chat/completions", body)
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
    validate_openai(r.json(), "ErrorResponse")
    assert r.json()["error"]["param"] == param


def test_sdk_errors(client, servers):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MESSAGES, top_p=5)
    bad = openai.OpenAI(base_url=servers.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_bench_serve_drives_http(servers):
    import subprocess
    import sys
    from tests.http_fixtures import ROOT, _env
    proc = subprocess.run(
        [sys.executable, "-m", "serving.cli", "bench", "serve", "--http", servers.base_url,
         "--api-key", API_KEY, "--concurrency", "1,2", "--num-requests", "2",
         "--prompt-len", "6", "--output-len", "4", "--json"],
        capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["concurrency"] for r in out["runs"]] == [1, 2]
    assert all(r["completed"] == 2 and r["output_tokens"] > 0 for r in out["runs"])
