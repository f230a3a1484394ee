"""Host-side owner of the paged KV pool: free blocks, reference counts, the prefix cache.

Modelled on vLLM's automatic prefix caching: a *full* block is named by a hash of its
tokens chained with the hash of every block before it, so one name means one exact prefix
and any request with that prefix may read the block (full blocks are never written again,
so no copy-on-write). Blocks are reference-counted; a block whose count drops to zero keeps
its KV and its name (it stays in the cache) and joins an LRU list. Allocation takes plain
free blocks first and evicts the least recently used cached block only when none are left.
Block 0 is the null block (model/paged_attention.py) and is never handed out.

Pure Python on the scheduler's device thread; nothing here touches the device.
"""

from __future__ import annotations

import collections
import hashlib

import numpy as np


def block_hashes(tokens, block_size: int, parent: bytes = b"", start: int = 0) -> list[bytes]:
    """Chained names of the full blocks of `tokens` from block `start` on; `parent` is the
    name of block start-1 (b"" for the first block)."""
    tokens = np.asarray(tokens, np.int32)
    out, h = [], parent
    for i in range(start, len(tokens) // block_size):
        chunk = tokens[i * block_size:(i + 1) * block_size].tobytes()
        h = hashlib.blake2b(h + chunk, digest_size=16).digest()
        out.append(h)
    return out


class OutOfBlocks(Exception):
    """More blocks were asked for than are free or evictable."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"a paged KV pool needs at least 2 blocks (one is the null "
                             f"block), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref = [0] * num_blocks
        self.name: list[bytes | None] = [None] * num_blocks   # hash of a cached full block
        self.cached: dict[bytes, int] = {}                     # hash -> block
        self._plain = collections.deque(range(1, num_blocks))  # free, holding nothing named
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # ref 0, named
        self.queried_tokens = 0      # prompt tokens looked up
        self.hit_tokens = 0          # of those, found in the cache
        self.evictions = 0

    # -- queries -----------------------------------------------------------------------------

    @property
    def usable(self) -> int:
        """Blocks a sequence can ever get (all but the null block)."""
        return self.num_blocks - 1

    def num_free(self) -> int:
        """Blocks an allocation can take now: plain free plus evictable cached ones."""
        return len(self._plain) + len(self._lru)

    def in_use(self) -> int:
        return self.usable - self.num_free()

    def match(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest run of leading names (takes no reference)."""
        out = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            out.append(block)
        return out

    def record_lookup(self, queried: int, hit: int) -> None:
        self.queried_tokens += queried
        self.hit_tokens += hit

    def stats(self) -> dict:
        return {"kv_blocks_total": self.usable, "kv_blocks_in_use": self.in_use(),
                "kv_blocks_cached": len(self.cached), "kv_block_size": self.block_size,
                "prefix_cache_queried_tokens": self.queried_tokens,
                "prefix_cache_hit_tokens": self.hit_tokens,
                "prefix_cache_hit_rate": (self.hit_tokens / self.queried_tokens
                                          if self.queried_tokens else 0.0),
                "kv_block_evictions": self.evictions}

    # -- changes -----------------------------------------------------------------------------

    def acquire(self, blocks) -> None:
        """One more reference to each (cached) block; an unreferenced one leaves the LRU."""
        for b in blocks:
            if self.ref[b] == 0:
                self._lru.pop(b, None)
            self.ref[b] += 1

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks (reference 1): plain free ones first, then evict LRU cached ones."""
        if n > self.num_free():
            raise OutOfBlocks(f"{n} blocks asked for, {self.num_free()} free")
        out = []
        for _ in range(n):
            if self._plain:
                b = self._plain.popleft()
            else:
                b, _ = self._lru.popitem(last=False)
                del self.cached[self.name[b]]
                self.name[b] = None
                self.evictions += 1
            self.ref[b] = 1
            out.append(b)
        return out

    def register(self, block: int, h: bytes) -> None:
        """Name a block that now holds a full block of KV; a name already cached elsewhere
        keeps its block (this one stays unnamed and is freed plainly)."""
        if self.name[block] is None and h not in self.cached:
            self.cached[h] = block
            self.name[block] = h

    def release(self, blocks) -> None:
        """Drop one reference to each block, last block first (so a sequence's tail is
        evicted before its head, which other prompts are likelier to share)."""
        for b in reversed(list(blocks)):
            if b == 0:
                continue
            if self.ref[b] <= 0:
                raise RuntimeError(f"block {b} released more often than taken")
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if self.name[b] is not None:
                    self._lru[b] = None
                else:
                    self._plain.append(b)
