"""The device engine: what the scheduler relies on, checked against the plain forward.

- greedy tokens equal the argmax of the model's own full forward (no cache tricks);
- a seeded request gives the same tokens alone and inside a busy batch, in any slot;
- chunked prefill, copy_prefix and slot reuse change nothing;
- nothing compiles after warm-up, whatever the prompt lengths.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import named_config
from model.decoder import forward, init_cache, init_params
from sampling.params import SamplingParams
from serving.engine import programs
from serving.engine.device import DeviceEngine, compile_count

CFG = named_config("tiny", dtype="float32")
PARAMS = init_params(CFG, seed=3)
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def engine():
    eng = DeviceEngine(CFG, PARAMS, max_slots=4, max_len=64, prefill_buckets=(8, 16, 32))
    eng.warmup()
    return eng


def reference_greedy(prompt, steps):
    """Greedy continuation by re-running the full forward on the whole sequence each time."""
    seq = list(prompt)
    f = jax.jit(lambda p, c, t, q: forward(CFG, p, c, t, q))
    for _ in range(steps):
        n = len(seq)
        logits, _ = f(PARAMS, init_cache(CFG, 1, 64), jnp.asarray([seq]), jnp.arange(n)[None])
        seq.append(int(jnp.argmax(logits[0, -1])))
    return seq[len(prompt):]


def run(engine, slot, prompt, params, seed, steps, chunk=None):
    prompt = np.asarray(prompt, np.int32)
    start = 0
    if chunk:
        while len(prompt) - start > chunk:
            engine.prefill_chunk(slot, prompt[start:start + chunk], start)
            start += chunk
    out = engine.insert(slot, prompt, start, params, seed).result()
    tokens = [int(out.tokens[0])]
    for _ in range(steps - 1):
        tokens.append(int(engine.step().result().tokens[slot]))
    return tokens


def test_greedy_equals_full_forward_argmax(engine):
    prompt = [5, 17, 99, 3, 250, 8, 41]
    got = run(engine, 0, prompt, GREEDY, 0, 8)
    engine.release(0)
    assert got == reference_greedy(prompt, 8)


def test_chunked_prefill_gives_the_same_tokens(engine):
    prompt = list(np.random.default_rng(0).integers(0, CFG.vocab_size, 27))
    whole = run(engine, 1, prompt, GREEDY, 0, 6)
    engine.release(1)
    chunked = run(engine, 1, prompt, GREEDY, 0, 6, chunk=8)
    engine.release(1)
    assert whole == chunked


def test_a_prompt_just_past_a_bucket_runs_as_two_smaller_programs(engine):
    """17 tokens (buckets 8/16/32): the first 16 as a fresh chunk, then 1 token after
    that cached prefix (prefill_plan.split_head), not padded to 32. The same greedy
    tokens as the whole-bucket path, logprobs within float32 noise, nothing compiled."""
    prompt = list(np.random.default_rng(4).integers(0, CFG.vocab_size, 17))
    seeded = SamplingParams(temperature=0.8, top_k=40, logprobs=True, top_logprobs=3)
    chunks = []
    engine.prefill_chunk = lambda slot, ids, start, *a: (
        chunks.append((start, len(ids))), DeviceEngine.prefill_chunk(engine, slot, ids, start,
                                                                     *a))
    try:
        before = compile_count()
        split = run(engine, 0, prompt, GREEDY, 0, 4)
        engine.release(0)
        split_lp = engine.insert(0, np.asarray(prompt), 0, seeded, 3).result()
        engine.release(0)
        assert compile_count() == before
        assert chunks == [(0, 16), (0, 16)]
        engine._unready = {"prefill 8 (cached prefix)"}          # no split: bucket 32
        whole = run(engine, 0, prompt, GREEDY, 0, 4)
        engine.release(0)
        whole_lp = engine.insert(0, np.asarray(prompt), 0, seeded, 3).result()
        engine.release(0)
        assert chunks == [(0, 16), (0, 16)]
    finally:
        engine._unready = set()
        del engine.prefill_chunk
    assert split == whole
    assert int(split_lp.tokens[0]) == int(whole_lp.tokens[0])
    np.testing.assert_allclose(split_lp.top_logprobs[0][:3], whole_lp.top_logprobs[0][:3],
                               atol=1e-5)


def test_a_chunk_after_a_short_cached_prefix_attends_over_its_span_only():
    """A chunk after a cached prefix that ends within its bucket's prefix span (the
    smallest attend bucket of at least twice the bucket) runs the program over that span,
    not over the whole row: the same greedy tokens and logprobs (float32 noise) as the
    whole-row program. An unready span program or an engine never warmed up take the
    whole row."""
    eng = DeviceEngine(CFG, PARAMS, max_slots=2, max_len=512, prefill_buckets=(8, 16, 32))
    assert eng.prefix_spans == {8: 128, 16: 128, 32: 128}
    assert eng._attend_of(32, 16, 20) is None                   # never warmed up
    eng._warmed = True
    assert (eng._attend_of(32, 0, 20), eng._attend_of(32, 16, 20)) == (32, 128)
    prompt = np.random.default_rng(5).integers(0, CFG.vocab_size, 44)
    seeded = SamplingParams(temperature=0.8, top_k=40, logprobs=True, top_logprobs=3)
    got, seen, jitted = {}, [], eng._prefill
    eng._prefill = lambda *args: (seen.append(args[-1]), jitted(*args))[1]   # its `attend`
    for name in ("span", "whole"):
        if name == "whole":
            assert seen == [16, 128, 16, 128]
            seen.clear()
            eng._unready = {programs.cached_prefill_span(32, 128)}
            assert eng._attend_of(32, 16, 28) is None
        eng.prefill_chunk(0, prompt[:16], 0)                     # the cached prefix
        greedy = eng.insert(0, prompt, 16, GREEDY, 0)
        tokens = [int(greedy.result().tokens[0])] + [int(eng.step().result().tokens[0])
                                                      for _ in range(5)]
        eng.release(0)
        eng.prefill_chunk(1, prompt[:16], 0)
        got[name] = tokens, eng.insert(1, prompt, 16, seeded, 3).result()
        eng.release(1)
    assert seen == [16, None, 16, None]
    assert got["span"][0] == got["whole"][0]
    a, b = got["span"][1], got["whole"][1]
    assert int(a.tokens[0]) == int(b.tokens[0])
    np.testing.assert_allclose(a.top_logprobs[0][:3], b.top_logprobs[0][:3], atol=1e-5)


@pytest.mark.parametrize("layout", ["dense", "paged", "sliding window"])
def test_a_chunk_after_a_long_cached_prefix_attends_over_its_live_length(layout):
    """A chunk after a cached prefix that ends past its prefix span (a later turn of a
    conversation, a long prompt's later chunks) attends over the smallest attend bucket
    holding it (`chunk_spans`), not the whole row. Its program is not compiled at warm-up:
    the first such chunk runs the whole row and queues the span's program for the
    background; once compiled, the same prompt takes it and compiles nothing on the
    request's path. Greedy tokens identical, logprobs within 1e-5 of the whole row's, on
    the dense and paged layouts and with a sliding window shorter than the prefix."""
    cfg = CFG if layout != "sliding window" else dataclasses.replace(CFG, sliding_window=40)
    params = PARAMS
    paged = dict(kv_layout="paged", block_size=16, num_blocks=70) if layout == "paged" else {}
    eng = DeviceEngine(cfg, params, max_slots=2, max_len=512, prefill_buckets=(8, 16, 32),
                       **paged)
    assert eng.chunk_spans == {8: (128, 256), 16: (128, 256), 32: (128, 256)}
    eng._warmed = True
    prompt = np.random.default_rng(6).integers(0, CFG.vocab_size, 230)   # 200 cached + 30
    seeded = SamplingParams(temperature=0.8, top_k=40, logprobs=True, top_logprobs=3)
    seen, jitted = [], eng._prefill
    eng._prefill = lambda *args: (seen.append(args[-1]), jitted(*args))[1]   # its `attend`
    eng._prefill.lower = jitted.lower            # what the background compiles

    def turn(slot, sampling, steps):
        if paged:
            eng.set_blocks(slot, range(1 + 32 * slot, 1 + 32 * slot + 16))
        for start in range(0, 200, 32):                  # the prefix, in chunks of 32
            eng.prefill_chunk(slot, prompt[start:min(start + 32, 200)], start)
        out = eng.insert(slot, prompt, 200, sampling, 3)
        first = out.result()
        more = [int(eng.step().result().tokens[slot]) for _ in range(steps)]
        eng.release(slot)
        return [int(first.tokens[0])] + more, first

    eng.lazy_spans = False                       # as over several processes: no new spans
    whole = turn(0, GREEDY, 5), turn(1, seeded, 0)
    # chunks ending at 32, 64 ... 200, then the 30 tokens at 200 (bucket 32, ends at 230)
    assert seen == [32, 128, 128, 128, None, None, None, None] * 2
    assert not eng._lazy_queued
    eng.lazy_spans = True
    seen.clear()
    queued = turn(0, GREEDY, 5), turn(1, seeded, 0)      # queues the 256 span, meanwhile
    assert seen == [32, 128, 128, 128, None, None, None, None] * 2     # the whole row
    assert eng._lazy_queued == {programs.cached_prefill_span(32, 256),
                                programs.cached_prefill_span(8, 256)}
    eng.wait_compiled()
    assert not eng.lazy_errors and eng._ready_spans == eng._lazy_queued
    seen.clear()
    before = compile_count()
    spans = turn(0, GREEDY, 5), turn(1, seeded, 0)
    assert compile_count() == before
    assert seen == [32, 128, 128, 128, 256, 256, 256, 256] * 2
    for got in (queued, spans):
        assert got[0][0] == whole[0][0]
        a, b = got[1][1], whole[1][1]
        assert int(a.tokens[0]) == int(b.tokens[0])
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
        np.testing.assert_allclose(a.top_logprobs[0][:3], b.top_logprobs[0][:3], atol=1e-5)


def test_a_full_warmup_compiles_every_chunk_span():
    """The full warm-up (`--full-warmup`) runs every (bucket, span) program of
    `chunk_spans`: afterwards a chunk ending in any span takes that span's program and
    nothing compiles, nothing is queued."""
    eng = DeviceEngine(CFG, PARAMS, max_slots=1, max_len=512, prefill_buckets=(8, 16, 32))
    eng.warmup()
    assert eng._ready_spans == {programs.cached_prefill_span(b, a)
                                for b in (8, 16, 32) for a in (128, 256)}
    before = compile_count()
    for bucket, start, n, span in ((8, 100, 7, 128), (8, 130, 7, 256), (16, 240, 16, 256),
                                   (32, 90, 30, 128), (32, 200, 32, 256), (32, 300, 30, None)):
        assert eng._bucket(n, fresh=False) == bucket
        assert eng._attend_of(bucket, start, n) == span
        eng.prefill_chunk(0, np.zeros(n, np.int32), start)
    jax.block_until_ready(eng.state)
    assert compile_count() == before and not eng._lazy_queued


def test_a_background_warmup_compiles_a_wanted_span_after_its_own_list():
    """With the background warm-up (a warm restart) the prefix spans are in its list
    (`_unready` until compiled); a chunk wanting another span while the list runs takes
    the whole row and queues the span, which compiles once the list is done: then the
    chunk takes it, compiling nothing."""
    eng = DeviceEngine(CFG, PARAMS, max_slots=2, max_len=512, prefill_buckets=(8, 16, 32))
    thread = eng.warmup(background=True)
    assert {n for n in eng._unready if " x " in n} == {
        programs.cached_prefill_span(b, 128) for b in (8, 16, 32)}
    eng.prefill_chunk(0, np.zeros(32, np.int32), 0)
    assert eng._chunk_args(0, np.zeros(30, np.int32), 200)[-1] is None
    assert eng._lazy_queued == {programs.cached_prefill_span(32, 256)}
    thread.join()
    eng.wait_compiled()
    assert eng._ready_spans == eng._lazy_queued and not eng.lazy_errors
    before = compile_count()
    assert eng._chunk_args(0, np.zeros(30, np.int32), 200)[-1] == 256
    eng.prefill_chunk(0, np.zeros(30, np.int32), 200)
    jax.block_until_ready(eng.state)
    assert compile_count() == before


def test_an_unready_bucket_gives_way_to_a_ready_larger_one(engine):
    """While the background compilation (serving/engine/warmup.py) has not reached a
    prompt's prefill bucket, the prompt runs in the smallest ready bucket that holds it
    (a warm restart serves before every bucket is compiled): the same greedy tokens."""
    prompt = list(np.random.default_rng(2).integers(0, CFG.vocab_size, 11))   # bucket 16
    own = run(engine, 0, prompt, GREEDY, 0, 6)
    engine.release(0)
    engine._unready = {"prefill 16"}
    try:
        assert engine._bucket(11, fresh=True) == 32
        assert engine._bucket(11, fresh=False) == 16       # its own is ready
        before = compile_count()
        larger = run(engine, 0, prompt, GREEDY, 0, 6)
        assert compile_count() == before
    finally:
        engine._unready = set()
        engine.release(0)
    assert larger == own


def test_a_first_token_from_the_decode_sampler_equals_the_first_token_program(engine):
    """A warm restart's first request (slot 0, alone, before the background thread has the
    first-token sampler) draws its first token with the one-slot decode sampler after a
    small reset program (DeviceEngine._activate): the same tokens and logprobs as the
    first-token program, seeded and greedy, and its decode steps carry on the same."""
    prompt = np.random.default_rng(3).integers(0, CFG.vocab_size, 9)
    params = SamplingParams(temperature=0.9, top_k=50, seed=5, logprobs=True,
                            top_logprobs=3, repetition_penalty=1.3)

    def first_and_more(sampling):
        out = engine.insert(0, prompt, 0, sampling, 5).result()
        firsts = (int(out.tokens[0]), float(out.logprobs[0]), out.top_logprobs[0][:3])
        more = [int(engine.step().result().tokens[0]) for _ in range(4)]
        engine.release(0)
        return firsts, more

    for sampling in (params, GREEDY):
        usual = first_and_more(sampling)
        engine._unready = {"first-token sampler"}
        try:
            fast = first_and_more(sampling)
        finally:
            engine._unready = set()
        assert fast[0][0] == usual[0][0] and fast[1] == usual[1]
        np.testing.assert_allclose(fast[0][1], usual[0][1], atol=1e-5)
        np.testing.assert_allclose(fast[0][2], usual[0][2], atol=1e-5)
    assert engine._reset._cache_size() == 1        # the reset program ran (the fast path)


def test_seeded_request_is_batch_invariant(engine):
    params = SamplingParams(temperature=0.9, top_k=50, seed=11)
    alone = run(engine, 0, [1, 2, 3, 4, 5], params, 11, 10)
    engine.release(0)
    # fill other slots with different requests, then run the same one in slot 3
    engine.insert(0, np.array([7, 7, 7]), 0, SamplingParams(temperature=1.5), 1).result()
    engine.insert(1, np.arange(20), 0, SamplingParams(temperature=0.5, top_p=0.8), 2).result()
    engine.insert(2, np.array([9]), 0, GREEDY, 3).result()
    crowded = run(engine, 3, [1, 2, 3, 4, 5], params, 11, 10)
    for slot in range(4):
        engine.release(slot)
    assert alone == crowded
    other_seed = run(engine, 0, [1, 2, 3, 4, 5], params, 12, 10)
    engine.release(0)
    assert other_seed != alone


def test_copy_prefix_then_insert_equals_full_prefill(engine):
    prompt = list(np.random.default_rng(1).integers(0, CFG.vocab_size, 12))
    ref = run(engine, 0, prompt, GREEDY, 0, 5)
    engine.release(0)
    # slot 0 still holds the prompt's KV: copy it to slot 2 and run only the last token
    engine.copy_prefix(0, 2, len(prompt) - 1)
    out = engine.insert(2, np.asarray(prompt), len(prompt) - 1, GREEDY, 0).result()
    got = [int(out.tokens[0])] + [int(engine.step().result().tokens[2]) for _ in range(4)]
    engine.release(2)
    assert got == ref


def test_no_compilation_after_warmup(engine):
    before = compile_count()
    rng = np.random.default_rng(2)
    for n in (1, 3, 8, 9, 15, 16, 17, 31, 32):
        run(engine, 0, rng.integers(0, CFG.vocab_size, n), SamplingParams(temperature=0.7,
                                                                          min_p=0.1), n, 3)
        engine.release(0)
    assert compile_count() == before


def test_bad_chunks_are_rejected(engine):
    with pytest.raises(ValueError, match="largest prefill bucket"):
        engine.prefill_chunk(0, np.zeros(33, np.int32), 0)
    with pytest.raises(ValueError, match="exceeds max_len"):
        engine.prefill_chunk(0, np.zeros(10, np.int32), 60)
    with pytest.raises(ValueError, match="max_len"):
        DeviceEngine(CFG, PARAMS, max_slots=1, max_len=CFG.max_position_embeddings + 1)


def test_lean_and_full_sampler_programs_agree(engine):
    """Rows that use only the common stages get bitwise the same tokens and logprobs from
    the lean sampler programs (no live row needs more) and from the full ones (a row beside
    them needs entropy and typical-p); the full warm-up compiled both."""
    before = compile_count()
    lean = [GREEDY, SamplingParams(temperature=0.8, top_p=0.9, seed=5),
            SamplingParams(temperature=1.2, top_k=30, min_p=0.05, seed=6,
                           logprobs_mode="processed")]

    def go(beside):
        firsts = [engine.insert(slot, np.arange(3 + slot) + 1, 0, p, p.seed or 0).result()
                  for slot, p in enumerate(lean)]
        if beside is not None:
            engine.insert(3, np.array([4, 5]), 0, beside, 0).result()
        assert bool(engine._full_slots) == (beside is not None)
        steps = [engine.step().result() for _ in range(4)]
        for slot in range(4):
            engine.release(slot)
        return [(o.tokens[r], o.logprobs[r], o.ranks[r], o.top_ids[r], o.top_logprobs[r])
                for outs, r in ((firsts, 0), (steps, slice(0, 3))) for o in outs]

    alone = go(None)
    beside = go(SamplingParams(temperature=0.9, typical_p=0.8, return_entropy=True, seed=1))
    for x, y in zip(alone, beside):
        assert all(np.asarray(a).tobytes() == np.asarray(b).tobytes() for a, b in zip(x, y))
    assert compile_count() == before


def test_penalties_and_bias_on_a_step_narrower_than_the_slots(engine):
    """A decode step over the first rows of the slots hands the sampler the engine's whole
    [slots, V] penalty counts and bias (sampling/state.py `batch_view`): a row with
    penalties, a logit bias and allowed ids gets the same tokens in slot 0 alone (1-row
    steps of 4 slots) as in slot 3 of full steps, its counts are its own tokens, and the
    counts of the slots the narrow steps left out are untouched."""
    allowed = list(range(10, 60))
    params = SamplingParams(temperature=0.0, repetition_penalty=1.5, frequency_penalty=1.0,
                            presence_penalty=0.5, logit_bias={12: 5.0},
                            allowed_token_ids=allowed)
    prompt = [11, 12, 13, 12]
    sampler = lambda: jax.tree.map(np.asarray, engine.state["sampler"])
    engine.insert(1, np.array([30, 31, 30]), 0, GREEDY, 0).result()   # counts in slot 1
    engine.release(1)
    before = sampler()
    alone = run(engine, 0, prompt, params, 0, 8)
    after = sampler()
    engine.release(0)
    assert all(t in allowed for t in alone)
    np.testing.assert_array_equal(after.out_counts[0],
                                  np.bincount(alone, minlength=CFG.vocab_size))
    np.testing.assert_array_equal(after.prompt_counts[0],
                                  np.bincount(prompt, minlength=CFG.vocab_size))
    np.testing.assert_array_equal(after.out_counts[1:], before.out_counts[1:])
    np.testing.assert_array_equal(after.prompt_counts[1:], before.prompt_counts[1:])
    plain = run(engine, 0, prompt, SamplingParams(temperature=0.0,
                                                  allowed_token_ids=allowed), 0, 8)
    engine.release(0)
    assert plain != alone                      # the penalties and the bias did something
    for slot in range(3):
        engine.insert(slot, np.array([5 + slot, 6]), 0, GREEDY, 0).result()
    crowded = run(engine, 3, prompt, params, 0, 8)
    for slot in range(4):
        engine.release(slot)
    assert crowded == alone
