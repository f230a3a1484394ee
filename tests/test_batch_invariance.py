"""Bitwise batch invariance of logprobs on the 100M config (random weights, float32):
one seeded `deterministic: true` request alone vs the same request in slot 9 of a full
batch of 16 mixed requests (other prompts, lengths, sampling settings), and with its
prompt's first block already written by an earlier deterministic request (a prefix hit),
under the paged KV layout. Tokens and every logprob field must be bitwise equal.

Without `deterministic` they are not on XLA's CPU backend: a [1, H] x [H, N] matmul does
not round like row r of a [16, H] one (a different kernel); a row's position inside a
batch of one shape does not matter. `deterministic` runs every decode step at one shape
(all slots, the whole cache) while such a request is live, and prefills its prompt in
block-size chunks on a fixed grid, each at one shape, so a prompt resumed after cached
blocks runs the same programs at the same positions as from scratch (docs/research.md).
Without the grid the prefix hit differs at every step (a 16-token chunk's matmuls round
unlike the same rows of a 64-token one on XLA:CPU)."""

import numpy as np
import pytest

from model.config import named_config
from model.decoder import init_params
from sampling.params import SamplingParams
from serving.engine.device import DeviceEngine

STEPS = 4
TARGET = SamplingParams(temperature=0.8, top_p=0.9, logprobs=True, top_logprobs=5,
                        deterministic=True)


def _others(rng, n):
    kinds = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=40),
             SamplingParams(temperature=0.7, min_p=0.05, repetition_penalty=1.2),
             SamplingParams(temperature=1.2, typical_p=0.9)]
    return [(rng.integers(1, 32000, size=int(rng.integers(3, 40))), kinds[i % 4])
            for i in range(n)]


@pytest.fixture(scope="module")
def engine():
    cfg = named_config("qwen3-100m", dtype="float32")
    params = init_params(cfg, seed=0)
    return DeviceEngine(cfg, params, max_slots=16, max_len=64, kv_layout="paged",
                        block_size=16, num_blocks=16 * 4 + 2, prefill_buckets=(16, 64))


def _run(engine, jobs, slot_of_target, prefix_hit=None):
    """jobs: [(prompt, params)], the target first; returns the target's per-step outputs."""
    bs = engine.block_size
    slots = list(range(len(jobs)))
    order = [slot_of_target] + [s for s in slots if s != slot_of_target]
    for k, (slot, (prompt, params)) in enumerate(zip(order, jobs)):
        engine.set_blocks(slot, list(range(1 + slot * 4, 1 + slot * 4 + 4)))
    outs = []
    for k, (slot, (prompt, params)) in enumerate(zip(order, jobs)):
        start = 0
        if prefix_hit == "request" and k == 0:   # an earlier deterministic request wrote
            engine.insert(slot, prompt[:bs], 0, params, seed=99).result()   # its first block
            engine.release(slot)
            start = bs
        elif prefix_hit == "chunk" and k == 0:   # the scheduler's chunks of a long prompt
            engine.prefill_chunk(slot, prompt[:2 * bs], 0, deterministic=True)
            start = 2 * bs
        out = engine.insert(slot, prompt, start, params, seed=1234 + k * (k > 0)).result()
        if k == 0:
            outs.append(_row(out, 0))
    for _ in range(STEPS):
        out = engine.step().result()
        outs.append(_row(out, slot_of_target))
    for slot in order:
        engine.release(slot)
    return outs


def _row(out, r):
    return (int(out.tokens[r]), out.logprobs[r].tobytes(), out.top_ids[r][:5].tobytes(),
            out.top_logprobs[r][:5].tobytes(), out.raw_logprobs[r].tobytes(),
            out.processed_logprobs[r].tobytes())


def test_alone_equals_in_a_full_batch_of_16(engine):
    rng = np.random.default_rng(0)
    target = (rng.integers(1, 32000, size=37), TARGET)
    alone = _run(engine, [target], 0)
    batched = _run(engine, [target] + _others(rng, 15), 9)
    diffs = [i for i, (a, b) in enumerate(zip(alone, batched)) if a != b]
    assert not diffs, f"steps {diffs} differ alone vs in a batch of 16"


def test_alone_equals_after_a_prefix_hit(engine):
    rng = np.random.default_rng(0)
    target = (rng.integers(1, 32000, size=37), TARGET)
    alone = _run(engine, [target], 0)
    hit = _run(engine, [target] + _others(rng, 15), 9, prefix_hit="request")
    diffs = [i for i, (a, b) in enumerate(zip(alone, hit)) if a != b]
    assert not diffs, f"steps {diffs} differ with a prefix hit"
    chunked = _run(engine, [target], 3, prefix_hit="chunk")
    diffs = [i for i, (a, b) in enumerate(zip(alone, chunked)) if a != b]
    assert not diffs, f"steps {diffs} differ after a chunked prefill"


def test_scheduler_dense_prefix_hit_and_chunks():
    """Through the scheduler, dense KV (whose prefix cache reuses any common length), tiny
    model, one slot, one 16-token bucket so a long prompt goes in chunks between steps: a
    `deterministic` request sent cold, then behind another prompt sharing its first 20
    tokens (reused from 16, the grid line), gives bitwise the same tokens and logprobs."""
    from serving.engine.requests import Failure, Usage
    from serving.engine.scheduler import Scheduler
    cfg = named_config("tiny", dtype="float32")
    engine = DeviceEngine(cfg, init_params(cfg, seed=3), max_slots=1, max_len=48,
                          prefill_buckets=(16,))
    rng = np.random.default_rng(1)
    other = rng.integers(1, cfg.vocab_size, 24).tolist()
    prompt = other[:20] + rng.integers(1, cfg.vocab_size, 20).tolist()
    params = {"temperature": 0.9, "seed": 4, "max_tokens": 3, "ignore_eos": True,
              "logprobs": True, "top_logprobs": 3, "deterministic": True}
    s = Scheduler(engine).start()
    try:
        runs = []
        for i, p in enumerate([prompt, other, prompt]):
            got = []
            for ev in s.submit(s.make_request(f"r{i}", p, dict(params))):
                assert not isinstance(ev, Failure), ev.message
                if isinstance(ev, Usage):
                    got.append(ev.cached_tokens)
                    break
                got += [(lp.token_id, lp.logprob, tuple(lp.top_logprobs)) for lp in ev.logprobs]
            runs.append(got)
    finally:
        s.stop()
    cold, hit = runs[0], runs[2]
    assert cold[-1] == 0 and hit[-1] == 16         # cached_tokens: down to the grid line
    assert hit[:-1] == cold[:-1] and len(cold) == 4
