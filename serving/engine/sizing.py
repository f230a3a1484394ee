"""How big the engine's compiled shapes and KV pool are: the prompt, attention and batch
buckets (each a power-of-two ladder, so a new length or batch never compiles once warmed
up) and the KV pool's size from a memory spec (`--kv-cache-memory 2GiB` or `0.5`).
Pure arithmetic over the model config, apart from reading the device's memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig


def attend_buckets(max_len: int, smallest: int = 128) -> tuple[int, ...]:
    """Cache prefixes a decode step may attend over: powers of two, then max_len."""
    out, b = [], smallest
    while b < max_len:
        out.append(b)
        b *= 2
    return tuple(out) + (max_len,)


def batch_buckets(max_slots: int) -> tuple[int, ...]:
    """How many leading slots a decode step may run over: 1, 4, 16, ..., then max_slots."""
    out, b = [], 1
    while b < max_slots:
        out.append(b)
        b *= 4
    return tuple(out) + (max_slots,)


def default_buckets(max_len: int, smallest: int = 16, largest: int = 512) -> tuple[int, ...]:
    buckets, b = [], smallest
    while b < min(largest, max_len):
        buckets.append(b)
        b *= 2
    buckets.append(min(largest, max_len))
    return tuple(buckets)


def kv_bytes_per_token(config: ModelConfig, dtype=None) -> int:
    """Bytes of K and V one token takes over all layers."""
    itemsize = np.dtype(jnp.dtype(dtype or config.dtype)).itemsize
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * itemsize


def parse_memory(spec: str) -> tuple[int | None, float | None]:
    """'1GiB' / '512MiB' / '2GB' / '1000000' -> (bytes, None); '0.5' (a fraction of the
    device's memory, in (0, 1]) -> (None, 0.5)."""
    text = str(spec).strip()
    units = {"kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40, "kb": 10 ** 3,
             "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12, "b": 1}
    low = text.lower()
    for unit, scale in units.items():
        if low.endswith(unit):
            number = low[:-len(unit)].strip()
            try:
                value = float(number)
            except ValueError:
                break
            if value <= 0:
                break
            return int(value * scale), None
    else:
        try:
            value = float(low)
        except ValueError:
            value = -1.0
        if 0 < value <= 1:
            return None, value
        if value > 1 and value == int(value):
            return int(value), None
    raise ValueError(f"--kv-cache-memory {spec!r}: expected a size such as 1GiB, 512MiB or "
                     "2GB, or a fraction of device memory in (0, 1] such as 0.5")


def blocks_for_memory(config: ModelConfig, spec: str, block_size: int, dtype=None,
                      device=None) -> int:
    """How many KV blocks (the null block included) fit a `--kv-cache-memory` budget."""
    size, fraction = parse_memory(spec)
    if fraction is not None:
        device = device or jax.devices()[0]
        limit = (device.memory_stats() or {}).get("bytes_limit") if hasattr(
            device, "memory_stats") else None
        if not limit:
            import os
            limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        size = int(limit * fraction)
    blocks = size // (kv_bytes_per_token(config, dtype) * block_size)
    if blocks < 2:
        raise ValueError(f"--kv-cache-memory {spec}: holds {blocks} blocks of {block_size} "
                         "tokens; at least 2 are needed")
    return int(blocks)

