"""The paged KV cache: a pool of fixed-size blocks per layer and block tables into it.

Instead of one `[slots, max_len]` row per sequence, every layer holds a pool
`[num_blocks, block_size, kv_heads, head_dim]`; a sequence owns a list of blocks (its row
of the block table `[slots, max_blocks_per_seq]` int32), allocated as it grows, so memory
follows the tokens in use, and full blocks can be shared by sequences with the same
prefix (serving/engine/block_manager.py decides who owns what; nothing here knows).

This is the pure-JAX gather path: the reference, and the path on CPU. A write scatters
each token's K/V to `table[pos // block_size] * block_size + pos % block_size` of the
flattened pool; a read gathers a row's first `n` blocks into a contiguous
`[n * block_size]` key axis, where key j is position j, so attention masks exactly as in
the dense cache. Positions at or past `max_blocks_per_seq * block_size` write nothing.
Block 0 is the null block: unused table entries point at it, it is never allocated, and
what it holds is never attended (masked by position).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Logical axis names of a pool [num_blocks, block_size, kv_heads, head_dim].
POOL_AXES = ("cache_blocks", None, "cache_heads", "head_dim")
NULL_BLOCK = 0


def init_pool(num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
              head_dim: int, dtype) -> tuple:
    """A zeroed pool: per layer a (k, v) pair of [num_blocks, block_size, kv_heads, head_dim]."""
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(num_layers))


def void_position(tables: jax.Array, block_size: int) -> int:
    """The first position a table cannot address: writes there (padding, idle rows) drop."""
    return tables.shape[-1] * block_size


def write(pool: jax.Array, tables: jax.Array, positions: jax.Array, new: jax.Array) -> jax.Array:
    """Scatter new [B, T, kv_heads, head_dim] at positions [B, T] of the B rows of tables
    [B, max_blocks]; positions outside [0, max_blocks * block_size) are dropped."""
    num_blocks, bs = pool.shape[:2]
    valid = (positions >= 0) & (positions < void_position(tables, bs))
    p = jnp.where(valid, positions, 0)
    block = jnp.take_along_axis(tables, p // bs, axis=1)
    flat = jnp.where(valid, block * bs + p % bs, num_blocks * bs)
    pool_flat = pool.reshape((num_blocks * bs,) + pool.shape[2:])
    pool_flat = pool_flat.at[flat].set(new.astype(pool.dtype), mode="drop")
    return pool_flat.reshape(pool.shape)


def gather(pool: jax.Array, tables: jax.Array, num_blocks: int | None = None) -> jax.Array:
    """The first `num_blocks` (static; None: all) blocks of each row of tables [B, max_blocks]
    as one key axis: [B, num_blocks * block_size, kv_heads, head_dim]."""
    rows = tables if num_blocks is None else tables[:, :num_blocks]
    out = pool[rows]                                   # [B, n, bs, kvh, hd]
    return out.reshape((rows.shape[0], -1) + pool.shape[2:])


def blocks_for(length: int | None, block_size: int, max_blocks: int) -> int:
    """Blocks covering positions [0, length) (None: every block of a table row)."""
    if length is None:
        return max_blocks
    return min(max_blocks, -(-length // block_size))


def copy_block(pool: jax.Array, src, dst) -> jax.Array:
    """Block dst := block src (a sequence forked mid-block gets its own copy of that block)."""
    return pool.at[dst].set(pool[src])
