"""Decode attention over the paged KV pool with JAX's own Pallas kernels (GPU / TPU).

The pure-JAX gather path (model/paged_attention.py) gathers a row's blocks into one key
axis; these kernels instead walk the block table inside the kernel, reading each block
once, with an online softmax. They read the pool head-first, [kv_heads, num_blocks,
block_size, head_dim], so an engine that selects them stores its pool that way
(`head_first=True` throughout model/paged_attention.py) and no copy is made per call; a
caller holding a token-major pool may pass `head_first=False` and pay that copy. One query
token per row, `lengths` = keys each row attends (position + 1); no sliding window.

Which implementation runs is `resolve_attention`: "gather" everywhere, "pallas" the
platform's kernel (GPU kernel on cuda/rocm, TPU kernel on tpu, one device), "auto" the
kernel where it runs as is and loses no precision (one GPU/TPU, shapes it compiles, a
16-bit model), else gather (so always on CPU). On CPU a kernel runs only in Pallas
interpret mode (tests): the GPU kernel, which its interpreter runs to float32 rounding of
the gather path.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

ATTENTION_CHOICES = ("auto", "gather", "pallas")
KERNELS = {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}


def unfit(kernel: str, block_size: int, head_dim: int) -> str | None:
    """Why the compiled kernel cannot take these shapes (None: it can). Triton wants
    power-of-two tiles of at least 16 (a tile is up to 8 blocks of keys x head_dim);
    Mosaic (TPU) lanes of 128 and sublanes of 8."""
    if kernel == "gpu" and (head_dim < 16 or head_dim & (head_dim - 1) or block_size < 16):
        return (f"the GPU kernel needs head_dim a power of two >= 16 and block_size >= 16, "
                f"got head_dim {head_dim}, block_size {block_size}")
    if kernel == "tpu" and (head_dim % 128 or block_size % 8):
        return (f"the TPU kernel needs head_dim a multiple of 128 and block_size of 8, "
                f"got head_dim {head_dim}, block_size {block_size}")
    return None


def resolve_attention(choice: str, platform: str, interpret: bool = False, devices: int = 1,
                      block_size: int = 16, head_dim: int = 128,
                      dtype: str = "bfloat16") -> str | None:
    """The paged decode kernel to run: None for the gather path, else "gpu" or "tpu".

    `platform` is the devices' (jax.Device.platform: cpu, gpu/cuda/rocm, tpu); `devices`
    how many the engine spans (a mesh); `dtype` the pool's. "auto" takes the kernel only
    where it runs as is (one device, shapes it takes: `unfit`) and loses nothing, so not
    for a float32 model: the TPU kernel rounds the K/V it loads to bfloat16, the GPU one
    multiplies float32 at Triton's default precision (TF32 on NVIDIA). "pallas" that
    cannot run here is a ValueError saying why."""
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"paged_attention must be one of {', '.join(ATTENTION_CHOICES)}, "
                         f"got {choice!r}")
    kernel = KERNELS.get(platform)
    if choice == "gather" or (choice == "auto" and (
            kernel is None or devices > 1 or unfit(kernel, block_size, head_dim)
            or dtype == "float32")):
        return None
    if devices > 1:
        raise ValueError("paged_attention 'pallas' runs on one device only (the kernels "
                         "are not partitioned over a mesh yet); use 'gather' or 'auto' "
                         "with --mesh")
    if kernel is None:
        if not interpret:
            raise ValueError(f"paged_attention 'pallas' needs a GPU or TPU (platform "
                             f"{platform!r}); use 'gather' or 'auto' here")
        return "gpu"         # interpreted on CPU: the GPU kernel (see the docstring)
    why = None if interpret else unfit(kernel, block_size, head_dim)
    if why:
        raise ValueError(f"paged_attention 'pallas': {why}; use 'gather' or 'auto'")
    return kernel


def _head_first(pool: jax.Array) -> jax.Array:
    return jnp.moveaxis(pool, 2, 0)        # [NB, bs, kvh, hd] -> [kvh, NB, bs, hd]


def _scaled(q: jax.Array) -> jax.Array:
    """[B, kvh, g, hd] -> [B, kvh * g, hd] scaled by 1/sqrt(hd) (the kernels do not scale)."""
    b, kvh, g, hd = q.shape
    return (q.astype(jnp.float32) / math.sqrt(hd)).astype(q.dtype).reshape(b, kvh * g, hd)


def gpu_decode_attention(q, k_pool, v_pool, tables, lengths, *, interpret: bool = False,
                         pages_per_compute_block: int = 8, head_first: bool = False):
    """q [B, kv_heads, q_per_kv, head_dim] -> [B, kv_heads, q_per_kv, head_dim], attending
    keys [0, lengths[b]) of row b's blocks (tables [B, max_blocks])."""
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    if not head_first:
        k_pool, v_pool = _head_first(k_pool), _head_first(v_pool)
    cols = tables.shape[1]
    per = min(pages_per_compute_block, 1 << (cols.bit_length() - 1))   # a power of two
    pad = -cols % per
    tables = jnp.pad(tables, ((0, 0), (0, pad)))            # null blocks, never attended
    out = paged_attention(_scaled(q), k_pool, v_pool, tables, lengths.astype(jnp.int32),
                          block_h=16, pages_per_compute_block=per,
                          k_splits=(cols + pad) // per, interpret=interpret)
    return out.reshape(q.shape)


def tpu_decode_attention(q, k_pool, v_pool, tables, lengths, *, pages_per_compute_block=1,
                         head_first: bool = False):
    """The same through the TPU kernel (jax.experimental.pallas.ops.tpu.paged_attention).
    It rounds the K/V pages it loads to bfloat16 (its `_maybe_dequantize`), so over a
    float32 pool it equals the gather path on bfloat16-rounded K/V, not on the pool."""
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

    if not head_first:
        k_pool, v_pool = _head_first(k_pool), _head_first(v_pool)
    cols = tables.shape[1]
    per = min(pages_per_compute_block, cols)
    tables = jnp.pad(tables, ((0, 0), (0, -cols % per)))
    out = paged_attention(_scaled(q), k_pool, v_pool, lengths.astype(jnp.int32), tables,
                          pages_per_compute_block=per)
    return out.reshape(q.shape)


def decode_attention(q, k_pool, v_pool, tables, lengths, *, kernel: str,
                     interpret: bool = False):
    """The decoder's entry: `kernel` from `resolve_attention` ("gpu" or "tpu"), head-first
    pools; up to 8 blocks per compute block (the table is padded with null blocks)."""
    if kernel == "gpu":
        return gpu_decode_attention(q, k_pool, v_pool, tables, lengths, interpret=interpret,
                                    head_first=True)
    if kernel == "tpu":
        return tpu_decode_attention(q, k_pool, v_pool, tables, lengths,
                                    pages_per_compute_block=8, head_first=True)
    raise ValueError(f"unknown paged attention kernel {kernel!r}")


def gather_decode_attention(q, k_pool, v_pool, tables, lengths, head_first: bool = False):
    """The reference: the gather path's attention for one query token per row."""
    from model.paged_attention import gather

    hd = q.shape[-1]
    keys = gather(k_pool, tables, head_first=head_first)            # [B, S, kvh, hd]
    values = gather(v_pool, tables, head_first=head_first)
    scores = jnp.einsum("bkgh,bskh->bkgs", q, keys,
                        preferred_element_type=jnp.float32) / math.sqrt(hd)
    mask = jnp.arange(keys.shape[1])[None, :] < lengths[:, None]
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    return jnp.einsum("bkgs,bskh->bkgh", probs, values)
