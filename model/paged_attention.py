"""The paged KV cache: a pool of fixed-size blocks per layer and block tables into it.

Instead of one `[slots, max_len]` row per sequence, every layer holds a pool
`[num_blocks, block_size, kv_heads, head_dim]`; a sequence owns a list of blocks (its row
of the block table `[slots, max_blocks_per_seq]` int32), allocated as it grows, so memory
follows the tokens in use, and full blocks can be shared by sequences with the same
prefix (serving/engine/block_manager.py decides who owns what; nothing here knows).

This is the pure-JAX gather path: the reference, and the path on CPU. A write scatters
each token's K/V to block `table[pos // block_size]`, offset `pos % block_size` of the
4-D pool (never a reshaped view: XLA would copy the pool around it); a read gathers a row's first `n` blocks into a contiguous
`[n * block_size]` key axis, where key j is position j, so attention masks exactly as in
the dense cache. Positions at or past `max_blocks_per_seq * block_size` write nothing.
Block 0 is the null block: unused table entries point at it, it is never allocated, and
what it holds is never attended (masked by position).

Two pool layouts, one per attention implementation: token-major `[num_blocks, block_size,
kv_heads, head_dim]` for the gather path, head-first `[kv_heads, num_blocks, block_size,
head_dim]` when decode runs the Pallas kernels (model/pallas_paged.py), which read the pool
that way: storing it so saves a copy of the whole pool per layer per step. `head_first`
says which; write, gather and copy_block agree on both, and gather always returns the
token-major key axis the decoder's attention expects.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Logical axis names of a pool [num_blocks, block_size, kv_heads, head_dim] (token-major)
# and of a head-first one [kv_heads, num_blocks, block_size, head_dim].
POOL_AXES = ("cache_blocks", None, "cache_heads", "head_dim")
POOL_AXES_HEAD_FIRST = ("cache_heads", "cache_blocks", None, "head_dim")
NULL_BLOCK = 0


def pool_shape(num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
               head_first: bool = False) -> tuple[int, int, int, int]:
    if head_first:
        return (kv_heads, num_blocks, block_size, head_dim)
    return (num_blocks, block_size, kv_heads, head_dim)


def pool_axes(head_first: bool = False) -> tuple:
    return POOL_AXES_HEAD_FIRST if head_first else POOL_AXES


def init_pool(num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
              head_dim: int, dtype, head_first: bool = False) -> tuple:
    """A zeroed pool: per layer a (k, v) pair of `pool_shape(...)`."""
    shape = pool_shape(num_blocks, block_size, kv_heads, head_dim, head_first)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(num_layers))


def block_size_of(pool: jax.Array, head_first: bool = False) -> int:
    return pool.shape[2 if head_first else 1]


def void_position(tables: jax.Array, block_size: int) -> int:
    """The first position a table cannot address: writes there (padding, idle rows) drop."""
    return tables.shape[-1] * block_size


def write(pool: jax.Array, tables: jax.Array, positions: jax.Array, new: jax.Array,
          head_first: bool = False) -> jax.Array:
    """Scatter new [B, T, kv_heads, head_dim] at positions [B, T] of the B rows of tables
    [B, max_blocks]; positions outside [0, max_blocks * block_size) are dropped."""
    bs = block_size_of(pool, head_first)
    num_blocks = pool.shape[1 if head_first else 0]
    valid = (positions >= 0) & (positions < void_position(tables, bs))
    p = jnp.where(valid, positions, 0)
    block = jnp.take_along_axis(tables, p // bs, axis=1)
    # (block, offset) into the 4-D pool itself: no reshape of the pool, so XLA updates it
    # in place (a flattened-pool scatter made XLA:CPU copy the whole pool per layer per
    # step). A dropped write points past the last block.
    block = jnp.where(valid, block, num_blocks)
    offset = p % bs
    new = new.astype(pool.dtype)
    if head_first:   # pool[:, block, offset] is [kvh, B, T, hd]
        return pool.at[:, block, offset].set(jnp.moveaxis(new, 2, 0), mode="drop")
    return pool.at[block, offset].set(new, mode="drop")

def gather(pool: jax.Array, tables: jax.Array, num_blocks: int | None = None,
           head_first: bool = False) -> jax.Array:
    """The first `num_blocks` (static; None: all) blocks of each row of tables [B, max_blocks]
    as one key axis: [B, num_blocks * block_size, kv_heads, head_dim] (either layout)."""
    rows = tables if num_blocks is None else tables[:, :num_blocks]
    # Table entries are block ids in [0, num_blocks) (unused ones: the null block), so the
    # gather skips numpy's negative-index wrap and the clamp: at batch 16 the gather is a
    # sixth of a SmolLM2 decode step on CPU (docs/speed.md, "At concurrency 16 and 32").
    if head_first:
        out = jnp.moveaxis(pool.at[:, rows].get(mode="promise_in_bounds"), 0, 3)
        return out.reshape((rows.shape[0], -1) + (pool.shape[0], pool.shape[3]))
    out = pool.at[rows].get(mode="promise_in_bounds")  # [B, n, bs, kvh, hd]
    return out.reshape((rows.shape[0], -1) + pool.shape[2:])


def blocks_for(length: int | None, block_size: int, max_blocks: int) -> int:
    """Blocks covering positions [0, length) (None: every block of a table row)."""
    if length is None:
        return max_blocks
    return min(max_blocks, -(-length // block_size))


def copy_block(pool: jax.Array, src, dst, head_first: bool = False) -> jax.Array:
    """Block dst := block src (a sequence forked mid-block gets its own copy of that block)."""
    if head_first:
        return pool.at[:, dst].set(pool[:, src])
    return pool.at[dst].set(pool[src])
