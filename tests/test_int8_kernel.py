"""The CPU int8 matmul kernel (model/int8_kernel.py): it builds here, matches numpy over
row counts and shapes that exercise its row groups, vector tails and chunking, and the
decoder's decode programs over int8 weights call it (no dequantised weight in the program)
while giving the dequantised float model's logits and greedy tokens."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import int8_kernel
from model.config import named_config
from model.decoder import forward, init_cache, init_params
from model.quantize import Int8Weight, dequantize_params, quantize_array, quantize_params


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if not int8_kernel.available():
        pytest.fail(f"the int8 kernel must build on this machine: "
                    f"{int8_kernel.unavailable_reason()}")


SHAPES = [(1, 576, 960), (3, 40, 7), (4, 64, 1000), (6, 33, 130), (32, 128, 48), (1, 5, 3),
          (7, 4100, 37), (2, 2049, 19)]     # the last two: past the int32 flush (2048 inputs)


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_kernel_matches_numpy(m, k, n):
    _check_against_numpy(m, k, n)


def _check_against_numpy(m, k, n):
    rng = np.random.default_rng(m * 1000 + k)
    w = rng.standard_normal((k, n)).astype(np.float32)
    wq = quantize_array(w, (0,))
    x = rng.standard_normal((m, k)).astype(np.float32)
    rows = np.asarray(wq.q, np.float64) * np.asarray(wq.scale)
    want = x.astype(np.float64) @ rows.T
    got = np.asarray(jax.jit(int8_kernel.int8_matmul)(jnp.asarray(x), wq.q, wq.scale))
    assert got.shape == (m, n)
    # the kernel's one approximation: each row of x rounded to int16 steps of max|x| / 32767,
    # so an output is off by at most half a step times the sum of its weights' magnitudes
    bound = np.abs(x).max(1, keepdims=True) / 32767 / 2 * np.abs(rows).sum(1)[None, :]
    assert np.all(np.abs(got - want) <= bound * 1.01 + 1e-6 * np.abs(want) + 1e-30)
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()


def test_the_avx2_path_matches_numpy_on_an_avx512_machine(avx2_check):
    """The vector path is chosen when the kernel compiles (-march=native): on an AVX-512 VNNI
    machine the AVX2 loop (the one other x86 CPUs run) is built with -mno-avx512f and checked
    in a fresh process (one FFI target per process)."""
    if int8_kernel.vector_path() != "avx512-vnni":
        pytest.skip(f"this build already runs the {int8_kernel.vector_path()} path")
    avx2_check("import test_int8_kernel as t; [t._check_against_numpy(*s) for s in t.SHAPES]")


CFG = named_config("tiny", dtype="float32")


def _decode_program(params, cache, tok, pos):
    return jax.jit(lambda p, c, t, q: forward(CFG, p, c, t, q)[0]).lower(
        params, cache, tok, pos).compile().as_text()


def test_decode_through_the_kernel_equals_the_dequantised_model():
    params = quantize_params(CFG, init_params(CFG, seed=3))
    head = params["embed"] if CFG.tie_word_embeddings else params["lm_head"]
    assert isinstance(head, Int8Weight)
    deq = dequantize_params(params, "float32")
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 12)), jnp.int32)
    run = jax.jit(lambda p, c, t, q: forward(CFG, p, c, t, q))
    # prefills of 24 and 80 rows, against the float model over the same weights
    for length in (12, 40):
        toks = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, length)), jnp.int32)
        pos = jnp.broadcast_to(jnp.arange(length), (2, length))
        a = np.asarray(run(params, init_cache(CFG, 2, 64), toks, pos)[0])
        b = np.asarray(run(deq, init_cache(CFG, 2, 64), toks, pos)[0])
        np.testing.assert_allclose(a, b, atol=2e-4 * np.abs(b).max())
    # greedy decode, one row at a time through the kernel, against the float model
    outs = []
    for p in (params, deq):
        cache = init_cache(CFG, 2, 64)
        pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
        logits, cache = run(p, cache, prompt, pos)
        tok, seq = jnp.argmax(logits[:, -1], -1)[:, None], []
        for i in range(12, 28):
            logits, cache = run(p, cache, tok, jnp.full((2, 1), i))
            tok = jnp.argmax(logits[:, -1], -1)[:, None]
            seq.append(np.asarray(tok[:, 0]))
        outs.append(np.stack(seq))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_the_decode_program_reads_int8_not_a_dequantised_copy(monkeypatch):
    params = quantize_params(CFG, init_params(CFG, seed=3))
    tok = jnp.zeros((2, 1), jnp.int32)
    hlo = _decode_program(params, init_cache(CFG, 2, 64), tok, tok)
    calls = hlo.count(f'custom_call_target="{int8_kernel.TARGET}"')
    assert calls == 4 * CFG.num_layers + 1, calls        # qkv, o, gate_up, down; the head
    k, n = CFG.hidden_size, CFG.intermediate_size * 2
    assert f"f32[{k},{n}]" not in hlo and f"f32[{n},{k}]" not in hlo
    # where the kernel cannot be built the program dequantises instead, to the same logits
    toks = jnp.asarray([[3, 9, 27, 81], [5, 25, 125, 7]], jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(4), (2, 4))
    run = lambda: np.asarray(jax.jit(lambda p, c, t, q: forward(CFG, p, c, t, q)[0])(
        params, init_cache(CFG, 2, 64), toks, pos))
    with_kernel = run()
    monkeypatch.setattr(int8_kernel, "available", lambda: False)
    assert int8_kernel.TARGET not in _decode_program(params, init_cache(CFG, 2, 64), tok, tok)
    without = run()
    np.testing.assert_allclose(with_kernel, without, atol=2e-4 * np.abs(without).max())


def test_the_engine_over_int8_weights_gives_the_float_engines_tokens():
    """The serving path: a DeviceEngine (paged pool, batched decode over 3 busy slots, the
    kernel) over int8 weights against one over the same weights dequantised."""
    from sampling.params import SamplingParams
    from serving.engine.device import DeviceEngine

    qparams = quantize_params(CFG, init_params(CFG, seed=5))
    greedy = SamplingParams(temperature=0.0)
    prompts = [[5, 17, 99, 3, 250, 8, 41], [7, 7, 7, 1], list(range(20, 33))]
    got = []
    for p in (qparams, dequantize_params(qparams, "float32")):
        eng = DeviceEngine(CFG, p, max_slots=4, max_len=64, prefill_buckets=(8, 16))
        seqs = [[int(eng.insert(s, np.asarray(pr, np.int32), 0, greedy, 0).result().tokens[0])]
                for s, pr in enumerate(prompts)]
        for _ in range(10):
            out = eng.step().result()
            for s, seq in enumerate(seqs):
                seq.append(int(out.tokens[s]))
        got.append(seqs)
    assert got[0] == got[1]
