"""The Flax decoder (Llama / Mistral / Qwen2 / Qwen3) over a fixed-shape KV cache.

One forward serves prefill (many tokens of one or a few sequences) and decode (one token
per slot): every token carries its absolute position, its K/V are written into the cache
at (slot, position), and attention reads the slot's cache rows with a causal mask on
positions. Stale entries beyond a sequence's position are masked, never cleared, so a
slot can be reused without touching memory.

Layout choices made for speed (see DESIGN.md, "Rules that make it fast"):
- q, k and v are one fused weight of shape [embed, kv_heads, q_per_kv + 2, head_dim]: one
  matmul per layer, and the kv-head axis can be sharded without splitting a group;
- gate and up are one fused weight [embed, 2, mlp];
- the cache is one array pair per layer (no re-stacking per step), donated by callers;
- a decode step (one token per row) on CPU attends through `one_query_attention`, two
  plain matmuls over the cache's own rows (no per-step copy of the cache).

Every parameter is declared with logical axis names (`nn.with_logical_partitioning`);
`model/sharding.py` maps them to mesh axes.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model import cpu_attention, cpu_matvec
from model import paged_attention as paged
from model.config import ModelConfig
from model.quantize import Int8Weight, int8_linear, int8_rows

# Logical axis names of the KV cache arrays [slots, max_len, kv_heads, head_dim].
CACHE_AXES = ("cache_batch", "cache_seq", "cache_heads", "head_dim")


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies, with the configured scaling (as in HF transformers)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    kind = config.rope_scaling[0]
    if kind == "linear":
        inv_freq = inv_freq / config.rope_scaling[1]
    elif kind == "llama3":
        factor, low, high, old_len = config.rope_scaling[1:]
        low_wavelen = old_len / low
        high_wavelen = old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, head_dim] for the rotate-half RoPE; computed once per forward."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B,T,D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate-half RoPE. x: [B, T, ..., head_dim]; rope: tables from `rope_tables`."""
    extra = x.ndim - 3
    cos, sin = (t.reshape(t.shape[:2] + (1,) * extra + t.shape[-1:]) for t in rope)
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def dot_attention(q, keys, values, mask):
    """Softmax attention. q [B, T, kv_heads, q_per_kv, hd], keys / values [B, S, kv_heads,
    hd], mask [B, T, S] (True: attend) -> [B, T, kv_heads, q_per_kv, hd]."""
    scores = jnp.einsum("btkgh,bskh->bkgts", q, keys,
                        preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, values)


def one_query_attention(q, keys, values, mask):
    """`dot_attention` for one query per row (T = 1): q [B, 1, kv_heads, q_per_kv, hd],
    keys / values [B, S, kv_heads * hd] (the cache's rows, flat), mask [B, S] (True:
    attend) -> [B, 1, kv_heads, q_per_kv, hd].

    XLA:CPU runs `dot_attention`'s batched dots with the kv-head axis first, so in a
    decode step it copies the keys and values into [kv_heads, S, hd] / [kv_heads, hd, S]
    every layer every step: at 1024 cached positions that copy is most of the
    attention's time. Here the query becomes a block-diagonal matrix
    [kv_heads * hd, kv_heads * q_per_kv] (zero where a query head does not read a kv
    head), so both products are plain matmuls over the cache's own rows: kv_heads times
    the useful FLOPs, still far below the cost of reading the cache at few kv heads
    (docs/speed.md, "The batch-1 step, op by op")."""
    b, s, _ = keys.shape
    kvh, g, hd = q.shape[2:]
    # masked entries zeroed: also a fresh buffer for the matmuls (reading the cache in
    # place made XLA copy it whole, to keep its in-place write apart from the reads)
    keys = jnp.where(mask[:, :, None], keys, 0)
    values = jnp.where(mask[:, :, None], values, 0)
    eye = jnp.eye(kvh, dtype=jnp.float32)
    qbd = jnp.einsum("bkgh,kj->bkhjg", q[:, 0].astype(jnp.float32), eye)
    scores = jnp.einsum("bsd,bde->bse", keys, qbd.reshape(b, kvh * hd, kvh * g),
                        preferred_element_type=jnp.float32) / math.sqrt(hd)   # [B, S, K*G]
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=1)
    out = jnp.einsum("bse,bsd->bed", probs.astype(values.dtype), values,
                     preferred_element_type=jnp.float32)               # [B, K*G, K*hd]
    out = jnp.einsum("bkgjh,kj->bkgh", out.reshape(b, kvh, g, kvh, hd), eye)
    return out[:, None].astype(values.dtype)


def cpu_decode_attention(q, k_cache, v_cache, tables, positions, void: int, cap: int):
    """A decode step's attention through the CPU kernel (model/cpu_attention.py): row b
    attends keys [0, position + 1), at most `cap`; rows whose position writes nothing (idle,
    at or past `void`) attend key 0 only, their output unused."""
    pos = positions[:, 0]
    lengths = jnp.minimum(jnp.where((pos >= 0) & (pos < void), pos + 1, 1), cap)
    out = cpu_attention.decode_attention(q[:, 0], k_cache, v_cache, tables, lengths)
    return out[:, None].astype(v_cache.dtype)


def _one_query_path(kv_heads: int) -> bool:
    """Whether one-token attention takes `one_query_attention` (dense cache or the paged
    gather path): on CPU (where it was measured; GPU and TPU keep the batched dots, or the
    Pallas kernels on a paged pool) and for few kv heads (its FLOPs grow with kv_heads)."""
    return kv_heads <= 8 and jax.default_backend() == "cpu"


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (scale.astype(jnp.float32) * xf).astype(x.dtype)


def _param(module: nn.Module, name: str, shape, axes, dtype, init=None):
    if module.has_variable("params", name):     # an int8 weight (rows) is not Flax's shape
        value = module.get_variable("params", name)
        if isinstance(value, Int8Weight):
            return value
    init = init or nn.initializers.normal(stddev=0.02)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _linear(x: jax.Array, w, k: int) -> jax.Array:
    """x [..., k] @ w seen as a [k, N] matrix (its leading axes contract: a free reshape;
    an einsum lets XLA transpose the weight instead of the activation, which copies
    megabytes per layer per step). An int8 weight goes through model/quantize.py."""
    if isinstance(w, Int8Weight):
        return int8_linear(x, w)
    w2 = w.reshape(k, -1)
    if cpu_matvec.applies(x, w2):      # a few rows on CPU: our float32 matvec
        return cpu_matvec.matvec(x.reshape(-1, k), w2).reshape(x.shape[:-1] + w2.shape[1:])
    return x @ w2


class RMSNorm(nn.Module):
    eps: float
    dtype: str
    axis: str = "embed"

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", (x.shape[-1],), (self.axis,), self.dtype, nn.initializers.ones)
        return rms_norm(x, scale, self.eps)


class Attention(nn.Module):
    config: ModelConfig
    layer: int
    paged_kernel: str | None = None    # see Decoder
    interpret: bool = False

    @nn.compact
    def __call__(self, x, positions, rope, k_cache, v_cache, slot_ids, attend_len=None,
                 block_tables=None):
        cfg = self.config
        kvh, g, hd = cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim
        qkv_w = _param(self, "qkv", (cfg.hidden_size, kvh, g + 2, hd),
                       ("embed", "kv_heads", None, "head_dim"), cfg.dtype)
        b, t = x.shape[:2]
        qkv = _linear(x, qkv_w, cfg.hidden_size).reshape(b, t, kvh, g + 2, hd)
        if cfg.qkv_bias:
            qkv = qkv + _param(self, "qkv_bias", (kvh, g + 2, hd), ("kv_heads", None, "head_dim"),
                               cfg.dtype, nn.initializers.zeros)
        q, k, v = qkv[..., :g, :], qkv[..., g, :], qkv[..., g + 1, :]
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, cfg.dtype, "head_dim", name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, cfg.dtype, "head_dim", name="k_norm")(k)
        q = apply_rope(q, rope)
        k = apply_rope(k, rope)

        cpu_kernel = (t == 1 and cfg.layer_window(self.layer) is None
                      and cpu_attention.available(k_cache.dtype))
        if block_tables is None:
            # Attend over the first attend_len positions only (static): a short sequence in
            # a long cache then costs what its length costs, not what max_len costs.
            span = slice(None, attend_len)
            read = lambda c: c[:, span] if slot_ids is None else c[slot_ids, span]
            # Write this call's K/V at (slot, position); out-of-range positions are dropped.
            rows = (jnp.arange(x.shape[0]) if slot_ids is None else slot_ids)[:, None]
            k_cache = k_cache.at[rows, positions].set(k.astype(k_cache.dtype), mode="drop")
            v_cache = v_cache.at[rows, positions].set(v.astype(v_cache.dtype), mode="drop")
            if cpu_kernel:       # the dense cache as a pool of one block per slot
                out = cpu_decode_attention(q, k_cache, v_cache, rows.astype(jnp.int32),
                                           positions, k_cache.shape[1],
                                           attend_len or k_cache.shape[1])
                return self._project(out, b, t), k_cache, v_cache
            keys, values = read(k_cache), read(v_cache)
        else:
            # Paged: the same through each row's block table (model/paged_attention.py).
            tables = block_tables if slot_ids is None else block_tables[slot_ids]
            hf = self.paged_kernel is not None          # the kernels' head-first pool
            if k_cache.shape[0 if hf else 2] != kvh:
                raise ValueError(f"paged pool {k_cache.shape} is not "
                                 f"{'head-first' if hf else 'token-major'} for "
                                 f"paged_kernel={self.paged_kernel!r} "
                                 f"(model/paged_attention.py, init_paged_cache)")
            k_cache = paged.write(k_cache, tables, positions, k, hf)
            v_cache = paged.write(v_cache, tables, positions, v, hf)
            bs = paged.block_size_of(k_cache, hf)
            n = paged.blocks_for(attend_len, bs, tables.shape[1])
            if hf and t == 1 and cfg.layer_window(self.layer) is None:
                # a decode step: the Pallas kernel walks the tables (model/pallas_paged.py);
                # rows that write nothing (idle) attend key 0 only, their output unused
                from model.pallas_paged import decode_attention
                pos = positions[:, 0]
                lengths = jnp.where((pos >= 0) & (pos < paged.void_position(tables, bs)),
                                    pos + 1, 1)
                out = decode_attention(q[:, 0], k_cache, v_cache, tables[:, :n], lengths,
                                       kernel=self.paged_kernel, interpret=self.interpret)
                return self._project(out[:, None].astype(v_cache.dtype), b, t), k_cache, v_cache
            if cpu_kernel and not hf:    # CPU: read the pool in place through the tables
                out = cpu_decode_attention(q, k_cache, v_cache, tables[:, :n], positions,
                                           paged.void_position(tables, bs), n * bs)
                return self._project(out, b, t), k_cache, v_cache
            keys = paged.gather(k_cache, tables, n, hf)
            values = paged.gather(v_cache, tables, n, hf)

        key_pos = jnp.arange(keys.shape[1])
        mask = key_pos[None, None, :] <= positions[:, :, None]  # [B,T,S]
        window = cfg.layer_window(self.layer)
        if window is not None:
            mask &= key_pos[None, None, :] > positions[:, :, None] - window
        if t == 1 and _one_query_path(kvh):              # a decode step
            flat = lambda c: c.reshape(c.shape[:2] + (kvh * hd,))
            out = one_query_attention(q, flat(keys), flat(values), mask[:, 0])
            return self._project(out, b, t), k_cache, v_cache
        return self._project(dot_attention(q, keys, values, mask), b, t), k_cache, v_cache

    def _project(self, out, b, t):
        """[B, T, kv_heads, q_per_kv, head_dim] -> [B, T, hidden] (the o projection)."""
        cfg = self.config
        kvh, g, hd = cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim
        o_w = _param(self, "o", (kvh, g, hd, cfg.hidden_size),
                     ("kv_heads", None, "head_dim", "embed"), cfg.dtype)
        y = _linear(out.reshape(b, t, -1), o_w, kvh * g * hd)
        if cfg.o_bias:
            y = y + _param(self, "o_bias", (cfg.hidden_size,), ("embed",), cfg.dtype,
                           nn.initializers.zeros)
        return y


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate_up = _param(self, "gate_up", (cfg.hidden_size, 2, cfg.intermediate_size),
                         ("embed", None, "mlp"), cfg.dtype)
        down = _param(self, "down", (cfg.intermediate_size, cfg.hidden_size), ("mlp", "embed"),
                      cfg.dtype)
        h = _linear(x, gate_up, cfg.hidden_size).reshape(x.shape[:-1] + (2, -1))
        return _linear(jax.nn.silu(h[..., 0, :]) * h[..., 1, :], down, cfg.intermediate_size)


class DecoderLayer(nn.Module):
    config: ModelConfig
    layer: int
    paged_kernel: str | None = None
    interpret: bool = False

    @nn.compact
    def __call__(self, x, positions, rope, k_cache, v_cache, slot_ids, attend_len=None,
                 block_tables=None):
        cfg = self.config
        h, k_cache, v_cache = Attention(cfg, self.layer, self.paged_kernel, self.interpret,
                                        name="attn")(
            RMSNorm(cfg.rms_norm_eps, cfg.dtype, name="attn_norm")(x), positions, rope,
            k_cache, v_cache, slot_ids, attend_len, block_tables)
        x = x + h
        x = x + MLP(cfg, name="mlp")(RMSNorm(cfg.rms_norm_eps, cfg.dtype, name="mlp_norm")(x))
        return x, k_cache, v_cache


class Decoder(nn.Module):
    """tokens [B, T], positions [B, T], cache: tuple of (k, v) per layer -> (logits, cache).

    slot_ids [B] selects which cache rows the B sequences use (None: row b is slot b).
    logits_index [B] picks one position per sequence to project to the vocabulary
    (prefill needs only the last); None projects every position.
    block_tables [S, max_blocks] int32: the cache is a paged pool per layer
    ([num_blocks, block_size, kv_heads, head_dim], model/paged_attention.py) and row s of
    the table lists the blocks of slot s; None: the dense [slots, max_len] cache.
    Logits are float32.
    steering [B, num_layers, hidden] (optional; model/steering.py): added to sequence b's
    residual stream after layer i at every position (zeros: no change, bitwise).
    paged_kernel (model/pallas_paged.resolve_attention): None, the gather path; "gpu" or
    "tpu", the pool is head-first ([kv_heads, num_blocks, block_size, head_dim]) and decode
    calls (one token per row) attend through that Pallas kernel (in interpret mode with
    `interpret`, for CPU tests); prefill chunks and sliding-window layers still gather.
    """

    config: ModelConfig
    paged_kernel: str | None = None
    interpret: bool = False

    @nn.compact
    def __call__(self, tokens, positions, cache, slot_ids=None, logits_index=None,
                 attend_len=None, block_tables=None, steering=None):
        cfg = self.config
        embed = _param(self, "embed", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                       cfg.dtype)
        x = int8_rows(embed, tokens, cfg.dtype) if isinstance(embed, Int8Weight) else embed[tokens]
        rope = rope_tables(positions, rope_inv_freq(cfg))
        new_cache = []
        for i in range(cfg.num_layers):
            k_cache, v_cache = cache[i]
            x, k_cache, v_cache = DecoderLayer(cfg, i, self.paged_kernel, self.interpret,
                                               name=f"layer_{i}")(
                x, positions, rope, k_cache, v_cache, slot_ids, attend_len, block_tables)
            if steering is not None:
                x = x + steering[:, i, None, :].astype(x.dtype)
            new_cache.append((k_cache, v_cache))
        if logits_index is not None:
            x = jnp.take_along_axis(x, logits_index[:, None, None], axis=1)[:, 0]
        x = RMSNorm(cfg.rms_norm_eps, cfg.dtype, name="final_norm")(x)
        head = embed if cfg.tie_word_embeddings else _param(
            self, "lm_head", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg.dtype)
        if isinstance(head, Int8Weight):
            logits = int8_linear(x, head, jnp.float32)
        elif cpu_matvec.applies(x, head):
            tied = cfg.tie_word_embeddings
            logits = cpu_matvec.matvec(x.reshape(-1, x.shape[-1]), head, transposed=tied)
            logits = logits.reshape(x.shape[:-1] + logits.shape[-1:])
        else:       # the tied embedding is [vocab, embed], a separate head [embed, vocab]
            spec = "...d,vd->...v" if cfg.tie_word_embeddings else "...d,dv->...v"
            logits = jnp.einsum(spec, x, head, preferred_element_type=jnp.float32)
        return logits, tuple(new_cache)


def init_cache(config: ModelConfig, slots: int, max_len: int, dtype=None) -> tuple:
    """A zeroed KV cache: per layer a (k, v) pair of [slots, max_len, kv_heads, head_dim]."""
    shape = (slots, max_len, config.num_kv_heads, config.head_dim)
    dtype = dtype or config.dtype
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                 for _ in range(config.num_layers))


@functools.lru_cache(maxsize=8)
def abstract_params(config: ModelConfig):
    """Shapes and logical axes of the parameters, without allocating them (cached: a
    load asks twice, and each trace of Flax's init costs ~0.15 s of a start)."""
    model = Decoder(config)
    cache = jax.eval_shape(lambda: init_cache(config, 1, 1))
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    init = lambda t, c: model.init(jax.random.key(0), t, t, c)
    return jax.eval_shape(init, tokens, cache)["params"]


def init_params(config: ModelConfig, seed: int = 0):
    """Random parameters (plain arrays, metadata boxes removed)."""
    model = Decoder(config)
    cache = init_cache(config, 1, 1)
    tokens = jnp.zeros((1, 1), jnp.int32)
    # one compiled program: run eagerly, init dispatches (and compiles) ~90 small ops
    params = jax.jit(model.init)(jax.random.key(seed), tokens, tokens, cache)["params"]
    return nn.meta.unbox(params)


def init_paged_cache(config: ModelConfig, num_blocks: int, block_size: int,
                     dtype=None, head_first: bool = False) -> tuple:
    """A zeroed paged KV pool: per layer (k, v) of [num_blocks, block_size, kv_heads, head_dim]
    ([kv_heads, num_blocks, ...] with head_first, for the Pallas kernels)."""
    return paged.init_pool(config.num_layers, num_blocks, block_size, config.num_kv_heads,
                           config.head_dim, dtype or config.dtype, head_first)


def forward(config: ModelConfig, params, cache, tokens, positions, slot_ids=None,
            logits_index=None, attend_len: int | None = None, block_tables=None,
            steering=None, paged_kernel: str | None = None, interpret: bool = False):
    """Pure forward; jit it at the call site (with the cache donated).

    `attend_len` (static) limits attention to cache positions [0, attend_len): every real
    position of this call must be below it. None attends over the whole cache.
    `block_tables` [S, max_blocks] int32: `cache` is a paged pool (see `Decoder`).
    `steering` [B, num_layers, hidden]: per-sequence residual additions (see `Decoder`).
    `paged_kernel`, `interpret`: the paged decode attention (see `Decoder`).
    `params` may hold int8 weights (model/quantize.py): each matmul takes them as they are
    (`_linear`)."""
    return Decoder(config, paged_kernel, interpret).apply(
        {"params": params}, tokens, positions, cache, slot_ids,
                                 logits_index, attend_len, block_tables, steering)
