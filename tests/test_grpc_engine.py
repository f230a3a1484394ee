"""The batch server through a real gRPC server on loopback: batching, invariance, cancel,
back-pressure, validation, compilations, prefix cache.

One server per module (tiny random model, token-id prompts, 8 slots, 512 context).
"""

import threading
import time

import grpc
import numpy as np
import pytest

from model.config import named_config
from model.decoder import init_params
from serving.client import EngineClient
from serving.engine.device import compile_count
from serving.engine.server import start_in_process

SLOTS = 8
MAX_QUEUE = 32
MAX_LEN = 512


@pytest.fixture(scope="module")
def server():
    cfg = named_config("tiny", dtype="float32")
    srv = start_in_process(cfg, init_params(cfg, seed=1), max_slots=SLOTS, max_len=MAX_LEN,
                           prefill_buckets=(8, 16, 32), max_queue=MAX_QUEUE,
                           model_name="tiny", reflection=True)
    yield srv
    srv.stop(grace_s=5)


@pytest.fixture(scope="module")
def client(server):
    c = EngineClient(f"127.0.0.1:{server.port}")
    yield c
    c.close()


def prompt(seed: int, length: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(1, 500, length)]


def run_concurrently(client, jobs):
    """jobs: [(prompt_ids, sampling)] -> [Generation | RpcError], all in flight at once."""
    results = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def go(i, ids, sampling):
        barrier.wait()
        try:
            results[i] = client.generate(ids, sampling, timeout=120)
        except grpc.RpcError as e:
            results[i] = e

    threads = [threading.Thread(target=go, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def wait_until(check, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.01)
    raise AssertionError("condition not reached in time")


def test_health_and_list_models(server, client):
    assert client.healthy()
    (m,) = client.list_models()
    assert (m.name, m.max_model_len, m.vocab_size, m.max_slots) == ("tiny", MAX_LEN, 512, SLOTS)
    assert client.count_tokens([4, 5, 6]) == 3


def test_32_concurrent_streams_with_different_params(client):
    jobs = []
    for i in range(32):
        sampling = {"max_tokens": 1 + i % 9, "temperature": [0.0, 0.7, 1.0, 1.3][i % 4],
                    "top_k": [0, 5, 50][i % 3], "top_p": [1.0, 0.9][i % 2],
                    "repetition_penalty": [1.0, 1.2][i % 2], "n": 1 + (i % 5 == 0),
                    "logprobs": i % 2 == 0, "top_logprobs": i % 3, "seed": i}
        jobs.append((prompt(i, 3 + (i * 7) % 60), sampling))
    results = run_concurrently(client, jobs)
    for (ids, sampling), g in zip(jobs, results):
        assert not isinstance(g, Exception), g
        assert len(g.choices) == sampling["n"]
        for c in g.choices:
            assert len(c.token_ids) == sampling["max_tokens"]
            assert c.finish_reason == "length"
            if sampling["logprobs"] or sampling["top_logprobs"]:
                assert [lp.token_id for lp in c.logprobs] == c.token_ids
                assert all(len(lp.top_ids) == sampling["top_logprobs"] for lp in c.logprobs)
            else:
                assert c.logprobs == []
        assert g.usage.completion_tokens == sampling["max_tokens"] * sampling["n"]
        assert g.usage.prompt_tokens == len(ids)
        assert g.usage.seed == sampling["seed"]
        assert g.usage.gpu_seconds > 0


@pytest.mark.parametrize("sampling", [
    {"temperature": 0.0, "max_tokens": 12},
    {"temperature": 1.0, "top_p": 0.95, "max_tokens": 12, "seed": 1234},
    {"temperature": 0.8, "top_k": 40, "presence_penalty": 0.5, "max_tokens": 12, "seed": 99,
     "n": 2},
], ids=["greedy", "seeded", "seeded-n2"])
def test_alone_equals_inside_a_full_batch(client, sampling):
    target = prompt(1000, 21)
    alone = client.generate(target, sampling)
    others = [(prompt(2000 + i, 5 + 3 * i), {"temperature": 1.0, "max_tokens": 20 + i})
              for i in range(SLOTS + 4)]
    results = run_concurrently(client, others[:5] + [(target, sampling)] + others[5:])
    batched = results[5]
    assert [c.token_ids for c in batched.choices] == [c.token_ids for c in alone.choices]
    if sampling.get("n", 1) > 1:
        assert batched.choices[0].token_ids != batched.choices[1].token_ids


def test_seed_is_drawn_and_returned_when_missing(client):
    target = prompt(3000, 9)
    first = client.generate(target, {"temperature": 1.0, "max_tokens": 16})
    again = client.generate(target, {"temperature": 1.0, "max_tokens": 16,
                                     "seed": first.usage.seed})
    assert again.choices[0].token_ids == first.choices[0].token_ids


def test_cancel_and_deadline_free_the_slot(client):
    long = {"temperature": 1.0, "max_tokens": 480, "ignore_eos": True}
    calls = [client.stream(prompt(4000 + i, 4), long) for i in range(SLOTS)]
    firsts = [next(iter(c)) for c in calls]          # every slot holds a running request
    assert all(r.HasField("delta") for r in firsts)
    assert client.stats().slots_in_use == SLOTS
    waiting = {}
    t = threading.Thread(target=lambda: waiting.update(
        g=client.generate(prompt(4100, 4), {"temperature": 0.0, "max_tokens": 2})))
    t.start()
    wait_until(lambda: client.stats().queue_depth == 1)
    calls[0].cancel()
    t.join(60)
    assert waiting["g"].choices[0].finish_reason == "length"
    # the long ones are still going: the slot came from the cancelled request
    assert all(c.running() for c in calls[1:])
    for c in calls[1:]:
        c.cancel()
    wait_until(lambda: client.stats().slots_in_use == 0)
    # 480 tokens take ~0.3 s alone on a quiet 2-core machine: a 50 ms deadline expires
    # while the request runs (or, on a slower machine, while it waits for admission)
    with pytest.raises(grpc.RpcError) as e:
        client.generate(prompt(4200, 4), long, timeout=0.05)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: client.stats().slots_in_use == 0 and client.stats().queue_depth == 0)


def test_full_queue_is_resource_exhausted_and_nothing_is_lost(client):
    long = {"temperature": 1.0, "max_tokens": 480, "ignore_eos": True}
    calls = [client.stream(prompt(5000 + i, 4), long) for i in range(SLOTS)]
    for c in calls:
        next(iter(c))
    results = {}

    def go(i):
        results[i] = client.generate(prompt(5100 + i, 3 + i), {"temperature": 0.0,
                                                                "max_tokens": 3})

    threads = [threading.Thread(target=go, args=(i,)) for i in range(MAX_QUEUE)]
    for t in threads:
        t.start()
    wait_until(lambda: client.stats().queue_depth == MAX_QUEUE)
    with pytest.raises(grpc.RpcError) as e:
        client.generate(prompt(5200, 4), {"max_tokens": 2})
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue" in e.value.details()
    for c in calls:
        c.cancel()
    for t in threads:
        t.join(60)
    assert sorted(results) == list(range(MAX_QUEUE))
    assert all(len(g.choices[0].token_ids) == 3 for g in results.values())
    wait_until(lambda: client.stats().slots_in_use == 0)


@pytest.mark.parametrize("ids, sampling, field", [
    ([1, 2, 3], {"temperature": -1}, "temperature"),
    ([1, 2, 3], {"top_p": 0}, "top_p"),
    ([1, 2, 3], {"bogus_knob": 1}, "bogus_knob"),
    ([1, 2, 3], {"n": SLOTS + 1}, "n"),
    ([1, 2, 3], {"stop": ["x"]}, "stop"),
    ([1, 2, 3], {"top_logprobs": 21}, "top_logprobs"),
    ([1, 2, 999], {}, "prompt_ids"),
    ([], {}, "prompt_ids"),
    ([1] * MAX_LEN, {}, "prompt_ids"),
])
def test_bad_arguments_are_invalid_argument_naming_the_field(client, ids, sampling, field):
    with pytest.raises(grpc.RpcError) as e:
        client.generate(ids, sampling)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details()


def test_bad_sampling_json(client):
    from serving.proto import flaxserve_pb2 as pb
    with pytest.raises(grpc.RpcError) as e:
        list(client.stub.Generate(pb.GenerateRequest(prompt_ids=[1], sampling_json="[1]")))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling_json" in e.value.details()


def test_truncate_prompt_tokens_keeps_the_last_tokens(client):
    ids = prompt(6000, MAX_LEN + 40)
    g = client.generate(ids, {"temperature": 0.0, "max_tokens": 4}, truncate_prompt_tokens=100)
    ref = client.generate(ids[-100:], {"temperature": 0.0, "max_tokens": 4})
    assert g.usage.prompt_tokens == 100
    assert g.choices[0].token_ids == ref.choices[0].token_ids


def test_context_limit_ends_with_length(client):
    ids = prompt(6100, MAX_LEN - 3)
    g = client.generate(ids, {"temperature": 0.0, "ignore_eos": True})
    assert len(g.choices[0].token_ids) == 3
    assert g.choices[0].finish_reason == "length"


def test_no_compilation_after_warmup_across_prompt_lengths(client):
    client.generate(prompt(7000, 3), {"temperature": 0.0, "max_tokens": 2})
    before = compile_count()
    jobs = [(prompt(7100 + n, n), {"temperature": 0.9, "max_tokens": 3, "seed": n,
                                   "n": 1 + n % 3, "logprobs": True, "top_logprobs": n % 4})
            for n in (1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 64, 65, 100, 150)]
    for g in run_concurrently(client, jobs):
        assert not isinstance(g, Exception), g
    assert compile_count() == before


def test_prefix_cache_on_equals_off(server, client):
    """The default paged layout's prefix cache reuses whole blocks, across requests (a
    running one's prompt too): cached_tokens is the prompt's full blocks already named,
    always leaving its last token to compute; tokens are the same with the cache off."""
    sched = server.scheduler
    bs = sched.engine.block_size
    full = lambda n: n // bs * bs          # tokens in the full blocks of n positions
    base = prompt(8000, 70)
    long_running = {"temperature": 1.0, "max_tokens": 400, "ignore_eos": True, "seed": 5}
    cases = [(base, {"temperature": 0.0, "max_tokens": 10}),
             (base + prompt(8001, 5), {"temperature": 0.0, "max_tokens": 10}),
             (base[:40] + prompt(8002, 30), {"temperature": 1.0, "max_tokens": 10, "seed": 3}),
             (base + prompt(8003, 3), {"temperature": 0.7, "max_tokens": 8, "seed": 11,
                                       "n": 3})]

    busy_prompt = prompt(8100, 50)

    def run_all(cache: bool):
        sched.prefix_cache = sched.kv.prefix_cache = cache
        out = []
        # a running request's prompt blocks are shared as soon as they are written
        call = client.stream(busy_prompt, long_running)
        next(iter(call))
        out.append(client.generate(busy_prompt + prompt(8200, 6),
                                   {"temperature": 0.0, "max_tokens": 10}))
        call.cancel()
        for ids, sampling in cases:
            out.append(client.generate(ids, sampling))
        return out

    try:
        on = run_all(True)       # first: these prompts are new to the cache
        off = run_all(False)
    finally:
        sched.prefix_cache = sched.kv.prefix_cache = True
    assert all(g.usage.cached_tokens == 0 for g in off)
    assert on[0].usage.cached_tokens == full(50)               # the running request's blocks
    assert on[1].usage.cached_tokens == 0
    assert on[2].usage.cached_tokens == full(len(base))        # base's blocks, from on[1]
    assert on[3].usage.cached_tokens == full(40)
    assert on[4].usage.cached_tokens == full(len(base))        # n=3 shares them too
    for a, b in zip(off, on):
        assert [c.token_ids for c in a.choices] == [c.token_ids for c in b.choices]
    again = client.generate(*cases[1])          # every full block but the last token's
    assert again.usage.cached_tokens == full(len(cases[1][0]) - 1)
    assert again.choices[0].token_ids == on[2].choices[0].token_ids


def test_generated_code_matches_the_proto():
    """The checked-in pb2 modules are exactly what `python -m serving.proto.build` writes."""
    from pathlib import Path
    from serving.proto import build
    for name, text in build.generated_text().items():
        assert (Path(build.HERE) / name).read_text() == text, f"{name} is stale: regenerate"


def test_reflection_lists_the_services(server):
    # on here (reflection=True); off by default (tests/reliability/test_auth.py)
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import \
        ProtoReflectionDescriptorDatabase
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"flaxserve.v1.FlaxServe", "grpc.health.v1.Health"} <= services


def test_usage_accounting(client):
    g = client.generate(prompt(9000, 20), {"temperature": 0.0, "max_tokens": 5, "n": 2})
    u = g.usage
    assert (u.prompt_tokens, u.completion_tokens) == (20, 10)
    assert 0 <= u.queue_time <= u.ttft
    assert u.gpu_seconds > 0


def test_prompt_logprobs_are_the_models_scores(server, client):
    from model.scoring import token_logprobs
    ids = prompt(9100, 13)
    g = client.generate(ids, {"temperature": 0.0, "max_tokens": 2, "prompt_logprobs": 3})
    got = g.usage.prompt_logprobs
    assert [lp.token_id for lp in got] == ids[1:]
    engine = server.scheduler.engine
    want = token_logprobs(engine.config, engine.params, ids)
    np.testing.assert_allclose([lp.logprob for lp in got], want, atol=1e-5)
    for lp in got:
        assert len(lp.top_ids) == 3 and lp.top_logprobs[0] >= lp.logprob
        assert (lp.rank == 1) == (lp.token_id == lp.top_ids[0])


def test_stats_report_the_engines_memory(server, client):
    """Stats carries the engine process's RSS and what its weights and KV cache take
    (the server runs in this process: its RSS is ours)."""
    from serving.proto import flaxserve_pb2 as pb
    reply = client.stub.Stats(pb.StatsRequest(), timeout=10)
    cfg = named_config("tiny", dtype="float32")
    weights = sum(np.asarray(x).nbytes for x in
                  __import__("jax").tree.leaves(init_params(cfg, seed=1)))
    assert reply.weights_bytes == weights
    engine = server.scheduler.engine     # the default paged pool: blocks x tokens x K and V
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    assert reply.kv_cache_bytes == engine.num_blocks * engine.block_size * per_token > 0
    with open("/proc/self/statm") as f:
        ours = int(f.read().split()[1]) * __import__("os").sysconf("SC_PAGE_SIZE")
    assert 0.5 * ours < reply.rss_bytes < 2 * ours
