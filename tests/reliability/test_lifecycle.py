"""Process lifecycle of `flaxserve serve`: fail fast, heal, leave nothing behind.

- A busy HTTP or gRPC port: one clear error line, at once, before any model loads.
- SIGKILL of the front end: `serve` restarts it as well.
- SIGKILL of the engine: the front end answers 503 with Retry-After at once (a running
  stream ends with an error event), `serve` restarts the engine by itself, and the front
  end serves again within about a second of the engine being healthy.
- SIGHUP (a closed terminal) and SIGKILL of `serve` itself: no engine or gunicorn process
  and no bound port is left behind.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.http_fixtures import ROOT, free_port, sse_events
from tests.reliability.serve_proc import (GRPC_TOKEN, Serve, alive, children_of, env,
                                          port_free, wait_until)

CHAT = {"model": "default", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4}


def _post(port: int, body: dict, timeout_s: float = 30.0):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        c.request("POST", "/v1/chat/completions", json.dumps(body),
                  {"content-type": "application/json"})
        r = c.getresponse()
        return r.status, r.getheader("retry-after"), r.read()
    except (OSError, http.client.HTTPException):
        return None, None, b""
    finally:
        c.close()


@pytest.mark.parametrize("busy", ["--port", "--grpc-port"])
def test_busy_port_is_one_clear_line_at_once(busy):
    port, grpc_port = free_port(), free_port()
    holder = socket.socket()
    holder.bind(("127.0.0.1", port if busy == "--port" else grpc_port))
    holder.listen()
    try:
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "serving.cli", "serve", "--port", str(port),
                            "--grpc-port", str(grpc_port)], cwd=ROOT, env=env(),
                           capture_output=True, text=True, timeout=60)
        took = time.monotonic() - t0
    finally:
        holder.close()
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    print(f"\nbusy {busy}: exit {r.returncode} after {took:.2f} s: {lines}")
    assert r.returncode == 2
    assert len(lines) == 1 and busy in lines[0] and "already in use" in lines[0]
    assert "serving on" not in r.stdout + r.stderr
    assert took < 10          # hang guard; the figure above is the measure


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Serve(tmp_path_factory.mktemp("lifecycle"), "--drain-timeout", "5")
    try:
        yield s
    finally:
        s.close()


def _engine_healthy(address: str) -> bool:
    from serving.client import EngineClient
    with EngineClient(address, token=GRPC_TOKEN) as c:
        return c.healthy(timeout=0.5)


def test_engine_sigkill_503_then_back_by_itself(server):
    assert _post(server.port, CHAT)[0] == 200
    # a stream running when the engine dies ends with an error event and [DONE]
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    c.request("POST", "/v1/chat/completions",
              json.dumps(dict(CHAT, max_tokens=240, ignore_eos=True, stream=True)),
              {"content-type": "application/json"})
    resp = c.getresponse()
    assert resp.status == 200
    resp.read1(1)                            # the stream has begun
    engine = server.engine_pid()
    os.kill(engine, signal.SIGKILL)
    t_kill = time.monotonic()
    first_503 = retry_after = None
    before = []
    while time.monotonic() - t_kill < 10:
        status, retry_after, _ = _post(server.port, CHAT, timeout_s=10)
        if status == 503:
            first_503 = time.monotonic() - t_kill
            break
        before.append(status)
        time.sleep(0.02)
    events = sse_events(resp.read())
    c.close()
    address = f"127.0.0.1:{server.grpc_port}"
    engine_back = wait_until(lambda: _engine_healthy(address), 300, 0.05)
    t_engine = time.monotonic()
    served = wait_until(lambda: _post(server.port, CHAT, timeout_s=10)[0] == 200, 30, 0.05)
    lag = time.monotonic() - t_engine if served is not None else None
    print(f"\nengine SIGKILL: first 503 after {first_503:.2f} s (Retry-After {retry_after}; "
          f"answers before it: {before}); "
          f"engine healthy again after {engine_back:.1f} s (restarted by serve); front end "
          f"served again {lag:.2f} s after that")
    assert events[-1][1] == "[DONE]"
    assert "error" in json.loads(events[-2][1])
    assert first_503 is not None and first_503 < 5 and retry_after
    assert engine_back is not None and served is not None and lag < 5
    assert server.engine_pid() != engine
    assert "restarting it" in server.text()


def test_front_end_sigkill_is_restarted(server):
    """A dead gunicorn master (its workers follow it) is restarted by serve too."""
    master = next(p for p in children_of(server.proc.pid)
                  if b"serving.http.main" in open(f"/proc/{p}/cmdline", "rb").read())
    workers = children_of(master)
    os.kill(master, signal.SIGKILL)
    t0 = time.monotonic()

    def front_end(p: int) -> bool:
        try:
            return b"serving.http.main" in open(f"/proc/{p}/cmdline", "rb").read()
        except OSError:
            return False

    def replaced() -> bool:     # a new master, started by serve (the gap without one can
        return any(p != master and front_end(p)          # be too short for a request to
                   for p in children_of(server.proc.pid))  # see it)
    assert wait_until(replaced, 30, 0.02) is not None
    # serve kills what is left of the dead master's group: no orphaned worker keeps the
    # port (it would answer for a while and make the new master's bind fail)
    assert workers
    assert wait_until(lambda: not any(alive(p) for p in workers), 5, 0.02) is not None
    back = wait_until(lambda: _post(server.port, CHAT, timeout_s=5)[0] == 200, 90, 0.1)
    assert back is not None
    print(f"\nfront end SIGKILL: serving again after {time.monotonic() - t0:.1f} s "
          "(restarted by serve)")
    assert "the http front end exited" in server.text()


def _all_gone(pids: list[int], ports: list[int]) -> bool:
    return not any(alive(p) for p in pids) and all(port_free(p) for p in ports)


def test_sighup_leaves_nothing_behind(server):
    pids = children_of(server.proc.pid)
    assert len(pids) >= 3                    # engine, gunicorn master, a worker
    server.proc.send_signal(signal.SIGHUP)
    took = wait_until(lambda: _all_gone(pids, [server.port, server.grpc_port]), 60, 0.1)
    print(f"\nSIGHUP: {len(pids)} children and both ports gone after "
          f"{took if took is None else f'{took:.1f} s'}")
    assert took is not None
    assert server.proc.wait(30) == 0


def test_parent_sigkill_leaves_nothing_behind(tmp_path):
    s = Serve(tmp_path)
    pids = children_of(s.proc.pid)
    try:
        assert len(pids) >= 3
        s.proc.kill()
        s.proc.wait(10)
        took = wait_until(lambda: _all_gone(pids, [s.port, s.grpc_port]), 60, 0.1)
        print(f"\nSIGKILL of serve: {len(pids)} children and both ports gone after "
              f"{took if took is None else f'{took:.1f} s'}")
        assert took is not None, [p for p in pids if alive(p)]
    finally:
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)
        s.close()
