"""One-query (decode) attention on CPU read straight from the KV cache
(model/cpu_kernels/paged_attention.cc, built by model/native.py).

XLA:CPU's decode attention first gathers each row's blocks into a contiguous copy, masks a
second copy, then runs both products kv_heads times over (`one_query_attention`): at 32
rows that is a third of a SmolLM2 step. The kernel reads each key and value once, where it
lies in the pool, through the row's block table, for keys [0, length) of each row; a dense
cache is the same pool with one block per slot. Float32 caches only (CPU's dtype); the
caller falls back to the XLA path otherwise, and for sliding-window layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model import native

TARGET = "flaxserve_paged_attention"


def available(cache_dtype) -> bool:
    return jnp.dtype(cache_dtype) == jnp.float32 and native.library() is not None


def decode_attention(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array, tables: jax.Array,
                     lengths: jax.Array) -> jax.Array:
    """q [B, kv_heads, q_per_kv, hd]; pools [num_blocks, block_size, kv_heads, hd] float32;
    tables [B, n] int32 block ids; lengths [B] int32 keys to attend (clamped to [1, n *
    block_size]) -> [B, kv_heads, q_per_kv, hd] float32. """
    native.require()
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q.astype(jnp.float32), k_pool, v_pool, tables.astype(jnp.int32),
                lengths.astype(jnp.int32))
