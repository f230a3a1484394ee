"""A paged decode step updates the KV pool in place: its compiled program copies no pool.

The write used to scatter into a flattened view of the pool (reshape -> scatter ->
reshape); with one live row XLA:CPU made that a dynamic-update-slice and copied every
layer's whole pool around it each step, so a step's cost grew with the pool size instead
of with the live sequences (docs/kv-cache.md, "Step cost"). These fail on that code.
Checked on the compiled HLO text of jitted, donating programs of the tiny model; no timing.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import paged_attention as paged
from model.config import named_config
from model.decoder import forward, init_paged_cache, init_params

CFG = named_config("tiny", dtype="float32")
NUM_BLOCKS, BLOCK, MAX_BLOCKS = 37, 4, 8   # 37 blocks: a size no other buffer has
POOL_ELEMS = NUM_BLOCKS * BLOCK * CFG.num_kv_heads * CFG.head_dim
TABLES = jnp.arange(1, 1 + MAX_BLOCKS, dtype=jnp.int32).reshape(1, MAX_BLOCKS)
POSITIONS = jnp.array([[5]], jnp.int32)        # one row, one token (a decode step)


def pool_copies(fn, *args) -> list[str]:
    """Shapes of the pool-sized `copy` ops in fn's compiled program (arg 0 donated)."""
    hlo = jax.jit(fn, donate_argnums=0).lower(*args).compile().as_text()
    return [shape for shape in re.findall(r"= f32\[([0-9,]+)\][^ ]* copy\(", hlo)
            if np.prod([int(d) for d in shape.split(",")]) == POOL_ELEMS]


def test_decode_step_copies_no_pool():
    params = init_params(CFG, seed=0)
    cache = init_paged_cache(CFG, NUM_BLOCKS, BLOCK)

    def step(cache, tokens):
        return forward(CFG, params, cache, tokens, POSITIONS, block_tables=TABLES)

    assert pool_copies(step, cache, jnp.zeros((1, 1), jnp.int32)) == []


@pytest.mark.parametrize("head_first", [False, True])
def test_write_then_gather_copies_no_pool(head_first):
    # what each layer does with its pool: write this step's K/V, read the rows' blocks
    shape = paged.pool_shape(NUM_BLOCKS, BLOCK, CFG.num_kv_heads, CFG.head_dim, head_first)
    new = jnp.ones((1, 1, CFG.num_kv_heads, CFG.head_dim), jnp.float32)

    def layer(pool):
        pool = paged.write(pool, TABLES, POSITIONS, new, head_first)
        return pool, paged.gather(pool, TABLES, 2, head_first).sum()

    assert pool_copies(layer, jnp.zeros(shape, jnp.float32)) == []


@pytest.mark.parametrize("head_first", [False, True])
def test_gather_returns_each_rows_blocks_in_order(head_first):
    # the gather indexes without numpy's wrap and clamp (table entries are block ids):
    # it must still return, for every row, its first n blocks in table order, the null
    # block included, as one token-major key axis
    rng = np.random.default_rng(0)
    tm = rng.standard_normal((NUM_BLOCKS, BLOCK, CFG.num_kv_heads, CFG.head_dim), np.float32)
    pool = jnp.asarray(np.moveaxis(tm, 2, 0) if head_first else tm)
    tables = np.array([[3, 9, 36, 0, 0, 0, 0, 0], [36, 1, 2, 5, 7, 11, 13, 0]], np.int32)
    for n in (3, MAX_BLOCKS):
        got = jax.jit(paged.gather, static_argnums=(2, 3))(pool, jnp.asarray(tables), n,
                                                           head_first)
        want = tm[tables[:, :n]].reshape(2, n * BLOCK, CFG.num_kv_heads, CFG.head_dim)
        np.testing.assert_array_equal(np.asarray(got), want)
