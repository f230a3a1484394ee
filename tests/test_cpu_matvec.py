"""The few-row float32 matvec kernel (model/cpu_matvec.py): it builds here, matches float64
numpy in both layouts over row counts 1-4 and shapes with odd tails, several input spans
and several column spans, gives the same bits call after call, and the decoder's decode
programs at up to MAX_ROWS rows call it for every matmul (dense and paged) with the XLA
path's logits, while prefill chunks, bigger batches and `FLAXSERVE_CPU_MATVEC=0` keep
XLA's dot; the AVX2 build passes the same numpy check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import cpu_matvec, native
from model.config import named_config
from model.decoder import forward, init_cache, init_paged_cache, init_params


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if native.library() is None:
        pytest.fail(f"the CPU kernels must build on this machine: {native.unavailable_reason()}")


# (k, n, transposed): 576 x 3072 splits its inputs over 16 spans; 64 x 9000 its columns over
# three spans of <= 4096 (with partial input spans too); odd and tiny sizes hit every tail
SHAPES = [(576, 3072, False), (1536, 576, False), (64, 9000, False), (7, 5, False),
          (3, 130, False), (130, 17, False), (576, 2000, True), (17, 130, True), (3, 9, True),
          (200, 3, True)]


def _check_against_numpy(k, n, transposed):
    rng = np.random.default_rng(k * 7 + n)
    w = rng.standard_normal((n, k) if transposed else (k, n)).astype(np.float32)
    run = jax.jit(lambda x, w: cpu_matvec.matvec(x, w, transposed))
    for m in range(1, cpu_matvec.MAX_ROWS + 1):
        x = rng.standard_normal((m, k)).astype(np.float32)
        want = x.astype(np.float64) @ (w.T if transposed else w).astype(np.float64)
        got = np.asarray(run(x, w))
        assert got.shape == (m, n)
        # float32 sums of k products: a few ulps of the sum of |products| per output
        bound = 1e-6 * (np.abs(x).astype(np.float64) @ np.abs(w.T if transposed else w)) + 1e-30
        assert np.all(np.abs(got - want) <= 8 * bound), (m, np.max(np.abs(got - want) / bound))


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_numpy(shape):
    _check_against_numpy(*shape)


def test_results_do_not_depend_on_thread_timing():
    """Every output is summed in one fixed order: 30 calls give the same bits."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 1536)).astype(np.float32)
    w = rng.standard_normal((1536, 3000)).astype(np.float32)
    run = jax.jit(cpu_matvec.matvec)
    first = np.asarray(run(x, w))
    for _ in range(30):
        assert np.array_equal(np.asarray(run(x, w)), first)


def test_the_avx2_build_matches_numpy(avx2_check):
    if native.vector_path() != "avx512-vnni":
        pytest.skip(f"this build already runs the {native.vector_path()} path")
    avx2_check("import test_cpu_matvec as t; [t._check_against_numpy(*s) for s in t.SHAPES]")


CFG = named_config("tiny", dtype="float32")
PARAMS = init_params(CFG, seed=5)


def _steps(rows: int, paged: bool, monkeypatch, kernel: bool):
    """A prefill then 6 greedy decode steps at `rows` rows; the decode logits, and the
    prefill's and decode's HLO."""
    monkeypatch.setenv("FLAXSERVE_CPU_MATVEC", "1" if kernel else "0")
    rng = np.random.default_rng(rows)
    max_len, bs = 32, 4
    if paged:
        cache = init_paged_cache(CFG, rows * max_len // bs + 1, bs)
        tables = jnp.asarray(rng.permutation(rows * max_len // bs).reshape(rows, -1) + 1,
                             jnp.int32)
    else:
        cache, tables = init_cache(CFG, rows, max_len), None
    run = jax.jit(lambda p, c, t, q, a: forward(CFG, p, c, t, q, block_tables=a))
    toks = jnp.asarray(rng.integers(0, CFG.vocab_size, (rows, 6)), jnp.int32)
    pos = jnp.asarray(np.broadcast_to(np.arange(6), (rows, 6)))
    prefill_hlo = run.lower(PARAMS, cache, toks, pos, tables).as_text()
    logits, cache = run(PARAMS, cache, toks, pos, tables)
    tok = jnp.argmax(logits[:, -1], -1)[:, None]
    decode_hlo = run.lower(PARAMS, cache, tok, jnp.full((rows, 1), 6), tables).as_text()
    out = []
    for step in range(6):
        logits, cache = run(PARAMS, cache, tok, jnp.full((rows, 1), 6 + step), tables)
        out.append(np.asarray(logits[:, 0]))
        tok = jnp.argmax(logits[:, -1], -1)[:, None]
    return np.stack(out), prefill_hlo, decode_hlo


def _calls(hlo: str) -> int:
    return hlo.count(cpu_matvec.TARGET_KN) + hlo.count(cpu_matvec.TARGET_NK)


@pytest.mark.parametrize("rows,paged", [(1, False), (3, True), (4, False)],
                         ids=["1-dense", "3-paged", "4-dense"])
def test_decoder_decode_through_the_kernel_equals_the_xla_path(rows, paged, monkeypatch):
    got, prefill_hlo, decode_hlo = _steps(rows, paged, monkeypatch, kernel=True)
    # qkv, o, gate_up and down in every layer, and the LM head (tied: the NK layout)
    assert _calls(decode_hlo) == 4 * CFG.num_layers + 1
    assert decode_hlo.count(cpu_matvec.TARGET_NK) == (1 if CFG.tie_word_embeddings else 0)
    assert _calls(prefill_hlo) == 0          # 6 tokens a row: more rows than MAX_ROWS
    want, _, xla_hlo = _steps(rows, paged, monkeypatch, kernel=False)
    assert _calls(xla_hlo) == 0
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)


def test_more_rows_than_max_rows_keep_xlas_dot(monkeypatch):
    _, _, decode_hlo = _steps(cpu_matvec.MAX_ROWS + 1, False, monkeypatch, kernel=True)
    assert _calls(decode_hlo) == 0
