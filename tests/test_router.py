"""Several engines behind one front end (serving/http/router.py, docs/scale-out.md).

Unit tests of the routing rule, then two real `flaxserve engine` processes (the bundled
default model) behind one real gunicorn front end started with `--engine A --engine B`,
driven by the official openai SDK: load spread under concurrency 32, a conversation's second
turn on the engine that holds its prefix, one engine SIGKILLed under load (its requests end
with clear errors, every other one succeeds, new ones go to the survivor) and used again
once restarted.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from serving.http.router import (CHUNK, EngineState, PrefixTable, choose, load, overloaded,
                                 prefix_hashes)
from tests.http_fixtures import API_KEY, ROOT, _env, _stop, _wait, free_port

pytestmark = pytest.mark.timeout(900)


# ---- the policy, pure ----------------------------------------------------------------------------

def _state(addr, up=True, **kw):
    return EngineState(addr, up=up, max_slots=kw.pop("max_slots", 4), **kw)


def test_prefix_hashes_are_whole_blocks_and_prefix_stable():
    a = list(range(40))
    b = a + [7, 7, 7]
    assert len(prefix_hashes(a)) == 40 // CHUNK
    assert prefix_hashes(b)[:2] == prefix_hashes(a)
    assert prefix_hashes(list(range(1, 41)))[0] != prefix_hashes(a)[0]
    assert prefix_hashes(list(range(CHUNK - 1))) == []


def test_prefix_table_match_and_lru():
    t = PrefixTable(size=3)
    h = prefix_hashes(list(range(5 * CHUNK)))
    t.record(h[:2])
    assert t.match(h) == 2 and t.match(h[2:]) == 0
    t.record(h[2:5])                 # 5 recorded, 3 kept: the oldest two are forgotten
    assert t.match(h) == 0


def test_choose_least_loaded_and_skips_down():
    s = [_state("a", slots_in_use=3), _state("b", slots_in_use=1), _state("c", up=False)]
    assert choose(s, [0, 0, 0], b"k") == (1, "load")
    s[1].up = False
    assert choose(s, [0, 0, 0], b"k") == (0, "load")
    s[0].up = False
    assert choose(s, [0, 0, 0], b"k") == (None, "down")


def test_choose_counts_this_workers_new_requests_at_once():
    a, b = _state("a"), _state("b")
    a.inflight = 2                   # opened since the last stats poll
    assert load(a) == 0.5 and choose([a, b], [0, 0], b"k")[0] == 1


def test_choose_prefix_affinity_unless_overloaded_or_shared():
    a, b = _state("a", slots_in_use=1), _state("b")
    assert choose([a, b], [3, 1], b"k") == (0, "prefix")     # a holds more of the prompt
    a.slots_in_use = 2                                       # ...but is far busier than b
    assert choose([a, b], [3, 1], b"k") == (1, "load")
    a.slots_in_use = 1
    assert choose([a, b], [2, 2], b"k") == (1, "load")       # both hold it: no preference
    a.queue_depth = 1
    assert overloaded(a) and choose([a, b], [3, 1], b"k") == (1, "load")
    a.queue_depth, a.kv_block_usage = 0, 0.95
    assert choose([a, b], [3, 1], b"k") == (1, "load")
    a.kv_block_usage, a.up = 0.0, False
    assert choose([a, b], [3, 1], b"k") == (1, "load")


def test_choose_ties_by_rendezvous_hash_are_consistent():
    s = [_state("a"), _state("b"), _state("c")]
    picks = {choose(s, [0, 0, 0], bytes([k]))[0] for k in range(64)}
    assert picks == {0, 1, 2}        # idle engines share conversations...
    assert all(choose(s, [0, 0, 0], b"same")[0] == choose(s, [0, 0, 0], b"same")[0]
               for _ in range(5))    # ...and one key always lands on the same one
    assert choose(s, [0, 0, 0], b"k", exclude=frozenset({0, 1, 2})) == (None, "down")


def test_engine_set_with_every_engine_down_answers_503():
    from sampling.params import SamplingParams
    from serving.http.errors import APIError
    from serving.http.generation import GenRequest
    from serving.http.router import EngineSet
    engines = EngineSet([f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"])
    try:
        assert engines.healthy_cached() is False
        assert [e["up"] for e in engines.stats()["engines"]] == [0, 0]
        with pytest.raises(APIError) as err:
            engines.generate(GenRequest("r1", "m", [1, 2, 3], SamplingParams()))
        assert err.value.status == 503 and "no engine is available" in err.value.message
    finally:
        engines.close()


def test_http_flags_accept_several_engines():
    import argparse

    from serving.http.main import add_arguments, settings_from_args
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    one = settings_from_args(parser.parse_args(["--engine", "h:1"]))
    assert one.engine == "h:1" and one.engines == ["h:1"]
    two = settings_from_args(parser.parse_args(["--engine", "h:1", "--engine", "h:2"]))
    assert two.engine == "h:1" and two.engines == ["h:1", "h:2"]
    with pytest.raises(ValueError, match="given twice"):
        settings_from_args(parser.parse_args(["--engine", "h:1", "--engine", "h:1"]))
    with pytest.raises(ValueError, match="HOST:PORT"):
        settings_from_args(parser.parse_args(["--engine", "h:1", "--engine", "nope"]))


# ---- two real engines behind one real front end ------------------------------------------------

ENGINE_ARGS = ["--max-slots", "4", "--max-model-len", "512", "--prefill-batch", "1"]


class Fleet:
    def __init__(self, root):
        self.root = root
        self.log = open(root / "fleet.log", "w")
        self.ports = [free_port(), free_port()]
        self.engines = [self._start_engine(p) for p in self.ports]
        self.http = None
        from serving.client import EngineClient
        self.clients = [EngineClient(f"127.0.0.1:{p}") for p in self.ports]
        for c, e in zip(self.clients, self.engines):
            _wait(c.healthy, e, "flaxserve engine", 600)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "serving.http.main", "--port", str(self.port),
               "--workers", "1", "--api-key", API_KEY, "--max-inflight", "64",
               "--max-waiting", "64"]
        for p in self.ports:
            cmd += ["--engine", f"127.0.0.1:{p}"]
        self.http = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=self.log,
                                     stderr=subprocess.STDOUT)
        _wait(self._http_up, self.http, "flaxserve http", 120)

    def _start_engine(self, port):
        return subprocess.Popen(
            [sys.executable, "-m", "serving.cli", "engine", "--model", "default",
             "--grpc-port", str(port), *ENGINE_ARGS],
            cwd=ROOT, env=_env(), stdout=self.log, stderr=subprocess.STDOUT)

    def restart(self, i):
        self.engines[i] = self._start_engine(self.ports[i])
        _wait(self.clients[i].healthy, self.engines[i], "flaxserve engine (restarted)", 600)

    def _http_up(self):
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def finished(self) -> list[int]:
        """Each engine's own count of finished requests (-1 while it is down)."""
        from serving.proto import flaxserve_pb2 as pb
        out = []
        for c in self.clients:
            try:
                out.append(c.stub.Stats(pb.StatsRequest(), timeout=2).requests_finished)
            except Exception:   # noqa: BLE001 - a killed engine
                out.append(-1)
        return out

    def metrics(self) -> str:
        with urllib.request.urlopen(self.base_url + "/metrics", timeout=5) as r:
            return r.read().decode()

    def engine_metric(self, name, i) -> float:
        m = re.search(rf'^{name}\{{engine="127.0.0.1:{self.ports[i]}"\}} (\S+)$',
                      self.metrics(), re.M)
        return float(m.group(1)) if m else float("nan")

    def close(self):
        if self.http is not None:
            _stop(self.http)
        for e in self.engines:
            _stop(e)
        for c in self.clients:
            c.close()
        self.log.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("router"))
    try:
        yield f
    finally:
        f.close()


@pytest.fixture(scope="module")
def client(fleet):
    import openai
    c = openai.OpenAI(base_url=fleet.base_url + "/v1", api_key=API_KEY, max_retries=0,
                      timeout=300)
    yield c
    c.close()


def _ask(client, text, max_tokens=4, **kw):
    return client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": text}], max_tokens=max_tokens,
        temperature=0, **kw)


def test_load_spreads_over_both_engines(fleet, client):
    before = fleet.finished()
    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(lambda k: _ask(client, f"Question {k}: name a colour."),
                                range(32)))
    after = fleet.finished()
    per_engine = [a - b for a, b in zip(after, before)]
    print(f"\nper-engine requests at concurrency 32: {per_engine}")
    assert all(r.choices[0].message.content is not None for r in replies)
    assert sum(per_engine) == 32 and min(per_engine) > 0
    text = fleet.metrics()
    for i in range(2):
        assert fleet.engine_metric("flaxserve_engine_up", i) == 1.0
        assert f'flaxserve_engine_routed_total{{engine="127.0.0.1:{fleet.ports[i]}"' in text


def test_second_turn_hits_the_prefix_cache_on_the_same_engine(fleet, client):
    history = [{"role": "user", "content": "Here is a story about a lighthouse keeper who "
                "counts the ships passing by every night and writes each name in a book. "
                "Tell me what the keeper sees."}]
    before = fleet.finished()
    first = client.chat.completions.create(model="default", messages=history, max_tokens=8,
                                           temperature=0)
    mid = fleet.finished()
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And on the next night?"}]
    second = client.chat.completions.create(model="default", messages=history, max_tokens=8,
                                            temperature=0)
    after = fleet.finished()
    turn1 = [m - b for m, b in zip(mid, before)]
    turn2 = [a - m for a, m in zip(after, mid)]
    print(f"\nturn 1 engine counts {turn1}, turn 2 {turn2}, cached tokens "
          f"{second.usage.prompt_tokens_details.cached_tokens} of "
          f"{second.usage.prompt_tokens}")
    assert turn1 == turn2 and sorted(turn1) == [0, 1]
    assert second.usage.prompt_tokens_details.cached_tokens >= \
        (first.usage.prompt_tokens // CHUNK) * CHUNK - CHUNK


def _stream(client, k, results):
    """One long streaming request: ("ok", text) or ("error", what ended it)."""
    try:
        stream = client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": f"Story {k}, go on."}],
            max_tokens=400, temperature=0, stream=True, extra_body={"min_tokens": 400})
        text = ""
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
        results[k] = ("ok", text)
    except Exception as e:   # noqa: BLE001 - the test looks at what ended it
        results[k] = ("error", f"{type(e).__name__}: {e}")


def test_engine_killed_under_load_then_restarted(fleet, client):
    results: dict = {}
    threads = [threading.Thread(target=_stream, args=(client, k, results)) for k in range(12)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    from serving.proto import flaxserve_pb2 as pb
    while fleet.clients[1].stub.Stats(pb.StatsRequest(), timeout=5).slots_in_use < 2:
        assert time.monotonic() < deadline, "no request reached engine 1"
        time.sleep(0.2)
    time.sleep(0.5)                              # they are generating there
    on_killed = fleet.engine_metric("flaxserve_engine_inflight", 1)
    fleet.engines[1].kill()                      # SIGKILL
    fleet.engines[1].wait()
    for t in threads:
        t.join(300)
    errors = {k: r[1] for k, r in results.items() if r[0] == "error"}
    print(f"\n{on_killed:.0f} requests open on the killed engine; errors: {errors}")
    assert len(results) == 12
    assert 1 <= len(errors) <= on_killed
    for what in errors.values():                 # a clear error, as an event or a 503
        assert "engine is unavailable" in what, what

    # new requests all succeed, on the survivor
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda k: _ask(client, f"After {k}: hello"), range(8)))
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in replies)
    assert fleet.engine_metric("flaxserve_engine_up", 1) == 0.0

    fleet.restart(1)
    deadline = time.monotonic() + 30
    while fleet.engine_metric("flaxserve_engine_up", 1) != 1.0:
        assert time.monotonic() < deadline, "the restarted engine was not taken back"
        time.sleep(0.3)
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda k: _ask(client, f"Back {k}: hello"), range(16)))
    assert len(replies) == 16
    print(f"engine counts after the restart: {fleet.finished()}")
    assert fleet.finished()[1] > 0               # used again
