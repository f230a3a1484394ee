"""Slow clients (slowloris): 100 connections that trickle their headers or their body
must neither hold the front end's threads nor keep normal requests from being served.

The worker (serving/http/worker.py) reads each request in its event loop until it is
complete and only then gives it a thread; an incomplete request is closed at its deadline
(`--header-timeout`, `--body-timeout`). Here: 70 connections send a partial head and one
more header line per second, 30 send whole headers and trickle their body; meanwhile
normal requests (OpenAI and Anthropic) must all succeed, and after the deadlines the
server must have closed the slow connections.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

from tests.reliability.serve_proc import Serve, quantiles

SLOW_HEADERS, SLOW_BODIES = 70, 30
HEADER_TIMEOUT_S, BODY_TIMEOUT_S = 4.0, 4.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Serve(tmp_path_factory.mktemp("slowloris"), "--header-timeout",
              str(HEADER_TIMEOUT_S), "--body-timeout", str(BODY_TIMEOUT_S),
              "--max-inflight", "8")
    try:
        yield s
    finally:
        s.close()


def _normal(port: int, path: str) -> tuple[int | None, float]:
    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4}
    t0 = time.monotonic()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        c.request("POST", path, json.dumps(body), {"content-type": "application/json"})
        r = c.getresponse()
        r.read()
        return r.status, time.monotonic() - t0
    except (OSError, http.client.HTTPException):
        return None, time.monotonic() - t0
    finally:
        c.close()


def test_slow_connections_do_not_starve_normal_requests(server):
    slow = []
    for i in range(SLOW_HEADERS + SLOW_BODIES):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        if i < SLOW_HEADERS:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n")
        else:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: "
                      b"application/json\r\nContent-Length: 100000\r\n\r\n{")
        slow.append(s)
    stop = threading.Event()
    trickled = [0]

    def trickle():
        while not stop.is_set():
            for i, s in enumerate(slow):
                try:
                    s.sendall(b"X-Slow: 1\r\n" if i < SLOW_HEADERS else b" ")
                    trickled[0] += 1
                except OSError:
                    pass
            stop.wait(1.0)

    t = threading.Thread(target=trickle)
    t.start()
    try:
        results = [_normal(server.port, "/v1/messages" if i % 2 else "/v1/chat/completions")
                   for i in range(20)]
        # after the deadlines every slow connection has been closed by the server
        time.sleep(max(HEADER_TIMEOUT_S, BODY_TIMEOUT_S) + 2.5)
        after = [_normal(server.port, "/v1/chat/completions") for _ in range(4)]
    finally:
        stop.set()
        t.join(10)
    closed = 0
    for s in slow:
        s.settimeout(2.0)
        try:
            closed += s.recv(1 << 16) == b""
        except socket.timeout:
            pass
        except OSError:
            closed += 1
        s.close()
    ok = sum(1 for st, _ in results + after if st == 200)
    sent = len(results) + len(after)
    print(f"\nslowloris {len(slow)} slow connections ({SLOW_HEADERS} headers, {SLOW_BODIES} "
          f"bodies): normal requests sent {sent} / ok {ok} / 4xx "
          f"{sum(1 for st, _ in results + after if st and 400 <= st < 500)} / 5xx "
          f"{sum(1 for st, _ in results + after if st and st >= 500)} / hangs "
          f"{sum(1 for st, _ in results + after if st is None)} / lost 0; latency "
          f"{quantiles([d for _, d in results + after])}; slow connections closed by the "
          f"server after their deadline: {closed}/{len(slow)}")
    assert ok == sent
    assert closed == len(slow)


def test_request_line_only_client_is_cut_and_whole_requests_still_pass(server):
    """A client that never finishes its head is closed at the header deadline."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=HEADER_TIMEOUT_S + 5)
    s.sendall(b"GET /health HTTP/1.1\r\n")
    t0 = time.monotonic()
    assert s.recv(1024) == b""
    waited = time.monotonic() - t0
    print(f"\nan unfinished head was closed after {waited:.1f} s "
          f"(--header-timeout {HEADER_TIMEOUT_S:g})")
    assert waited < HEADER_TIMEOUT_S + 3
    assert _normal(server.port, "/v1/chat/completions")[0] == 200


@pytest.mark.parametrize("raw,complete", [
    (b"GET /health HTTP/1.1\r\nHost: t\r\n", False),
    (b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n", True),
    (b"\r\nGET /health HTTP/1.1\r\nHost: t\r\n\r\n", True),
    (b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nabc", False),
    (b"POST /x HTTP/1.1\r\ncontent-length: 5\r\n\r\nabcde", True),
    (b"POST /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\n", True),
    (b"POST /x HTTP/1.1\r\nContent-Length: nope\r\n\r\n", True),          # parser refuses
    (b"POST /x HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n", True),   # app refuses (413)
    (b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", False),
    (b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n", False),
    (b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", True),
    (b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n",
     True),
    (b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", True),   # parser refuses
    (b"GET /" + b"a" * 70000, True),                                         # parser refuses
])
def test_request_complete(raw, complete):
    """When the worker's event loop hands a request to a thread: complete, or refusable."""
    from serving.http.worker import request_complete
    assert request_complete(raw) is complete
