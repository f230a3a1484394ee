"""The CPU decode-attention kernel (model/cpu_attention.py): it builds here, matches a
float64 numpy softmax over head shapes that take its AVX-512 path and its scalar path,
lengths of one key, odd tails and a full table, and scattered block ids; the decoder's
decode steps call it (dense cache and paged pool) and give the logits of the XLA path;
the AVX2 build (what CPUs without AVX-512 run) passes the same numpy check."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import cpu_attention, native
from model.config import named_config
from model.decoder import forward, init_cache, init_paged_cache, init_params


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if not cpu_attention.available(jnp.float32):
        pytest.fail(f"the attention kernel must build on this machine: "
                    f"{native.unavailable_reason()}")


# (rows, kv_heads, q_per_kv, head_dim, block_size, blocks per row): head_dim 64 and 128 take
# the 16-wide path (outputs in registers), 48 its two-vector loop, 20 the scalar loop
SHAPES = [(3, 2, 1, 64, 16, 4), (2, 1, 8, 128, 8, 5), (4, 3, 3, 48, 4, 9), (2, 2, 5, 20, 16, 3),
          (1, 4, 16, 64, 128, 2), (5, 1, 2, 32, 1, 37)]


def _reference(q, k_pool, v_pool, tables, lengths):
    q, k_pool, v_pool = (np.asarray(a, np.float64) for a in (q, k_pool, v_pool))
    rows, kvh, g, hd = q.shape
    bs = k_pool.shape[1]
    out = np.zeros_like(q)
    for b in range(rows):
        j = np.arange(lengths[b])
        blocks = tables[b][j // bs]
        keys, vals = k_pool[blocks, j % bs], v_pool[blocks, j % bs]       # [len, kvh, hd]
        s = np.einsum("hgd,jhd->hgj", q[b], keys) / np.sqrt(hd)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[b] = np.einsum("hgj,jhd->hgd", p / p.sum(-1, keepdims=True), vals)
    return out


def _check_against_numpy(rows, kvh, g, hd, bs, n):
    rng = np.random.default_rng(rows * 1000 + hd + n)
    num_blocks = rows * n + 3
    k_pool = rng.standard_normal((num_blocks, bs, kvh, hd)).astype(np.float32)
    v_pool = rng.standard_normal((num_blocks, bs, kvh, hd)).astype(np.float32)
    q = (rng.standard_normal((rows, kvh, g, hd)) * 2).astype(np.float32)
    tables = rng.permutation(num_blocks)[: rows * n].reshape(rows, n).astype(np.int32)
    cap = n * bs
    lengths = np.array([[1, cap, 17 % cap + 1, cap - 1 or 1, 33 % cap + 1][b % 5]
                        for b in range(rows)], np.int32)
    got = np.asarray(jax.jit(cpu_attention.decode_attention)(
        q, k_pool, v_pool, tables, lengths))
    want = _reference(q, k_pool, v_pool, tables, lengths)
    assert got.shape == q.shape
    np.testing.assert_allclose(got, want, atol=5e-6, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_numpy(shape):
    _check_against_numpy(*shape)


def test_the_avx2_build_matches_numpy(avx2_check):
    """The kernels compile with -march=native: on an AVX-512 machine the loops other CPUs
    run are built with -mno-avx512f and checked in a fresh process."""
    if native.vector_path() != "avx512-vnni":
        pytest.skip(f"this build already runs the {native.vector_path()} path")
    avx2_check("import test_cpu_attention as t; [t._check_against_numpy(*s) for s in t.SHAPES]")


CFG = named_config("tiny", dtype="float32")
PARAMS = init_params(CFG, seed=7)


def _decode(paged: bool, monkeypatch, kernel: bool):
    """A 3-row greedy prefill then 10 decode steps (rows at different lengths, one row idle
    from step 5); per step the decode logits, and the decode program's HLO."""
    if not kernel:
        monkeypatch.setattr(cpu_attention, "available", lambda dtype: False)
    rng = np.random.default_rng(3)
    rows, max_len, bs = 3, 48, 4
    if paged:
        cache = init_paged_cache(CFG, rows * max_len // bs + 1, bs)
        order = rng.permutation(rows * max_len // bs) + 1                 # 0: the null block
        tables = jnp.asarray(order.reshape(rows, -1), jnp.int32)
    else:
        cache, tables = init_cache(CFG, rows, max_len), None
    run = jax.jit(lambda p, c, t, q, a: forward(CFG, p, c, t, q, block_tables=a))
    lens = np.array([5, 11, 2])
    toks = jnp.asarray(rng.integers(0, CFG.vocab_size, (rows, 11)), jnp.int32)
    pos = np.broadcast_to(np.arange(11), (rows, 11)).copy()
    pos[pos >= lens[:, None]] = max_len                          # past the end: dropped
    logits, cache = run(PARAMS, cache, toks, jnp.asarray(pos), tables)
    tok = jnp.argmax(logits[np.arange(rows), lens - 1], -1)[:, None]
    hlo = run.lower(PARAMS, cache, tok, jnp.asarray(lens[:, None]), tables).as_text()
    out = []
    for step in range(10):
        p = lens + step
        if step >= 5:
            p[2] = max_len                                          # idle: writes nothing
        logits, cache = run(PARAMS, cache, tok, jnp.asarray(p[:, None]), tables)
        out.append(np.asarray(logits[:2, 0]))
        tok = jnp.argmax(logits[:, -1], -1)[:, None]
    return np.stack(out), hlo


@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_decoder_decode_through_the_kernel_equals_the_xla_path(paged, monkeypatch):
    with_kernel, hlo = _decode(paged, monkeypatch, kernel=True)
    assert hlo.count(cpu_attention.TARGET) == CFG.num_layers
    without, hlo_x = _decode(paged, monkeypatch, kernel=False)
    assert cpu_attention.TARGET not in hlo_x
    np.testing.assert_allclose(with_kernel, without, atol=2e-5 * np.abs(without).max())
