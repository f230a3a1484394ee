"""End to end, Anthropic side and transport: the official `anthropic` SDK, the raw event
sequence, count_tokens against a real request, the three auth header forms and 401
shapes, /health, /metrics, no JAX in the gunicorn workers, and a client that hangs up
mid-stream freeing its engine slot."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import anthropic
import requests
import pytest

from tests.http_fixtures import API_KEY, sse_events, start_servers

pytestmark = pytest.mark.timeout(300)
MESSAGES = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    yield from start_servers(tmp_path_factory)


@pytest.fixture(scope="module")
def client(servers):
    return anthropic.Anthropic(base_url=servers.base_url, api_key=API_KEY, max_retries=0)


def test_messages_create(client):
    m = client.messages.create(model="tiny", max_tokens=6, messages=MESSAGES,
                               system="be brief", metadata={"user_id": "u1"},
                               # this SDK version dropped these from its signature
                               extra_body={"temperature": 0, "top_k": 5, "top_p": 0.9})
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant"
    assert m.stop_reason in ("end_turn", "max_tokens") and m.content[0].type == "text"
    assert m.usage.output_tokens >= 1 and m.usage.input_tokens >= 1


def test_stream_final_message_matches_create(client):
    kw = dict(model="tiny", max_tokens=6, messages=MESSAGES, extra_body={"temperature": 0})
    with client.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    plain = client.messages.create(**kw)
    assert final.content[0].text == plain.content[0].text
    assert final.stop_reason == plain.stop_reason
    assert final.usage.output_tokens == plain.usage.output_tokens


def test_raw_event_sequence(servers):
    r = requests.post(servers.base_url + "/v1/messages", timeout=120,
                   headers={"x-api-key": API_KEY, "anthropic-version": "2023-06-01"},
                   json={"model": "tiny", "max_tokens": 5, "messages": MESSAGES,
                         "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = []
    for name, data in sse_events(r.content):
        payload = json.loads(data)
        assert name == payload["type"]
        events.append(payload["type"])
    assert events[:3] == ["message_start", "content_block_start", "ping"]
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(events[3:-3]) <= {"content_block_delta", "ping"}


def test_count_tokens_equals_real_prompt(client):
    kw = dict(model="tiny", messages=MESSAGES + [{"role": "assistant", "content": "the"}],
              system="be brief")
    counted = client.messages.count_tokens(**kw).input_tokens
    m = client.messages.create(max_tokens=2, **kw)
    assert counted == m.usage.input_tokens + m.usage.cache_read_input_tokens
    assert counted > 0


def test_bad_fields_and_unknown_model(client, servers):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="tiny", max_tokens=4, messages=MESSAGES,
                               extra_body={"temperature": 1.5})
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert "temperature" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="claude-x", max_tokens=4, messages=MESSAGES)
    assert e.value.body["error"]["type"] == "not_found_error"
    r = requests.post(servers.base_url + "/v1/messages", headers={"x-api-key": API_KEY},
                      json={"model": "tiny", "max_tokens": 4, "messages": MESSAGES,
                            "stream": True, "top_p": 0}, timeout=60)
    assert r.status_code == 400 and r.json()["type"] == "error"
    assert r.headers["request-id"]


@pytest.mark.parametrize("path,body", [
    ("/v1/models", None),
    ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 2}),
])
@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {API_KEY}"},
                                     {"Authorization": f"Api-Key {API_KEY}"},
                                     {"x-api-key": API_KEY}])
def test_three_header_forms(servers, path, body, headers):
    url = servers.base_url + path
    r = requests.post(url, json=body, headers=headers, timeout=60) if body else requests.get(
        url, headers=headers, timeout=30)
    assert r.status_code == 200


def test_401_shapes(servers):
    r = requests.get(servers.base_url + "/v1/models", timeout=30,
                     headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key" and r.json()["error"]["param"] is None
    r = requests.post(servers.base_url + "/v1/messages", headers={"x-api-key": "nope"}, json={},
                      timeout=30)
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error" and r.headers["request-id"]
    bad = anthropic.Anthropic(base_url=servers.base_url, api_key="nope", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model="tiny", max_tokens=2, messages=MESSAGES)


def test_health_metrics_and_no_jax_in_workers(servers):
    assert requests.get(servers.base_url + "/health", timeout=30).status_code == 200
    text = requests.get(servers.base_url + "/metrics", timeout=30).text
    assert "flaxserve_http_requests_total" in text
    assert "flaxserve_time_to_first_token_seconds_count" in text
    pids = servers.worker_pids()
    assert pids
    for pid in pids:
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "jaxlib" not in maps and "xla_extension" not in maps
    # memory: the engine's (its Stats call) and the answering worker's own, by pid
    gauges = {line.split()[0]: float(line.split()[-1]) for line in text.splitlines()
              if line.startswith(("flaxserve_engine_", "flaxserve_http_worker_rss"))}
    engine_rss = gauges["flaxserve_engine_rss_bytes"]
    statm = Path(f"/proc/{servers.engine.pid}/statm").read_text().split()
    assert 0.5 < engine_rss / (int(statm[1]) * os.sysconf("SC_PAGE_SIZE")) < 2
    assert gauges["flaxserve_engine_weights_bytes"] > 0
    assert gauges["flaxserve_engine_kv_cache_bytes"] > 0
    workers = {int(k.split('worker="')[1].split('"')[0]): v for k, v in gauges.items()
               if k.startswith("flaxserve_http_worker_rss_bytes{")}
    assert workers and set(workers) <= set(pids) and min(workers.values()) > 10 * 2 ** 20


def _engine_busy_slots(servers) -> float:
    text = requests.get(servers.base_url + "/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith("flaxserve_engine_slots_in_use"):
            return float(line.split()[-1])
    raise AssertionError("no slots_in_use gauge in /metrics")


def test_disconnect_frees_the_slot(servers):
    # no max_tokens: it runs to the context limit unless the disconnect stops it
    body = ('{"model": "tiny", "ignore_eos": true, "stream": true, '
            '"messages": [{"role": "user", "content": "hello"}]}').encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
               f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", servers.port), timeout=60) as s:
        s.sendall(request)
        got = b""
        while got.count(b"data: ") < 3:
            more = s.recv(4096)
            assert more, got.decode(errors="replace")
            got += more
        assert b"200 OK" in got
        assert _engine_busy_slots(servers) >= 1
    deadline = time.monotonic() + 60
    while _engine_busy_slots(servers) > 0:
        assert time.monotonic() < deadline, "the slot was not freed after the client left"
        time.sleep(0.2)
