"""Overload: 10x the capacity for 10 s, every request answered, refusals fast.

One `flaxserve serve` (bundled default model) whose capacity is small on purpose: the
engine has 2 slots and a queue of 1, the front end admits 6 at once and lets 2 wait
0.5 s. Thirty clients (OpenAI and Anthropic routes) hammer it for 10 s. Every request
must get an answer: a 200 with a whole completion, or a fast 429 (OpenAI) / 529
(Anthropic) with Retry-After, whether the front end (admission) or the engine (its full
queue, RESOURCE_EXHAUSTED) refused it; never a 5xx, a hang or a lost request. `/health`
and `/metrics` are timed meanwhile. Then a client that leaves a request, non-streaming or
streaming, must free its engine slot within about a second.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

from tests.reliability.serve_proc import Serve, quantiles, wait_until

CLIENTS = 30
DURATION_S = 10.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Serve(tmp_path_factory.mktemp("overload"), "--max-inflight", "6",
              "--max-waiting", "2", "--queue-timeout", "0.5", "--max-queue", "1",
              max_slots=2)
    try:
        yield s
    finally:
        s.close()


def _post(port: int, path: str, body: dict, timeout_s: float = 60.0):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        c.request("POST", path, json.dumps(body), {"content-type": "application/json",
                                                   "anthropic-version": "2023-06-01"})
        r = c.getresponse()
        return r.status, dict((k.lower(), v) for k, v in r.getheaders()), r.read()
    finally:
        c.close()


CHAT = {"model": "default", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 8}


def _check(path: str, status: int, headers: dict, raw: bytes) -> str:
    """'ok', 'refused' or a description of what is wrong with the answer."""
    body = json.loads(raw)
    if status == 200:
        if path == "/v1/messages":
            good = body.get("type") == "message" and body.get("stop_reason") in (
                "max_tokens", "end_turn")
        else:
            good = body["choices"][0]["finish_reason"] in ("length", "stop")
        return "ok" if good else f"200 without a whole completion: {body}"
    if "retry-after" not in headers:
        return f"{status} without Retry-After"
    if path == "/v1/messages":
        if status == 529 and body["error"]["type"] == "overloaded_error":
            return "refused"
    elif status == 429 and body["error"]["type"] == "rate_limit_exceeded" and (
            body["error"]["code"] == "server_overloaded"):
        return "refused"
    return f"unexpected {status}: {body}"


def test_ten_times_capacity_every_request_answered(server):
    results, lock = [], threading.Lock()
    health, stop = [], threading.Event()

    def client(i: int):
        path = "/v1/messages" if i % 2 else "/v1/chat/completions"
        end = time.monotonic() + DURATION_S
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                status, headers, raw = _post(server.port, path, CHAT)
                verdict = _check(path, status, headers, raw)
                by = "engine" if b"engine is at capacity" in raw else "front end"
            except (OSError, http.client.HTTPException) as e:
                status, verdict, by = None, f"no answer: {e!r}", None
            with lock:
                results.append((status, verdict, time.monotonic() - t0, by))

    def probe():
        while not stop.is_set():
            for route in ("/health", "/metrics"):
                t0 = time.monotonic()
                c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
                c.request("GET", route)
                r = c.getresponse()
                r.read()
                c.close()
                health.append((r.status, time.monotonic() - t0, route))
            time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    prober = threading.Thread(target=probe)
    prober.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    prober.join(30)
    hung = sum(t.is_alive() for t in threads)

    ok = [r for r in results if r[1] == "ok"]
    refused = [r for r in results if r[1] == "refused"]
    bad = [r for r in results if r[1] not in ("ok", "refused")]
    c4 = sum(1 for r in results if r[0] is not None and 400 <= r[0] < 500)
    c5 = sum(1 for r in results if r[0] is not None and r[0] >= 500 and r[0] != 529)
    no_answer = sum(1 for r in results if r[0] is None)
    print(f"\noverload {CLIENTS} clients x {DURATION_S:g} s: sent {len(results)} / ok "
          f"{len(ok)} / 4xx {c4} / 5xx {c5} (529s counted as refusals: "
          f"{sum(1 for r in results if r[0] == 529)}) / hangs {hung + no_answer} / lost "
          f"{len(bad)}; refused by the front end "
          f"{sum(1 for r in refused if r[3] == 'front end')}, by the engine's queue "
          f"{sum(1 for r in refused if r[3] == 'engine')}")
    print(f"  refusal latency {quantiles([r[2] for r in refused])}")
    print(f"  accepted latency {quantiles([r[2] for r in ok])}")
    for route in ("/health", "/metrics"):
        print(f"  {route} latency under overload "
              f"{quantiles([h[1] for h in health if h[2] == route])}")
    assert not bad, bad[:5]
    assert hung == 0
    assert ok and refused, "the load must both succeed and be shed"
    assert health and all(h[0] == 200 for h in health)


def _raw_request(port: int, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: "
              b"application/json\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
    return s


_WARM: list = []


@pytest.mark.parametrize("stream", [False, True])
def test_client_that_leaves_frees_its_slot(server, stream):
    assert wait_until(lambda: server.slots_in_use() == 0, 30, 0.1) is not None
    long = dict(CHAT, max_tokens=240, ignore_eos=True, stream=stream)
    if not _WARM:
        _WARM.append(True)
        # one whole request of this length first: every program it needs is compiled (an
        # engine that compiles in the background would otherwise free the slot only after
        # a compilation, whatever the cancel)
        assert _post(server.port, "/v1/chat/completions", dict(long, stream=False))[0] == 200
    s = _raw_request(server.port, long)
    try:
        assert wait_until(lambda: server.slots_in_use() >= 1, 20, 0.05) is not None
    finally:
        s.close()
    freed = wait_until(lambda: server.slots_in_use() == 0, 10, 0.05)
    print(f"\n{'streaming' if stream else 'non-streaming'} request abandoned: engine slot "
          f"freed {freed if freed is None else f'{freed:.2f} s'} after the client left")
    assert freed is not None and freed < 3.0


def test_admission_places_queue_and_drain_in_process():
    """The WSGI wrapper alone, around an app that holds its place until released: the
    queue wait, the immediate refusal when the queue is full, each protocol's shape, the
    place freed when the response is closed, and 503 once draining."""
    from serving.http.admission import Admission, Limits

    gate = threading.Event()

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        if environ["REQUEST_METHOD"] == "POST":
            gate.wait(10)
        return [b"ok"]

    adm = Admission(app, Limits(max_inflight=1, max_waiting=1, queue_timeout_s=0.3))

    def call(path="/v1/chat/completions", method="POST"):
        seen = {}

        def start_response(status, headers):
            seen["status"], seen["headers"] = status, dict(headers)
        body = adm({"REQUEST_METHOD": method, "PATH_INFO": path}, start_response)
        data = b"".join(body)
        getattr(body, "close", lambda: None)()
        return seen["status"], seen["headers"], data

    held = threading.Thread(target=call)
    held.start()
    assert wait_until(lambda: adm.stats()["inflight"] == 1, 5) is not None
    waiter = {}
    t = threading.Thread(target=lambda: waiter.update(r=call("/v1/messages")))
    t.start()
    assert wait_until(lambda: adm.stats()["waiting"] == 1, 5) is not None
    t0 = time.monotonic()
    status, headers, data = call()                   # the queue is full: refused at once
    fast = time.monotonic() - t0
    assert status.startswith("429") and headers["Retry-After"] == "1"
    assert json.loads(data)["error"]["code"] == "server_overloaded"
    t.join(5)                                        # the waiter timed out in the queue
    status, headers, data = waiter["r"]
    assert status.startswith("529") and json.loads(data)["error"]["type"] == "overloaded_error"
    assert call("/health", "GET")[0] == "200 OK"     # GETs never wait for a place
    gate.set()                                       # the held request ends
    held.join(5)
    assert adm.stats() == {"inflight": 0, "waiting": 0, "draining": False}
    assert call()[0] == "200 OK"                     # the place was given back
    adm.begin_drain()
    status, headers, data = call()
    assert status.startswith("503") and "Retry-After" in headers
    print(f"\nin-process refusal with a full queue took {fast * 1000:.2f} ms")
