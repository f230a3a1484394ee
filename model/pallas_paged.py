"""Decode attention over the paged KV pool with JAX's own Pallas kernels (GPU / TPU).

The pure-JAX gather path (model/paged_attention.py) gathers a row's blocks into one key
axis; these kernels instead walk the block table inside the kernel, reading each block
once, with an online softmax. They take the pool as [kv_heads, num_blocks, block_size,
head_dim] (ours is [num_blocks, block_size, kv_heads, head_dim], so the wrapper moves the
head axis first: a copy of the pool per call, which a pool stored head-first would
avoid), one query token per row, and `lengths` = keys each row attends (position + 1); no
sliding window. On CPU they run only in Pallas interpret mode, which is how the tests
check them against the gather path; the decoder does not call them yet (see
docs/kv-cache.md).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _head_first(pool: jax.Array) -> jax.Array:
    return jnp.moveaxis(pool, 2, 0)        # [NB, bs, kvh, hd] -> [kvh, NB, bs, hd]


def gpu_decode_attention(q, k_pool, v_pool, tables, lengths, *, interpret: bool = False,
                         pages_per_compute_block: int = 8):
    """q [B, kv_heads, q_per_kv, head_dim] -> [B, kv_heads, q_per_kv, head_dim], attending
    keys [0, lengths[b]) of row b's blocks (tables [B, max_blocks])."""
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    b, kvh, g, hd = q.shape
    cols = tables.shape[1]
    per = min(pages_per_compute_block, cols)
    pad = -cols % per
    tables = jnp.pad(tables, ((0, 0), (0, pad)))            # null blocks, never attended
    q2 = (q.astype(jnp.float32) / math.sqrt(hd)).astype(q.dtype).reshape(b, kvh * g, hd)
    out = paged_attention(q2, _head_first(k_pool), _head_first(v_pool), tables,
                          lengths.astype(jnp.int32), block_h=16,
                          pages_per_compute_block=per, k_splits=(cols + pad) // per,
                          interpret=interpret)
    return out.reshape(b, kvh, g, hd)


def tpu_decode_attention(q, k_pool, v_pool, tables, lengths, *, pages_per_compute_block=1):
    """The same through the TPU kernel (jax.experimental.pallas.ops.tpu.paged_attention)."""
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

    b, kvh, g, hd = q.shape
    q2 = (q.astype(jnp.float32) / math.sqrt(hd)).astype(q.dtype).reshape(b, kvh * g, hd)
    out = paged_attention(q2, _head_first(k_pool), _head_first(v_pool),
                          lengths.astype(jnp.int32), tables,
                          pages_per_compute_block=pages_per_compute_block)
    return out.reshape(b, kvh, g, hd)


def gather_decode_attention(q, k_pool, v_pool, tables, lengths):
    """The reference: the gather path's attention for one query token per row."""
    from model.paged_attention import gather

    hd = q.shape[-1]
    keys, values = gather(k_pool, tables), gather(v_pool, tables)      # [B, S, kvh, hd]
    scores = jnp.einsum("bkgh,bskh->bkgs", q, keys,
                        preferred_element_type=jnp.float32) / math.sqrt(hd)
    mask = jnp.arange(keys.shape[1])[None, :] < lengths[:, None]
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    return jnp.einsum("bkgs,bskh->bkgh", probs, values)
