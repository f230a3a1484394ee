"""Graceful shutdown: SIGTERM, or a Ctrl-C to the terminal's process group, while streams run.

`serve` stops the front end first: it stops accepting at once, lets running generations go
on for up to `--drain-timeout` (1 s here), then ends each one still running with an error
event (OpenAI: an error object, then `[DONE]`; Anthropic: an `error` event), and only then
stops the engine. A short stream finishes normally inside the drain; long ones either
finish or end with the error event; none is cut without one. Nothing is left running.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time

import pytest

from tests.http_fixtures import sse_events
from tests.reliability.serve_proc import Serve, alive, children_of, wait_until

DRAIN_S = 1.0


def _stream(port: int, path: str, max_tokens: int, out: dict, started: threading.Event):
    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        c.request("POST", path, json.dumps(body), {"content-type": "application/json",
                                                   "anthropic-version": "2023-06-01"})
        r = c.getresponse()
        out["status"] = r.status
        first = r.read1(1 << 16)
        started.set()
        raw = first + r.read()
        out["events"] = sse_events(raw)
        if not out["events"]:
            out["events"] = [("not SSE", f"{r.status} {raw[:300]!r}")]
    except (OSError, http.client.HTTPException) as e:
        out["error"] = repr(e)
        started.set()
    finally:
        out["end"] = time.monotonic()
        c.close()


def _outcome(path: str, events: list) -> str:
    """'completed', 'error event' or what is wrong with the stream's end."""
    if path == "/v1/messages":
        names = [e for e, _ in events]
        if names and names[-1] == "message_stop":
            return "completed"
        if names and names[-1] == "error" and json.loads(events[-1][1])["type"] == "error":
            return "error event"
        return f"cut: ends with {events[-3:]}"
    if not events or events[-1][1] != "[DONE]":
        return f"cut: no [DONE] ({events[-2:]})"
    last = json.loads(events[-2][1])
    if "error" in last:
        return "error event"
    if last.get("choices") and last["choices"][0].get("finish_reason"):
        return "completed"
    return f"cut: {last}"


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_signal_during_streams_drains_then_ends_them_with_an_error(tmp_path, how):
    s = Serve(tmp_path, "--drain-timeout", str(DRAIN_S))
    pids = children_of(s.proc.pid)
    try:
        specs = [("/v1/chat/completions", 230), ("/v1/messages", 230),
                 ("/v1/chat/completions", 8)]
        outs = [{} for _ in specs]
        threads = []
        for (path, n), out in zip(specs, outs):
            started = threading.Event()
            t = threading.Thread(target=_stream, args=(s.port, path, n, out, started))
            t.start()
            assert started.wait(60)
            threads.append(t)
        t_signal = time.monotonic()
        if how == "SIGTERM":
            s.proc.send_signal(signal.SIGTERM)
        else:                                # a terminal's Ctrl-C reaches the whole group
            os.killpg(s.proc.pid, signal.SIGINT)
        for t in threads:
            t.join(60)
        exited = wait_until(lambda: s.proc.poll() is not None, 60, 0.05)
        code = s.proc.poll()
        outcomes = [_outcome(path, out.get("events", [])) if "events" in out
                    else out.get("error") for (path, _), out in zip(specs, outs)]
        ends = [f"{out['end'] - t_signal:.1f} s" for out in outs]
        print(f"\n{how} during 3 streams (drain {DRAIN_S:g} s): outcomes {outcomes}, streams "
              f"ended {ends} after the signal, serve exited {exited:.1f} s after it with "
              f"status {code}")
        assert all(o in ("completed", "error event") for o in outcomes), outcomes
        assert outcomes[2] == "completed"    # the short one finishes inside the drain
        assert code == 0
        assert wait_until(lambda: not any(alive(p) for p in pids), 30, 0.1) is not None
    finally:
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)
        s.close()
