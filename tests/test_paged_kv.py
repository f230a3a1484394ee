"""The paged KV cache against the dense one, through the real scheduler.

Same requests on a dense engine and on paged engines (an ample pool, a pool so small
that running samples are preempted and recomputed): greedy and seeded tokens identical,
logprobs within 1e-5, across prompt lengths that cross block boundaries and chunked
prefill, with prefix-cache hits (reported as cached_tokens), n > 1, and nothing compiled
after warm-up. The same on a simulated 4-device mesh (KV heads sharded) in a subprocess.
"""

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from model.config import named_config
from model.decoder import init_params
from serving.engine.device import DeviceEngine, compile_count
from serving.engine.requests import INVALID_ARGUMENT, Failure, RequestError, Usage
from serving.engine.scheduler import Scheduler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = named_config("tiny", dtype="float32")
PARAMS = init_params(CFG, seed=5)
MAX_LEN, BUCKETS, BLOCK = 96, (8, 32), 4


def make(layout, num_blocks=None, slots=4, params=PARAMS, mesh=None, warm_run_tokens=None):
    engine = DeviceEngine(CFG, params, max_slots=slots, max_len=MAX_LEN,
                          prefill_buckets=BUCKETS, kv_layout=layout, block_size=BLOCK,
                          num_blocks=num_blocks, mesh=mesh)
    if warm_run_tokens is not None:      # the compile-only warm-up of large decode steps
        engine.warm_run_tokens = warm_run_tokens
    engine.warmup()
    return Scheduler(engine, max_queue=64).start()


def run(scheduler, jobs):
    """Submit every (prompt, sampling) at once; per job: ([tokens per sample],
    [logprobs per sample], cached_tokens)."""
    handles = []
    for i, (prompt, sampling) in enumerate(jobs):
        req = scheduler.make_request(f"r{i}", prompt, dict(sampling, logprobs=True))
        handles.append(scheduler.submit(req))
    out = []
    for h in handles:
        n = h.request.sampling.n
        tokens, lps, usage = [[] for _ in range(n)], [[] for _ in range(n)], None
        for ev in h:
            if isinstance(ev, Failure):
                raise AssertionError(ev.message)
            if isinstance(ev, Usage):
                usage = ev
                continue
            tokens[ev.index] += ev.token_ids
            lps[ev.index] += [lp.logprob for lp in ev.logprobs]
        out.append((tokens, lps, usage.cached_tokens))
    return out


def idle_stats(scheduler, timeout=10.0):
    """Stats once every slot is given back (the device thread frees a slot after the
    request's last event)."""
    deadline = time.monotonic() + timeout
    while scheduler.stats()["slots_in_use"] and time.monotonic() < deadline:
        time.sleep(0.01)
    return scheduler.stats()


def assert_same(got, want):
    for (t1, l1, _), (t2, l2, _) in zip(got, want):
        assert t1 == t2
        for a, b in zip(l1, l2):
            np.testing.assert_allclose(a, b, atol=1e-5)


rng = np.random.default_rng(0)
LENGTHS = [1, 3, 4, 5, 15, 16, 17, 40]      # around blocks of 4 and chunks of 32
PROMPTS = [rng.integers(1, CFG.vocab_size, n).tolist() for n in LENGTHS]
JOBS = ([(p, {"temperature": 0.0, "max_tokens": 12, "ignore_eos": True}) for p in PROMPTS]
        + [(p, {"temperature": 1.0, "seed": 7 + i, "max_tokens": 12, "ignore_eos": True})
           for i, p in enumerate(PROMPTS[3:6])])
SHARED = PROMPTS[7][:33]
HITS = [(SHARED + rng.integers(1, CFG.vocab_size, k).tolist(),
         {"temperature": 1.0, "seed": 3, "max_tokens": 10, "ignore_eos": True})
        for k in (1, 6)]
FORKS = [(PROMPTS[5], {"temperature": 1.0, "seed": 11, "n": 3, "max_tokens": 9,
                       "ignore_eos": True}),
         (PROMPTS[4], {"temperature": 1.0, "seed": 12, "n": 2, "max_tokens": 9,
                       "ignore_eos": True})]

# mirostat's running mu must survive preemption (the tiny pool preempts the newest: these)
MIRO = [(p, {"temperature": 1.0, "seed": 21 + i, "mirostat_mode": 2, "mirostat_tau": 3.5,
             "mirostat_eta": 1.0, "max_tokens": 24, "ignore_eos": True})
        for i, p in enumerate(PROMPTS[6:8])]


@pytest.fixture(scope="module")
def dense():
    s = make("dense")
    yield s
    s.stop(1)


@pytest.fixture(scope="module")
def want(dense):
    return {"jobs": run(dense, JOBS), "hits": run(dense, HITS), "forks": run(dense, FORKS),
            "miro": run(dense, MIRO)}


@pytest.fixture(scope="module")
def paged():
    s = make("paged", num_blocks=200)
    yield s
    s.stop(1)


def test_paged_matches_dense_across_block_boundaries(paged, want):
    before = compile_count()
    assert_same(run(paged, JOBS), want["jobs"])
    assert compile_count() == before


def test_prefix_hits_are_shared_across_requests_and_change_nothing(paged, want):
    run(paged, [(SHARED + [9], {"temperature": 0.0, "max_tokens": 2})])
    got = run(paged, HITS)
    assert_same(got, want["hits"])
    assert [c for _, _, c in got] == [32, 32]          # 8 full blocks of the shared 33
    stats = paged.stats()
    assert stats["prefix_cache_hit_tokens"] >= 64 and 0 < stats["prefix_cache_hit_rate"] < 1
    assert 0 <= stats["kv_blocks_in_use"] <= stats["kv_blocks_total"] == 199


def test_n_samples_share_the_prompt_blocks(paged, want):
    assert_same(run(paged, FORKS), want["forks"])


def test_dense_prefix_cache_is_per_slot_and_token_level(dense):
    """--kv-layout dense keeps its own prefix cache: a prompt reuses what one slot holds,
    to the token (copied from a busy slot, or in place), and changes no token."""
    busy, base = PROMPTS[7][:20], PROMPTS[7][20:40]
    greedy = {"temperature": 0.0, "max_tokens": 4}
    long = dense.submit(dense.make_request("busy", busy, {"temperature": 1.0, "seed": 1,
                                                          "max_tokens": 60,
                                                          "ignore_eos": True}))
    next(iter(long))
    got = run(dense, [(busy + [5, 6], greedy)])
    long.cancel()
    assert got[0][2] == 20                              # copied from the busy slot
    run(dense, [(base, greedy)])
    again = run(dense, [(base + [7, 8], greedy), (base + [7, 8], greedy)])
    assert again[0][2] >= 20 and again[1][2] == 21      # in place; all but the last token
    dense.prefix_cache = False
    try:
        off = run(dense, [(busy + [5, 6], greedy), (base + [7, 8], greedy)])
    finally:
        dense.prefix_cache = True
    assert [c for _, _, c in off] == [0, 0]
    assert_same(off, got + again[:1])


def test_kv_stats_reach_metrics_through_grpc(paged):
    from serving.engine.server import EngineServer
    from serving.http import metrics
    from serving.http.engine_link import EngineLink

    server = EngineServer(paged, "tiny")
    port = server.start("127.0.0.1", 0)
    link = EngineLink(f"127.0.0.1:{port}")
    try:
        stats = link.stats()
        assert stats["kv_blocks_total"] == 199 and stats["kv_block_size"] == BLOCK
        assert stats["prefix_cache_queried_tokens"] > 0
        text = metrics.render(stats)[0].decode()
        assert "flaxserve_engine_kv_blocks_total 199.0" in text
        assert "flaxserve_engine_prefix_cache_hit_rate" in text
    finally:
        link.close()
        server.server.stop(grace=0).wait()


def test_tiny_pool_preempts_and_recomputes_with_identical_output(want, caplog):
    # 15 jobs of up to 52 tokens on 4 slots with 20 usable blocks (80 tokens)
    s = make("paged", num_blocks=21, warm_run_tokens=100)
    try:
        before = compile_count()
        with caplog.at_level("INFO", logger="flaxserve.engine"):
            got = run(s, JOBS + HITS + MIRO)
        assert compile_count() == before
        assert s.stats()["kv_preemptions"] > 0
        assert_same(got, want["jobs"] + want["hits"] + want["miro"])
        miro = {f"r{len(JOBS) + len(HITS) + i}" for i in range(len(MIRO))}
        assert any(m.split()[-4] in miro for m in caplog.messages if "preempting" in m), \
            "no mirostat sample was preempted"
        assert_same(run(s, FORKS), want["forks"])
        assert idle_stats(s)["kv_blocks_in_use"] == 0     # every block given back
        with pytest.raises(RequestError) as e:     # never fits, even alone
            s.make_request("big", [1] * 90, {"max_tokens": 1})
        assert e.value.kind == INVALID_ARGUMENT and "prompt_ids" in e.value.message
        with pytest.raises(RequestError, match="max_tokens"):
            s.make_request("long", [1] * 10, {"max_tokens": 80, "n": 3})
    finally:
        s.stop(1)


MESH_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    import jax
    assert jax.device_count() == 4, jax.devices()
    from model import sharding
    from tests import test_paged_kv as t
    with open({want!r}) as f:             # the dense engine's output, from one device
        want = json.load(f)
    mesh = sharding.make_mesh("data=2,model=2")
    s = t.make("paged", num_blocks=21, mesh=mesh)     # preempts, and hits the cache
    k = s.engine.state["cache"][0][0]
    assert k.sharding.spec[2] == "model", k.sharding
    t.assert_same(t.run(s, t.JOBS + t.HITS), want)
    stats = s.stats()
    assert stats["kv_preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0, stats
    s.stop(1)
    print("MESH-OK")
""")


def test_paged_on_a_4_device_mesh_matches_one_device(want, tmp_path):
    """The reference is this process's dense engine on one device (the `want` fixture),
    handed to the 4-device process as JSON (floats round-trip exactly)."""
    import json
    path = tmp_path / "want.json"
    path.write_text(json.dumps(want["jobs"] + want["hits"]))
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", MESH_SCRIPT.format(root=ROOT, want=str(path))],
                         env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert "MESH-OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


def test_bench_serve_compares_layouts_and_shared_prefix():
    import json
    proc = subprocess.run(
        [sys.executable, "-m", "serving.cli", "bench", "serve", "--config", "tiny",
         "--kv-layout", "dense,paged", "--block-size", "8", "--shared-prefix", "32",
         # one at a time: requests admitted together in one batched prefill cannot reuse
         # each other's blocks (named when dispatched), so at 4 the hits depend on timing
         "--concurrency", "1", "--num-requests", "4", "--prompt-len", "5",
         "--output-len", "3", "--json"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    runs = {(r["kv_layout"], r["shared_prefix"]): r for r in out["runs"]}
    assert set(runs) == {("dense", 0), ("dense", 32), ("paged", 0), ("paged", 32)}
    assert all(r["completed"] == 4 and r["errors"] == 0 for r in runs.values())
    assert runs[("paged", 32)]["cached_tokens_min_after_first"] >= 32
    assert runs[("paged", 0)]["cached_tokens_min_after_first"] == 0
    assert out["tokens_per_s_paged_vs_dense"] > 0


def test_grammars_on_a_preempting_pool_match_dense():
    """Constrained samples (a JSON schema, a regex) with the default model and tokenizer:
    the paged engine, preempting on a tiny pool, gives the dense engine's tokens."""
    from checkpoints.loader import load_model
    from checkpoints.tokenizer import load_tokenizer

    config, params, model_dir = load_model("default")
    tok = load_tokenizer(model_dir)
    schema = {"type": "object", "required": ["name", "age"],
              "properties": {"name": {"type": "string", "maxLength": 6},
                             "age": {"type": "integer", "minimum": 0, "maximum": 99}}}
    prompt = tok.encode("A person as JSON:", add_special_tokens=False)
    jobs = [(prompt, {"temperature": 1.0, "seed": 40 + i, "max_tokens": 40,
                      **({"guided_json": schema} if i % 2 else {"guided_regex": "[a-z]{3,30}"})})
            for i in range(4)]

    def serve(**kv):
        eng = DeviceEngine(config, params, max_slots=4, max_len=64, prefill_buckets=(16,),
                           num_top_logprobs=0, eos_ids=tuple(tok.stop_ids), **kv)
        eng.warmup()
        s = Scheduler(eng, tok).start()
        try:
            return run(s, jobs), s.stats()
        finally:
            s.stop(1)

    want, _ = serve()
    got, stats = serve(kv_layout="paged", block_size=4, num_blocks=16)
    assert stats["kv_preemptions"] > 0
    assert_same(got, want)
