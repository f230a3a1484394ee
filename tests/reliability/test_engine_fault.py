"""One request cannot take the device loop down (issue 11).

A real engine (tiny random model) behind a real gRPC server on loopback. Faults are put in
at the device boundary: a request whose sampling row does not fit the device arrays (the
reproduced killer, `top_k` = 2^31, submitted past validation as a buggy adapter would), and
an engine whose decode step raises on demand. Each time the requests involved fail with a
clear error, a concurrent normal request completes, and the loop keeps serving; only
repeated step failures mark the engine broken, and then every waiting call ends at once
and a real `flaxserve engine` process exits with status 1 by itself (for its supervisor).
"""

import threading
import time

import grpc
import pytest

from model.config import named_config
from model.decoder import init_params
from sampling.params import SamplingParams
from serving.client import EngineClient
from serving.engine import requests as rq
from serving.engine.device import DeviceEngine
from serving.engine.containment import MAX_CONSECUTIVE_STEP_FAILURES
from serving.engine.scheduler import Scheduler
from serving.engine.server import EngineServer

pytestmark = pytest.mark.timeout(300)


class FaultyEngine(DeviceEngine):
    """The real engine; `fail_steps` > 0 makes that many decode-step dispatches raise."""

    fail_steps = 0

    def step(self, mask=None):
        if self.fail_steps > 0:
            self.fail_steps -= 1
            raise RuntimeError("injected decode-step failure")
        return super().step(mask)


@pytest.fixture(scope="module")
def server():
    cfg = named_config("tiny", dtype="float32")
    engine = FaultyEngine(cfg, init_params(cfg, seed=3), max_slots=4, max_len=128,
                          prefill_buckets=(8, 16))
    engine.warmup()
    srv = EngineServer(Scheduler(engine, max_queue=16), "tiny")
    srv.start("127.0.0.1", 0)
    yield srv
    srv.stop(grace_s=5)


@pytest.fixture(scope="module")
def client(server):
    c = EngineClient(f"127.0.0.1:{server.port}")
    yield c
    c.close()


LONG = {"temperature": 0.0, "max_tokens": 40, "ignore_eos": True}


def _in_background(fn):
    out = {}

    def run():
        try:
            out["value"] = fn()
        except Exception as e:  # noqa: BLE001 - the test inspects it
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, out


def _all_slots_free(client, timeout=30.0):
    """Every slot given back (the device thread frees a finished one at its next pass)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = client.stats()
        if stats.slots_in_use == 0 and stats.queue_depth == 0:
            return
        assert time.monotonic() < deadline, stats
        time.sleep(0.02)


def _events(handle, timeout=60.0):
    events = []
    deadline = time.monotonic() + timeout
    while True:
        events.append(handle.get(timeout=max(deadline - time.monotonic(), 0.01)))
        if isinstance(events[-1], (rq.Usage, rq.Failure)):
            return events


def test_validation_names_the_field_over_grpc(client):
    for name in ("top_k", "penalty_window", "dry_allowed_length", "dry_penalty_last_n"):
        for value in (2 ** 31, 2 ** 63):
            with pytest.raises(grpc.RpcError) as e:
                client.generate([1, 2, 3], {"max_tokens": 2, name: value}, timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert name in e.value.details()


def test_raw_sampling_json_is_checked(client):
    """gRPC clients other than ours: NaN, deep nesting, wrong types are INVALID_ARGUMENT."""
    from serving.proto import flaxserve_pb2 as pb
    for raw, field in (('{"temperature": NaN}', "temperature"), ('{"top_p": Infinity}', "top_p"),
                       ('{"max_tokens": "1"}', "max_tokens"), ("[" * 100_000, "sampling_json"),
                       ('{"x": ' * 5000 + "1" + "}" * 5000, "sampling_json")):
        request = pb.GenerateRequest(prompt_ids=[1, 2], sampling_json=raw)
        with pytest.raises(grpc.RpcError) as e:
            list(client.stub.Generate(request, timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raw[:40]
        assert field in e.value.details()


def test_a_row_that_overflows_fails_alone(server, client):
    """top_k = 2^31 past validation: that request fails naming top_k, the loop lives."""
    t, out = _in_background(lambda: client.generate([5, 6, 7, 8], LONG, timeout=120))
    time.sleep(0.3)     # the normal request is decoding when the bad one is inserted
    bad = rq.EngineRequest("bad-row", [1, 2, 3], SamplingParams(top_k=2 ** 31, max_tokens=4),
                           seed=0)
    events = _events(server.scheduler.submit(bad))
    failure = events[-1]
    assert isinstance(failure, rq.Failure) and failure.kind == rq.INTERNAL
    assert "top_k" in failure.message and "int32" in failure.message
    t.join(120)
    assert "error" not in out, out.get("error")
    assert out["value"].choices[0].finish_reason == "length"
    assert len(out["value"].choices[0].token_ids) == 40
    assert server.scheduler.healthy
    again = client.generate([1, 2, 3], {"temperature": 0.0, "max_tokens": 3}, timeout=60)
    assert len(again.choices[0].token_ids) == 3
    _all_slots_free(client)


def test_a_failed_step_fails_its_requests_and_the_loop_goes_on(server, client):
    engine = server.scheduler.engine
    t, out = _in_background(lambda: client.generate([9, 9, 9], LONG, timeout=120))
    deadline = time.monotonic() + 30
    while client.stats().slots_in_use == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.fail_steps = 1
    t.join(120)
    err = out.get("error")
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.INTERNAL
    assert "decode step" in err.details() and "injected" in err.details()
    assert server.scheduler.healthy
    g = client.generate([1, 2, 3, 4], {"temperature": 0.0, "max_tokens": 5}, timeout=60)
    assert len(g.choices[0].token_ids) == 5
    _all_slots_free(client)


def test_repeated_step_failures_break_the_engine_promptly(server, client):
    """Last in this module: it breaks the engine on purpose."""
    engine = server.scheduler.engine
    engine.fail_steps = 10 ** 6
    start = time.monotonic()
    errors = []
    for _ in range(MAX_CONSECUTIVE_STEP_FAILURES + 1):
        try:
            client.generate([3, 4, 5], {"temperature": 0.0, "max_tokens": 8}, timeout=60)
        except grpc.RpcError as e:
            errors.append(e.code())
    assert server.scheduler.failed is not None and not server.scheduler.healthy
    assert "in a row" in server.scheduler.failed
    assert errors and set(errors) <= {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE}
    # a broken engine refuses at once instead of queueing forever
    with pytest.raises(grpc.RpcError) as e:
        client.generate([3, 4, 5], {"max_tokens": 2}, timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - start < 60


_BROKEN_ENGINE = r"""
import sys
from serving.engine import device
armed = []
step, warmup = device.DeviceEngine.step, device.DeviceEngine.warmup

def broken_step(self, mask=None):          # every decode step after warm-up fails
    if armed:
        raise RuntimeError("injected: the device is gone")
    return step(self, mask)

def armed_warmup(self, *args, **kwargs):   # --full-warmup: it returns when all is compiled
    out = warmup(self, *args, **kwargs)
    armed.append(True)
    return out

device.DeviceEngine.step, device.DeviceEngine.warmup = broken_step, armed_warmup
from serving.cli import main
sys.exit(main(["engine", "--model", sys.argv[1], "--grpc-port", sys.argv[2],
               "--max-slots", "2", "--max-model-len", "64", "--full-warmup",
               "--prefill-batch", "1"]))
"""


def test_flaxserve_engine_exits_non_zero_when_its_loop_breaks(tmp_path):
    """A real `flaxserve engine` process whose decode steps all fail: the requests fail
    at once, then the process exits with status 1 by itself (for its supervisor), freeing
    its port; it does not hang."""
    import subprocess
    import sys

    from tests.http_fixtures import ROOT, _env, free_port, write_model_dir
    model = write_model_dir(tmp_path)
    port = free_port()
    log = open(tmp_path / "engine.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", _BROKEN_ENGINE, str(model), str(port)],
                            cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        c = EngineClient(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 240
        while not c.healthy(timeout=1.0):
            assert proc.poll() is None and time.monotonic() < deadline, "did not start"
            time.sleep(0.3)
        codes = []
        for _ in range(MAX_CONSECUTIVE_STEP_FAILURES):
            with pytest.raises(grpc.RpcError) as e:
                c.generate([1, 2, 3], {"max_tokens": 4, "temperature": 0.0}, timeout=60)
            codes.append(e.value.code())
        c.close()
        assert set(codes) <= {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE}
        assert proc.wait(timeout=60) == 1     # by itself: nobody signals it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "engine.log").read_text()
    assert "exiting with status 1" in text
