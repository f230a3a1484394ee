"""Batched prefill (DeviceEngine.insert_many, prefill_batch > 1) against one prompt at a time.

One tiny paged engine for the module (4 slots, blocks of 4 tokens, a small pool). The same
prompts, of lengths that cross block boundaries, give the same
greedy and seeded tokens and logprobs (1e-5) prefilled together as one by one: on the
engine directly, and through the scheduler in a burst that mixes batched prompts with a
prefix-cache hit, n = 2 and preemption (the pool is too small for the burst). Nothing
compiles after warm-up.
"""

import numpy as np
import pytest

from model.config import named_config
from model.decoder import init_params
from sampling.params import SamplingParams
from serving.engine.device import DeviceEngine, compile_count
from serving.engine.prefill_plan import plan, row_buckets, split_head
from serving.engine.requests import Failure, Usage
from serving.engine.scheduler import Scheduler

CFG = named_config("tiny", dtype="float32")
PARAMS = init_params(CFG, seed=11)
MAX_LEN, BUCKETS, BLOCK, SLOTS = 48, (32,), 4, 4


@pytest.fixture(scope="module")
def engine():
    eng = DeviceEngine(CFG, PARAMS, max_slots=SLOTS, max_len=MAX_LEN, prefill_buckets=BUCKETS,
                       kv_layout="paged", block_size=BLOCK, num_blocks=20, prefill_batch=4)
    eng.warmup()
    eng.compiles_after_warmup = compile_count()
    # the accelerators' plan (padding is free), so that the batched programs run here;
    # the CPU's plan by cost has its own test below
    eng.prefill_padding_costs = False
    return eng


def test_plan_groups_by_bucket_and_carries_a_lone_prompt_up():
    assert row_buckets(1) == () and row_buckets(4) == (4,) and row_buckets(32) == (4, 16, 32)
    # two short ones share an 8-bucket; the lone 20 has no larger bucket: alone
    assert plan([3, 6, 20], (4,), (8, 32)) == [([0, 1], 4, 8), ([2], 1, 32)]
    # a lone short prompt rides with the long ones
    assert plan([3, 20, 30], (4,), (8, 32)) == [([0, 1, 2], 4, 32)]
    assert plan([3] * 6, (4,), (8, 32)) == [([0, 1, 2, 3], 4, 8), ([4, 5], 4, 8)]
    assert plan([5, 9], (), (8, 32)) == [([0], 1, 8), ([1], 1, 32)]


def test_split_head_runs_a_prompt_just_past_a_bucket_as_two_smaller_ones():
    ladder = (16, 32, 64, 128, 256, 512)
    # 129-192 tokens: 128 + 16/32/64 instead of 256; 193+ would cost the 256 anyway
    assert [split_head(n, ladder) for n in (129, 144, 160, 192)] == [128] * 4
    assert [split_head(n, ladder) for n in (193, 256, 128, 16, 1, 513)] == [0] * 6
    assert split_head(300, ladder) == 256                        # 256 + 64 < 512
    assert split_head(17, (16,)) == 0 and split_head(17, (8, 16, 32)) == 16
    # a program the background compile has not made yet: the whole bucket instead
    assert split_head(129, ladder, lambda name: name != "prefill 16 (cached prefix)") == 0
    assert split_head(129, ladder, lambda name: name != "prefill 128") == 0
    assert split_head(129, ladder, lambda name: name != "prefill 256") == 128


PROMPTS = [np.random.default_rng(i).integers(1, CFG.vocab_size, n)
           for i, n in enumerate((3, 6, 13, 20))]
SAMPLING = [SamplingParams(temperature=0.0, logprobs=True, top_logprobs=5),
            SamplingParams(temperature=0.9, top_k=20, logprobs=True, top_logprobs=5)] * 2


def _engine_run(engine, batched, n=SLOTS):
    """The first n PROMPTS inserted (together or one at a time), then 5 decode steps."""
    first = 1
    for s, p in enumerate(PROMPTS[:n]):      # the blocks its prompt and 6 tokens need
        need = -(-(len(p) + 6) // BLOCK)
        engine.set_blocks(s, list(range(first, first + need)))
        first += need
    items = [dict(slot=s, prompt_ids=p, sampling=SAMPLING[s], seed=7 + s)
             for s, p in enumerate(PROMPTS[:n])]
    if batched:
        pending = engine.insert_many(items)
    else:
        pending = [engine.insert(it["slot"], it["prompt_ids"], 0, it["sampling"], it["seed"])
                   for it in items]
    outs = [p.result() for p in pending]
    tokens = [[int(o.tokens[0])] for o in outs]
    tops = [[o.top_logprobs[0][:5]] for o in outs]
    for _ in range(5):
        o = engine.step().result()
        for s in range(n):
            tokens[s].append(int(o.tokens[s]))
            tops[s].append(o.top_logprobs[s][:5])
    for s in range(n):
        engine.release(s)
    return tokens, tops


def test_insert_many_equals_one_at_a_time(engine):
    before = engine.batched_prefills
    alone = _engine_run(engine, batched=False)
    assert engine.batched_prefills == before
    together = _engine_run(engine, batched=True)
    assert engine.batched_prefills == before + 1      # one [4, 32] program
    assert together[0] == alone[0]
    np.testing.assert_allclose(np.array(together[1]), np.array(alone[1]), atol=1e-5)
    assert compile_count() == engine.compiles_after_warmup


def test_insert_many_one_at_a_time_while_its_program_compiles(engine):
    """While the background compilation (serving/engine/warmup.py) has not reached a
    batched prefill program, insert_many prefills those prompts one at a time rather than
    wait for it: the same tokens, nothing compiled."""
    alone = _engine_run(engine, batched=False)
    before = engine.batched_prefills
    engine._unready = {"batched prefill 4 x 32"}
    try:
        waiting = _engine_run(engine, batched=True)
    finally:
        engine._unready = set()
    assert engine.batched_prefills == before
    assert waiting[0] == alone[0]
    np.testing.assert_allclose(np.array(waiting[1]), np.array(alone[1]), atol=1e-5)
    assert compile_count() == engine.compiles_after_warmup


X = np.random.default_rng(50).integers(1, CFG.vocab_size, 8).tolist()   # two blocks
R = np.random.default_rng(51)
JOBS = [  # (prompt, sampling); H shares W's first two blocks
    ("W", X + R.integers(1, CFG.vocab_size, 3).tolist(), {"temperature": 0.0}),
    ("F1", R.integers(1, CFG.vocab_size, 6).tolist(), {"temperature": 0.8, "seed": 3}),
    ("F2", R.integers(1, CFG.vocab_size, 5).tolist(), {"temperature": 0.0}),
    ("H", X + R.integers(1, CFG.vocab_size, 9).tolist(), {"temperature": 0.0}),
    ("F3", R.integers(1, CFG.vocab_size, 7).tolist(), {"temperature": 0.7, "seed": 5}),
    ("N2", R.integers(1, CFG.vocab_size, 14).tolist(), {"temperature": 1.0, "seed": 9,
                                                         "n": 2}),
    ("F4", R.integers(1, CFG.vocab_size, 2).tolist(), {"temperature": 0.0}),
]


def _collect(handle):
    n = handle.request.sampling.n
    tokens, lps = [[] for _ in range(n)], [[] for _ in range(n)]
    for ev in handle:
        if isinstance(ev, Failure):
            raise AssertionError(ev.message)
        if isinstance(ev, Usage):
            return tokens, lps, ev.cached_tokens
        tokens[ev.index] += ev.token_ids
        lps[ev.index] += [lp.logprob for lp in ev.logprobs]


def _request(s, name, prompt, sampling):
    return s.make_request(name, prompt, dict(sampling, max_tokens=16, ignore_eos=True,
                                             logprobs=True))


def test_a_burst_through_the_scheduler_equals_one_at_a_time(engine):
    # one at a time: each request alone in the engine (the one-prompt path)
    s = Scheduler(engine, max_queue=64, prefill_budget=20).start()
    try:
        alone = [_collect(s.submit(_request(s, *job))) for job in JOBS]
    finally:
        s.stop()
    before = engine.batched_prefills, engine.batched_prompts
    # a burst: everything queued before the device thread starts; the 20-token budget
    # admits W and F1 (one program), then F2 and H (a hit on W's blocks), ...
    s = Scheduler(engine, max_queue=64, prefill_budget=20)
    handles = [s.submit(_request(s, *job)) for job in JOBS]
    s.start()
    try:
        burst = [_collect(h) for h in handles]
        stats = s.stats()
    finally:
        s.stop()
    assert engine.batched_prefills > before[0], "no prompts were prefilled together"
    assert stats["kv_preemptions"] > 0, stats
    for (name, _, _), (t1, l1, c1), (t2, l2, c2) in zip(JOBS, burst, alone):
        assert t1 == t2, name
        np.testing.assert_allclose(np.array(l1), np.array(l2), atol=1e-5, err_msg=name)
    assert alone[3][2] == 8 and burst[3][2] == 8      # H reused W's two blocks both times
    assert compile_count() == engine.compiles_after_warmup


def test_default_prefill_budget_by_backend():
    """Unset --prefill-budget: the largest chunk without batching; with it, 512 tokens on a
    CPU (arithmetic-bound: a bigger group only delays every first token) and 2048 on an
    accelerator, never below the largest chunk."""
    from serving.engine.scheduler import default_prefill_budget
    assert default_prefill_budget(256, False, "cpu") == 256
    assert default_prefill_budget(256, False, "gpu") == 256
    assert default_prefill_budget(256, True, "cpu") == 512
    assert default_prefill_budget(256, True, "gpu") == 2048
    assert default_prefill_budget(256, True, "tpu") == 2048
    assert default_prefill_budget(1024, True, "cpu") == 1024


def test_scheduler_takes_the_backend_default(engine):
    from serving.engine.scheduler import Scheduler, default_prefill_budget
    s = Scheduler(engine)
    assert s.prefill_budget == default_prefill_budget(
        engine.prefill_buckets[-1], bool(engine.prefill_rows), "cpu")
    assert Scheduler(engine, prefill_budget=77).prefill_budget == 77


def test_plan_by_cost_batches_only_where_padding_costs_nothing():
    ladder = (16, 32, 64, 128, 256, 512)
    # 3 chat prompts of 158 tokens: alone 128 + 32 each (480 rows), not [4, 256] (1024)
    assert plan([158] * 3, (4, 16), ladder, True) == [([i], 1, 256) for i in range(3)]
    assert plan([158] * 3, (4, 16), ladder) == [([0, 1, 2], 4, 256)]
    # full rows of full buckets: batched as before
    assert plan([16] * 16, (4, 16), ladder, True) == [(list(range(16)), 16, 16)]
    # 5 prompts: a [4, 16] and one alone, not a [16, 16] with 11 padding rows
    assert plan([16] * 5, (4, 16), ladder, True) == [([0, 1, 2, 3], 4, 16), ([4], 1, 16)]
    # 8 prompts of 100: two [4, 128]; 3 of them: alone (a [4, 128] pads a row)
    assert plan([100] * 8, (4, 16), ladder, True) == [([0, 1, 2, 3], 4, 128),
                                                      ([4, 5, 6, 7], 4, 128)]
    assert plan([100] * 3, (4, 16), ladder, True) == [([i], 1, 128) for i in range(3)]
    # every index once
    lengths = [5, 16, 17, 100, 158, 16, 16, 16, 300, 30, 31]
    got = sorted(i for g, _, _ in plan(lengths, (4, 16), ladder, True) for i in g)
    assert got == list(range(len(lengths)))


def test_insert_many_on_cpu_batches_only_what_padding_does_not_cost(engine):
    """With the CPU's plan (one 32-token bucket, rows of 4 here): 3 prompts would pad a
    [4, 32] program by a row, so each is prefilled alone (the same tokens as one at a
    time); 4 prompts fill it and still share it. Nothing compiles."""
    alone = _engine_run(engine, batched=False, n=3)
    before = engine.batched_prefills
    engine.prefill_padding_costs = True
    try:
        three = _engine_run(engine, batched=True, n=3)
        assert engine.batched_prefills == before
        _engine_run(engine, batched=True)
        assert engine.batched_prefills == before + 1
    finally:
        engine.prefill_padding_costs = False
    assert three[0] == alone[0]
    np.testing.assert_allclose(np.array(three[1]), np.array(alone[1]), atol=1e-6)
    assert compile_count() == engine.compiles_after_warmup
