"""The scheduler's view of the paged KV cache: which blocks each slot's sequence owns.

Glue between the block manager (serving/engine/block_manager.py: free lists, reference
counts, prefix names) and the device engine's block table: admission takes the prompt's
cached leading blocks (prefix hits) plus fresh ones for the rest of the prompt and the
first decoded token; a running sequence gets one more block whenever its next position
crosses into one it does not have; full blocks are named as soon as their KV is written
(dispatched, in program order) so concurrent requests share them; a finished sequence
names what it filled and gives its blocks back. `n > 1` samples share the prompt's full
blocks and each gets its own copy of the block the prompt ends in.

Device thread only. Preemption policy (who gives blocks back) is the scheduler's.
"""

from __future__ import annotations

from serving.engine.block_manager import BlockManager, block_hashes


def pool_args(config, max_slots: int, max_len: int, block_size: int = 16,
              memory: str | None = None) -> dict:
    """DeviceEngine keyword arguments for a paged pool: `memory` a `--kv-cache-memory`
    budget, or None for room for every slot at max_len (plus one reserve block each),
    capped at 1 GiB (so a tiny test model takes no more than its dense cache would)."""
    from serving.engine.sizing import blocks_for_memory
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"--block-size must be a power of two, got {block_size}")
    if memory is None:
        blocks = max_slots * (-(-max_len // block_size) + 1) + 1
        blocks = min(blocks, blocks_for_memory(config, "1GiB", block_size))
    else:
        blocks = blocks_for_memory(config, memory, block_size)
    return {"kv_layout": "paged", "block_size": block_size, "num_blocks": blocks}


class PagedKV:
    def __init__(self, engine, prefix_cache: bool = True):
        self.engine = engine
        self.block_size = engine.block_size
        self.manager = BlockManager(engine.num_blocks, engine.block_size)
        self.prefix_cache = prefix_cache
        slots = engine.max_slots
        self.blocks: list[list[int]] = [[] for _ in range(slots)]
        self._names: list[list[bytes]] = [[] for _ in range(slots)]   # leading full blocks
        self._named = [0] * slots                                     # registered so far
        # what the first block's name chains from: b"", or a steered request's digest (its
        # KV differs, so its blocks are only shared with the same steering)
        self._salt = [b""] * slots
        self.preemptions = 0

    # -- sizes ---------------------------------------------------------------------------------

    def _cover(self, positions: int) -> int:
        """Blocks holding positions [0, positions)."""
        return -(-positions // self.block_size)

    def admission_blocks(self, prompt_len: int, n: int, hits: int = 0) -> int:
        """Fresh blocks a request takes at admission: sample 0 covers the prompt and its
        first decoded position; each other sample, the block(s) from the prompt's last
        token on (it shares the full blocks before)."""
        bs = self.block_size
        tail = prompt_len // bs - (prompt_len - 1) // bs + 1
        return prompt_len // bs + 1 - hits + (n - 1) * tail

    def never_fits(self, prompt_len: int, n: int, total_len: int | None) -> str | None:
        """Why a request can never run on this pool (even alone), else None."""
        usable = self.manager.usable
        need = self.admission_blocks(prompt_len, n)
        if need > usable:
            return (f"prompt_ids: the prompt ({prompt_len} tokens, n={n}) needs {need} KV "
                    f"blocks of {self.block_size} tokens; the KV pool holds {usable} "
                    f"(raise --kv-cache-memory)")
        if total_len is not None:
            shared = (prompt_len - 1) // self.block_size
            need = shared + n * (self._cover(total_len) - shared)
            if need > usable:
                return (f"max_tokens: {total_len} tokens (prompt + max_tokens, n={n}) need "
                        f"{need} KV blocks of {self.block_size} tokens; the KV pool holds "
                        f"{usable} (lower max_tokens or raise --kv-cache-memory)")
        return None

    # -- admission -----------------------------------------------------------------------------

    def _lookup(self, prompt, salt: bytes = b"") -> tuple[list[bytes], list[int]]:
        names = block_hashes(prompt, self.block_size, salt)
        if not self.prefix_cache:
            return names, []
        # leave at least the last prompt token to compute (it yields the first logits)
        return names, self.manager.match(names)[:(len(prompt) - 1) // self.block_size]

    def can_admit(self, prompt, n: int, reserve: int = 0, salt: bytes = b"") -> bool:
        """Whether the request's blocks are free, leaving `reserve` for running sequences
        (one each, so an admission does not preempt at the very next step)."""
        _, hits = self._lookup(prompt, salt)
        idle_hits = sum(1 for b in hits if self.manager.ref[b] == 0)   # counted as free
        need = self.admission_blocks(len(prompt), n, len(hits))
        return need + idle_hits + reserve <= self.manager.num_free()

    def admit(self, slots: list[int], prompt, salt: bytes = b"") -> int:
        """Blocks for a request's slots (call after `can_admit`); returns cached tokens."""
        names, hits = self._lookup(prompt, salt)
        for slot in slots:
            self._salt[slot] = salt
        m, length = self.manager, len(prompt)
        m.acquire(hits)
        first = hits + m.allocate(length // self.block_size + 1 - len(hits))
        self._set(slots[0], first, names, len(hits))
        shared = first[:(length - 1) // self.block_size]
        for slot in slots[1:]:
            m.acquire(shared)
            tail = m.allocate(self.admission_blocks(length, 2) - self.admission_blocks(length, 1))
            self._set(slot, shared + tail, names[:len(shared)], 0)
        cached = len(hits) * self.block_size
        m.record_lookup(length, cached)
        return cached

    def fork(self, src: int, dst: int, length: int) -> None:
        """dst continues src's first `length` positions: copy the block they end in (the
        full blocks before it are already shared)."""
        i = (length - 1) // self.block_size
        if length > i * self.block_size:       # the block holds positions before `length`
            self.engine.copy_block(self.blocks[src][i], self.blocks[dst][i])

    # -- while running -------------------------------------------------------------------------

    def filled(self, slot: int, tokens) -> None:
        """The slot's KV now holds `tokens` (positions 0..): name its full blocks."""
        if not self.prefix_cache:
            return
        full = min(len(tokens) // self.block_size, len(self.blocks[slot]))
        names = self._names[slot]
        if len(names) < full:
            names += block_hashes(tokens, self.block_size,
                                  names[-1] if names else self._salt[slot],
                                  start=len(names))
        for i in range(self._named[slot], full):
            self.manager.register(self.blocks[slot][i], names[i])
        self._named[slot] = max(self._named[slot], full)

    def grow_need(self, slot: int, ahead: int = 1) -> int:
        """Blocks the slot lacks for the positions its next `ahead` decode steps write."""
        pos = min(self.engine.position(slot) + ahead - 1, self.engine.max_len - 1)
        return pos // self.block_size + 1 - len(self.blocks[slot])

    def grow(self, slot: int, n: int) -> None:
        self.blocks[slot] = self.blocks[slot] + self.manager.allocate(n)
        self.engine.set_blocks(slot, self.blocks[slot])

    def free(self, slot: int, tokens=None) -> None:
        """Give the slot's blocks back, first naming the full ones of `tokens` (its KV)."""
        if tokens is not None:
            self.filled(slot, tokens)
        blocks = self.blocks[slot]
        self._set(slot, [], [], 0)
        self.manager.release(blocks)

    def _set(self, slot: int, blocks: list[int], names: list[bytes], named: int) -> None:
        self.blocks[slot] = blocks
        self._names[slot] = list(names)
        self._named[slot] = named
        self.engine.set_blocks(slot, blocks)

    def stats(self) -> dict:
        return dict(self.manager.stats(), kv_preemptions=self.preemptions,
                    kv_block_usage=self.manager.in_use() / self.manager.usable)
