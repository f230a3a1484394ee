"""The paged KV block manager and the scheduler's block bookkeeping, on the host only:
the hash chain, reference counts, LRU eviction only when free blocks run out, and what a
sequence holds through admission, growth, forks and release."""

import numpy as np
import pytest

from serving.engine.block_manager import BlockManager, OutOfBlocks, block_hashes
from serving.engine.paged_kv import PagedKV


def test_hash_chain_names_a_block_by_everything_before_it():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert len(a) == 2                                     # the partial block is unnamed
    b = block_hashes([9, 9, 9, 9, 5, 6, 7, 8], 4)
    assert a[0] != b[0] and a[1] != b[1]                   # same tokens, other prefix
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0], 4)[:2] == a
    # resuming the chain from block 1 with block 0's name gives the same names
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, parent=a[0], start=1) == a[1:]


def test_reference_counts_and_the_null_block():
    m = BlockManager(5, 4)
    assert m.usable == 4 and m.num_free() == 4
    blocks = m.allocate(3)
    assert 0 not in blocks and len(set(blocks)) == 3 and m.in_use() == 3
    m.acquire(blocks[:1])                                  # shared by a second sequence
    m.release(blocks)
    assert m.in_use() == 1 and m.ref[blocks[0]] == 1
    m.release(blocks[:1])
    assert m.in_use() == 0
    with pytest.raises(RuntimeError, match="released more often"):
        m.release(blocks[:1])
    with pytest.raises(OutOfBlocks):
        m.allocate(5)
    with pytest.raises(ValueError, match="at least 2 blocks"):
        BlockManager(1, 4)


def test_cached_blocks_survive_release_and_are_evicted_lru_only_when_needed():
    m = BlockManager(5, 2)
    names = block_hashes([1, 2, 3, 4, 5, 6], 2)
    seq = m.allocate(3)
    for b, h in zip(seq, names):
        m.register(b, h)
    m.release(seq)                       # last block first into the LRU list
    assert m.match(names) == seq and m.in_use() == 0 and m.num_free() == 4
    other = m.allocate(1)                # the never-named block goes first: no eviction
    assert other not in seq and m.evictions == 0 and m.match(names) == seq
    evicted = m.allocate(1)              # now the least recently used: the tail block
    assert evicted == [seq[2]] and m.evictions == 1 and m.match(names) == seq[:2]
    m.acquire(m.match(names[:1]))        # a hit leaves the LRU list ...
    m.release([seq[0]])                  # ... and returns as the most recently used
    assert m.allocate(1) == [seq[1]]     # so block 1 of the chain goes before block 0
    assert m.match(names) == [seq[0]]


def test_a_name_already_cached_keeps_its_block():
    m = BlockManager(4, 2)
    (h,) = block_hashes([7, 8], 2)
    a, b = m.allocate(2)
    m.register(a, h)
    m.register(b, h)                     # the same KV computed twice: b stays unnamed
    assert m.cached == {h: a} and m.name[b] is None
    m.release([a, b])
    assert m.num_free() == 3 and m.match([h]) == [a]


class FakeEngine:
    """The engine surface PagedKV uses: table rows, block copies, slot positions."""

    def __init__(self, slots=3, num_blocks=12, block_size=4, max_len=32):
        self.max_slots, self.num_blocks, self.block_size, self.max_len = (
            slots, num_blocks, block_size, max_len)
        self.tables = {}
        self.copies = []
        self.pos = [0] * slots

    def set_blocks(self, slot, blocks):
        self.tables[slot] = list(blocks)

    def copy_block(self, src, dst):
        self.copies.append((src, dst))

    def position(self, slot):
        return self.pos[slot]


def test_admission_hits_growth_fork_and_release():
    eng = FakeEngine()
    kv = PagedKV(eng)
    prompt = list(range(1, 11))                                   # 10 tokens: 2 full blocks
    assert kv.admission_blocks(10, 1) == 3 and kv.admission_blocks(10, 2) == 4
    assert kv.can_admit(prompt, 2)
    assert kv.admit([0, 1], prompt) == 0                          # nothing cached yet
    assert len(eng.tables[0]) == 3 and eng.tables[1][:2] == eng.tables[0][:2]
    kv.filled(0, prompt)                                          # the prefill ran
    kv.fork(0, 1, 9)                                              # sample 1 copies block 2
    assert eng.copies == [(eng.tables[0][2], eng.tables[1][2])]
    eng.pos[0] = 12                                               # decoding crossed a block
    assert kv.grow_need(0) == 1
    kv.grow(0, 1)
    assert len(eng.tables[0]) == 4
    # a second request with the same 8-token prefix reuses both full blocks
    assert kv.admit([2], prompt[:8] + [99, 98]) == 8
    assert eng.tables[2][:2] == eng.tables[0][:2]
    assert kv.manager.ref[eng.tables[0][0]] == 3
    for slot in (0, 1, 2):
        kv.free(slot, prompt if slot == 0 else None)
    assert kv.manager.in_use() == 0 and len(kv.manager.cached) == 2
    assert kv.manager.stats()["prefix_cache_hit_tokens"] == 8


def test_a_prompt_fully_cached_still_computes_its_last_token():
    eng = FakeEngine()
    kv = PagedKV(eng)
    prompt = list(range(1, 9))                                    # exactly 2 blocks
    kv.admit([0], prompt)
    kv.filled(0, prompt)
    kv.free(0, prompt)
    assert kv.admit([0], prompt) == 4        # block 2 holds the last token: recomputed


def test_never_fits_names_the_field():
    kv = PagedKV(FakeEngine(num_blocks=6))                       # 5 usable blocks of 4
    assert kv.never_fits(12, 1, 20) is None
    assert "prompt_ids" in kv.never_fits(20, 1, None)
    assert "max_tokens" in kv.never_fits(8, 1, 24)
    assert "max_tokens" in kv.never_fits(5, 2, 16)          # 1 shared + 2 x 3 blocks


def test_preemption_frees_the_newest_and_its_recompute_hits_the_cache():
    """Through the real scheduler on a tiny pool: preempted samples come back (from
    mostly cached blocks) and every block is returned at the end."""
    import time

    from model.config import named_config
    from model.decoder import init_params
    from serving.engine.device import DeviceEngine
    from serving.engine.requests import Usage
    from serving.engine.scheduler import Scheduler

    cfg = named_config("tiny", dtype="float32")
    eng = DeviceEngine(cfg, init_params(cfg, seed=1), max_slots=3, max_len=64,
                       prefill_buckets=(16,), kv_layout="paged", block_size=4, num_blocks=13)
    # no warm-up: each program compiles on first use (the warm-up is not what this tests)
    s = Scheduler(eng).start()
    try:
        rng = np.random.default_rng(1)
        handles = [s.submit(s.make_request(f"p{i}", rng.integers(1, 500, 6).tolist(),
                                           {"temperature": 0.0, "max_tokens": 30,
                                            "ignore_eos": True})) for i in range(3)]
        finals = [list(h)[-1] for h in handles]
        assert all(isinstance(f, Usage) and f.completion_tokens == 30 for f in finals)
        deadline = time.monotonic() + 10
        while s.stats()["slots_in_use"] and time.monotonic() < deadline:
            time.sleep(0.01)
        st = s.stats()
        assert st["kv_preemptions"] > 0 and st["kv_blocks_in_use"] == 0
        assert st["prefix_cache_hit_tokens"] > 0         # the recomputes hit their blocks
    finally:
        s.stop(1)
