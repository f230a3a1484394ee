"""Start-up: launch -> first answered request of `flaxserve serve` (bundled model), cold
(an empty compilation cache) and warm (a restart on the cache the cold run filled).

The engine serves once the programs a first request needs are compiled and compiles the
rest on a thread; the first request here has a prompt longer than the smallest prefill
bucket, so it needs a program the background thread may not have reached yet, and must
still be answered; so must the second, which needs the full sampler program (the first
request's programs hold only the lean one, sampling/sampler.py). The figures (and `flaxserve generate`'s cold and warm wall times, and
the memory gauges of /metrics) are printed (`pytest -s`), never asserted: speed is for
benchmarks.
"""

from __future__ import annotations

import datetime
import re
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.http_fixtures import ROOT, _env, _stop, free_port

PROMPT = "The quick brown fox jumps over the lazy dog. " * 8    # ~80 tokens: bucket 128


def _launch_and_ask(cache_dir, log_path) -> tuple[float, float, str, float]:
    """(seconds to /health 200, seconds to the first answered completion, the log, the
    launch's wall-clock time)."""
    from openai import OpenAI
    port, grpc_port = free_port(), free_port()
    t0, launched = time.monotonic(), time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serving.cli", "serve", "--port", str(port),
             "--grpc-port", str(grpc_port), "--max-slots", "4", "--max-model-len", "512",
             "--compile-cache", str(cache_dir)],
            cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = t0 + 900
            while True:
                assert proc.poll() is None, f"serve exited:\n{log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "serve did not come up in 900 s"
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health",
                                                timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(0.1)
            healthy = time.monotonic() - t0
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                            max_retries=0, timeout=600)
            reply = client.completions.create(model="default", prompt=PROMPT, max_tokens=4,
                                              temperature=0)
            answered = time.monotonic() - t0
            assert reply.choices[0].finish_reason in ("length", "stop")
            assert reply.usage.prompt_tokens > 16 and reply.usage.completion_tokens >= 1
            # typical-p needs the full sampler, which may still be compiling in the
            # background (the first answer used the lean one): it waits, never fails
            short = client.completions.create(model="default", prompt="Hi", max_tokens=2,
                                              extra_body={"typical_p": 0.9})
            assert short.usage.completion_tokens >= 1
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
                memory = _memory(r.read().decode())
        finally:
            _stop(proc)
    return healthy, answered, log_path.read_text() + memory, launched


def _memory(metrics: str) -> str:
    """The memory gauges of /metrics, as one log-like line (MiB)."""
    values = {}
    for line in metrics.splitlines():
        for name in ("engine_rss_bytes", "engine_weights_bytes", "engine_kv_cache_bytes",
                     "http_worker_rss_bytes"):
            if line.startswith(f"flaxserve_{name}"):
                values[name] = float(line.split()[-1]) / 2 ** 20
    assert values.get("engine_rss_bytes", 0) > 0 and values.get("http_worker_rss_bytes", 0) > 0
    return "\nmemory (MiB): " + ", ".join(f"{k.replace('_bytes', '')} {v:.1f}"
                                         for k, v in values.items())


# (name, a log line's text) for the timeline: when each start-up step finished
MILESTONES = (("front end listening", "http: Listening at"),
              ("engine imported", "engine: loading "), ("model loaded", "engine: loaded in"),
              ("first programs", "engine: warm-up took"),
              ("engine serving", "(gRPC)"), ("both up", "serve: serving on"),
              ("every program", "every program compiled"))


def _timeline(log: str, launched: float) -> str:
    """Seconds from launch to each milestone, and the engine's RSS figures, from the log's
    timestamps."""
    parts = []
    for name, marker in MILESTONES:
        line = next((l for l in log.splitlines() if marker in l), None)
        if line is None:
            continue
        ts = datetime.datetime.strptime(line.split(" ")[0], "%Y-%m-%dT%H:%M:%S.%fZ")
        at = ts.replace(tzinfo=datetime.timezone.utc).timestamp() - launched
        rss = re.search(r"RSS (\d+) MiB", line)
        parts.append(f"{name} {at:.1f} s" + (f" (RSS {rss[1]} MiB)" if rss else ""))
    return ", ".join(parts)


def _all_compiled(line: str) -> bool:
    """The background thread's last progress line ("background compile: 37/37 ...")."""
    if "background compile: " not in line:
        return False
    done, total = line.split("background compile: ")[1].split(" ")[0].split("/")
    return done == total


def test_cold_then_warm_start(tmp_path, pytestconfig):
    cache = tmp_path / "xla"
    cold_health, cold, log, cold_t0 = _launch_and_ask(cache, tmp_path / "cold.log")
    assert "compiling the rest in the background" in log, log[-3000:]
    # log order: was the first request answered before the background thread finished?
    lines = log.splitlines()
    answered_at = next(i for i, l in enumerate(lines) if "POST /v1/completions 200" in l)
    done_at = next((i for i, l in enumerate(lines) if _all_compiled(l)), len(lines))
    background_busy = answered_at < done_at
    warm_health, warm, warm_log, warm_t0 = _launch_and_ask(cache, tmp_path / "warm.log")
    # `flaxserve generate` (in process, its own programs), cold then warm: ~1 min on 2
    # busy cores, so only when the figures are shown (pytest -s)
    generate_s = []
    for _ in range(2 if pytestconfig.getoption("capture") == "no" else 0):
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "serving.cli", "generate", "--model",
                              "default", "--prompt", PROMPT, "--max-tokens", "2",
                              "--temperature", "0", "--compile-cache", str(cache)],
                             cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
        generate_s.append(time.monotonic() - t0)
        assert out.returncode == 0 and out.stdout.strip(), out.stderr[-3000:]
    gen = (f"; `generate` (2 tokens) cold {generate_s[0]:.1f} s, warm {generate_s[1]:.1f} s"
           if generate_s else "")
    import os
    print(f"\nstart-up (4 slots, max-model-len 512; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, figures vary): "
          f"cold {cold:.1f} s to the first answer ({cold_health:.1f} s to /health), "
          f"warm restart {warm:.1f} s ({warm_health:.1f} s to /health); background "
          f"compilation still running when the first answer came: {background_busy}{gen}"
          f"\n  cold: {_timeline(log, cold_t0)}\n  warm: {_timeline(warm_log, warm_t0)}"
          f"{warm_log[warm_log.rindex(chr(10) + 'memory'):]}")


def test_background_compiles_what_jit_runs(tmp_path):
    """The background thread compiles abstract arguments (shapes, dtypes, placements); they
    must be the executables jit then runs: a full warm-up after it compiles nothing.
    In a child process with no compilation cache, so a mismatch cannot hide behind it.
    The paged layout only (the default; the dense one shares the job list and costs as
    much again: a whole uncached compile)."""
    layout = "paged"
    code = f"""
import argparse, jax
from checkpoints.loader import load_model
from serving.engine.device import DeviceEngine, compile_count
from serving.engine.main import kv_engine_args
config, params, _ = load_model("default")
kv = kv_engine_args(argparse.Namespace(kv_layout={layout!r}, block_size=16,
                                       kv_cache_memory=None), config, 4, 256)
e = DeviceEngine(config, params, max_slots=4, max_len=256, prefill_buckets=(16, 32), **kv)
e.warmup(background=True).join()
assert e.background_done and not e.background_errors, e.background_errors
before = compile_count()
e.warmup()
print("compiles", compile_count() - before)
"""
    env = _env()
    env["JAX_COMPILATION_CACHE_DIR"] = ""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "compiles 0", out.stdout


def test_engine_listens_before_it_serves(tmp_path):
    """`flaxserve engine` opens its gRPC port while its first programs still compile
    (serving/engine/main.py): health says NOT_SERVING, ListModels and CountTokens answer
    (the front end reads the model's card and loads its tokenizer meanwhile: `_Server.
    prefetch`), Generate is UNAVAILABLE at once (a 503 with Retry-After over HTTP; never
    queued for minutes, never a hang); `serve_now()` turns it SERVING. No program is run."""
    import dataclasses

    import grpc

    from checkpoints.tokenizer import load_tokenizer
    from model.config import named_config
    from model.decoder import init_params
    from serving.client import EngineClient
    from serving.engine.device import DeviceEngine
    from serving.engine.scheduler import Scheduler
    from serving.engine.server import EngineServer
    from serving.http.app import Settings, _Server
    from serving.http.engine_link import EngineLink, map_rpc_error
    from tests.tokenizer_fixtures import build_bytelevel_dir

    tok_dir = build_bytelevel_dir(tmp_path / "tok")
    tok = load_tokenizer(str(tok_dir))
    cfg = dataclasses.replace(named_config("tiny", dtype="float32"), vocab_size=tok.vocab_size)
    engine = DeviceEngine(cfg, init_params(cfg, seed=0), max_slots=2, max_len=64,
                          prefill_buckets=(16,))
    server = EngineServer(Scheduler(engine, tok), "tiny-early", str(tok_dir), tok)
    port = server.start("127.0.0.1", 0, serving=False)
    client = EngineClient(f"127.0.0.1:{port}")
    link = EngineLink(f"127.0.0.1:{port}")
    try:
        assert client.health(timeout=10) == "not serving"
        card = client.list_models()[0]
        assert (card.name, card.max_model_len) == ("tiny-early", 64)
        ids = tok.encode("hello there", add_special_tokens=False)
        assert client.count_tokens(prompt_text="hello there") == len(ids)
        with pytest.raises(grpc.RpcError) as err:
            client.generate([1, 2, 3], {"max_tokens": 2}, timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "starting" in err.value.details()
        http_err = map_rpc_error(err.value)
        assert http_err.status == 503 and http_err.retry_after
        front = _Server(Settings(engine=f"127.0.0.1:{port}"), link)
        front.prefetch()         # returns once loaded: the engine is still NOT_SERVING
        assert front._info.served_names == ["tiny-early"]
        assert front._info.tokenizer.encode("hello there", add_special_tokens=False) == ids
        assert client.health(timeout=10) == "not serving"
        server.serve_now()
        assert client.health(timeout=10) == "serving"
    finally:
        link.close()
        client.close()
        server.stop(grace_s=1)


@pytest.mark.parametrize("extra, message", [
    (["--full-warmup"], "--lazy-compile and --full-warmup exclude each other"),
    (["--warmup-only"], "--lazy-compile and --warmup-only exclude each other"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "0"],
     "--lazy-compile: a multi-process engine compiles ahead"),
])
def test_lazy_compile_refuses_what_it_cannot_mean(capsys, extra, message):
    """`--lazy-compile` (the test servers' mode, tests/http_fixtures.py) with a warm-up flag
    or several processes: exit 2 naming the flags, before any model is loaded."""
    from serving.cli import main
    assert main(["engine", "--model", "no-such-model", "--lazy-compile", *extra]) == 2
    assert message in capsys.readouterr().err
