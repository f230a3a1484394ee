"""One log format across the process tree, and the access log (serving/logs.py).

Real engine + gunicorn front end (tiny model) with FLAXSERVE_LOG_FORMAT=json: the engine's
lines, gunicorn's own and the per-request access lines all parse as JSON objects with a
timestamp, level and component; the access line of a chat request holds its id, route,
status, tokens and latency, and the log never holds the prompt or the API key.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.http_fixtures import API_KEY, start_servers

SECRET_PROMPT = "zebra-quartz-4411 tell nobody"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("FLAXSERVE_LOG_FORMAT", "json")
    try:
        yield from start_servers(tmp_path_factory)
    finally:
        mp.undo()


def _records(servers) -> list[dict]:
    servers.log.flush()
    text = open(servers.log.name).read()
    lines = [l for l in text.splitlines() if l.strip()]
    bad = []
    out = []
    for l in lines:
        try:
            out.append(json.loads(l))
        except json.JSONDecodeError:
            bad.append(l)
    assert not bad, f"lines that are not JSON: {bad[:5]}"
    return out


def test_json_lines_and_access_log(servers):
    from openai import OpenAI
    client = OpenAI(base_url=servers.base_url + "/v1", api_key=API_KEY, max_retries=0)
    reply = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": SECRET_PROMPT}], max_tokens=3)
    rid = reply.headers["x-request-id"]
    usage = reply.parse().usage
    deadline = time.monotonic() + 10
    while True:
        records = _records(servers)
        access = [r for r in records if r.get("component") == "access"
                  and r.get("request_id") == rid]
        if access or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert access, "no access line for the request"
    a = access[0]
    assert a["route"] == "/v1/chat/completions" and a["status"] == 200
    assert a["prompt_tokens"] == usage.prompt_tokens
    assert a["completion_tokens"] == usage.completion_tokens
    assert a["latency_ms"] >= 0
    for r in records:
        assert {"ts", "level", "component", "msg"} <= r.keys(), r
    components = {r["component"] for r in records}
    assert {"engine", "http", "access"} <= components, components
    text = open(servers.log.name).read()
    assert SECRET_PROMPT not in text and "zebra-quartz" not in text
    assert API_KEY not in text


def test_text_format_line():
    import os
    from serving import logs
    old = os.environ.pop(logs.FORMAT_ENV, None)
    try:
        line = logs.line("engine", "loaded", seconds=1.5)
        assert line.endswith("INFO engine: loaded seconds=1.5") and line[:4].isdigit()
        logs.set_format("json")
        assert json.loads(logs.line("serve", "up"))["component"] == "serve"
        with pytest.raises(ValueError, match="--log-format"):
            logs.set_format("xml")
    finally:
        os.environ.pop(logs.FORMAT_ENV, None)
        if old is not None:
            os.environ[logs.FORMAT_ENV] = old


def test_progress_bar_on_a_terminal_timed_lines_otherwise(capsys, monkeypatch):
    """Counted start-up messages ("label: ... done/total ..."): a tqdm bar on a terminal,
    closed with the last message as a log line; elsewhere at most one line per interval
    per label plus the last; other messages pass through."""
    from serving import logs
    monkeypatch.setenv(logs.FORMAT_ENV, "text")
    plain = logs.Progress("engine", tty=False, every_s=3600)
    for i in range(1, 6):
        plain(f"background compile: {i}/5 programs, {i}.0 s, ETA {5 - i} s")
    plain("warm-up: done")
    lines = capsys.readouterr().err.splitlines()
    assert [l.split("engine: ")[1] for l in lines] == [
        "background compile: 1/5 programs, 1.0 s, ETA 4 s",
        "background compile: 5/5 programs, 5.0 s, ETA 0 s", "warm-up: done"]

    bar = logs.Progress("engine", tty=True)
    for i in range(1, 4):
        bar(f"background compile: {i}/3 programs, {i}.0 s, ETA {3 - i} s")
    err = capsys.readouterr().err
    assert "engine: background compile" in err and "3/3" in err      # the bar, drawn
    assert err.rstrip().endswith("INFO engine: background compile: 3/3 programs, 3.0 s, "
                                 "ETA 0 s"), err[-300:]
    assert not bar._bars                                               # closed
