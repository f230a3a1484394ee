"""The Pallas paged-attention kernel wired into the decoder and DeviceEngine.

No GPU or TPU here: the kernel runs in Pallas interpret mode on CPU (`interpret=True`),
which is the GPU kernel (model/pallas_paged.py). Against the gather path on the same
weights: logits within 1e-5 and the same greedy tokens, over prompts that cross block
boundaries, a length that is not a multiple of the block size, and rows of different
lengths in one batch. "auto" on CPU is the gather path; the flags reach the engine.
Tiny sizes: interpret mode runs the kernel's grid in Python.
"""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import paged_attention as paged
from model.config import named_config
from model.decoder import forward, init_paged_cache, init_params
from model.pallas_paged import resolve_attention
from sampling.params import SamplingParams
from serving.engine.device import DeviceEngine

CFG = named_config("tiny", dtype="float32")          # 2 layers, 2 KV heads, head_dim 16
PARAMS = init_params(CFG, seed=3)
BLOCK, NUM_BLOCKS, MAX_LEN = 4, 24, 32
# jitted: one compile per shape beats the eager forward's op-by-op dispatch
FORWARD = jax.jit(forward, static_argnums=(0,),
                  static_argnames=("attend_len", "paged_kernel", "interpret"))


def test_head_first_pool_writes_and_gathers_as_the_token_major_one():
    r = np.random.default_rng(0)
    tables = jnp.asarray([[3, 1, 7, 0], [2, 5, 0, 0]], jnp.int32)
    positions = jnp.asarray([[0, 1, 2, 3, 4, 5, 16], [0, 1, 2, 3, 4, 99, -1]], jnp.int32)
    new = jnp.asarray(r.normal(size=(2, 7, 2, 16)), jnp.float32)

    @functools.partial(jax.jit, static_argnums=0)       # one program per layout
    def roundtrip(hf):
        pool = paged.init_pool(1, 9, BLOCK, 2, 16, jnp.float32, hf)[0][0]
        pool = paged.write(pool, tables, positions, new, hf)
        pool = paged.copy_block(pool, 1, 8, hf)
        assert paged.block_size_of(pool, hf) == BLOCK
        return paged.gather(pool, tables, 3, hf), paged.gather(pool, jnp.asarray([[8]]), None, hf)

    out = {hf: tuple(map(np.asarray, roundtrip(hf))) for hf in (False, True)}
    np.testing.assert_array_equal(out[True][0], out[False][0])
    np.testing.assert_array_equal(out[True][1], out[False][1])
    assert np.abs(out[True][0]).sum() > 0


def test_decoder_pallas_decode_matches_gather():
    """Three rows of 5, 8 and 13 prompt tokens (block 4): prefill (gather in both), then
    decode steps through the kernel; every step's logits within 1e-5 of the gather path."""
    r = np.random.default_rng(1)
    lens = np.array([5, 8, 13])
    tables = jnp.asarray(r.permutation(np.arange(1, NUM_BLOCKS))[:3 * 6].reshape(3, 6),
                         jnp.int32)
    tokens = r.integers(0, CFG.vocab_size, size=(3, 16))
    void = paged.void_position(tables, BLOCK)
    pre = np.where(np.arange(16)[None] < lens[:, None], np.arange(16)[None], void)

    def run(kernel):
        cache = init_paged_cache(CFG, NUM_BLOCKS, BLOCK, head_first=kernel is not None)
        logits, cache = FORWARD(CFG, PARAMS, cache, jnp.asarray(tokens), jnp.asarray(pre),
                                logits_index=jnp.asarray(lens - 1), attend_len=16,
                                block_tables=tables, paged_kernel=kernel, interpret=True)
        steps, last, pos = [logits], jnp.argmax(logits, -1), lens.copy()
        for _ in range(3):       # row 0 goes 5 -> 8, row 2 crosses into its 4th block
            logits, cache = FORWARD(CFG, PARAMS, cache, last[:, None].astype(jnp.int32),
                                    jnp.asarray(pos[:, None], jnp.int32), attend_len=24,
                                    block_tables=tables, paged_kernel=kernel, interpret=True)
            logits = logits[:, 0]
            steps.append(logits)
            last, pos = jnp.argmax(logits, -1), pos + 1
        return np.stack([np.asarray(x) for x in steps])

    want, got = run(None), run("gpu")
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_tpu_kernel_is_the_gather_path_on_bfloat16_kv():
    """The TPU kernel (its interpreter) over head-first float32 pools equals the gather path
    on the K/V rounded to bfloat16, which it loads them as (hence auto skips it on float32)."""
    from jax.experimental.pallas import tpu as pltpu

    from model.pallas_paged import decode_attention, gather_decode_attention
    r = np.random.default_rng(2)
    k, v = (jnp.asarray(r.normal(size=(2, 9, BLOCK, 16)), jnp.float32) for _ in range(2))
    q = jnp.asarray(r.normal(size=(2, 2, 2, 16)), jnp.float32)
    tables = jnp.asarray([[3, 1, 7], [2, 5, 8]], jnp.int32)
    lengths = jnp.asarray([1, 10], jnp.int32)
    with pltpu.force_tpu_interpret_mode():
        got = np.asarray(decode_attention(q, k, v, tables, lengths, kernel="tpu"))
    kb, vb = (x.astype(jnp.bfloat16).astype(jnp.float32) for x in (k, v))
    want = np.asarray(gather_decode_attention(q, kb, vb, tables, lengths, head_first=True))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(got - np.asarray(gather_decode_attention(q, k, v, tables, lengths,
                                                           head_first=True))).max() > 1e-4


def test_decoder_refuses_a_pool_of_the_other_layout():
    cache = init_paged_cache(CFG, NUM_BLOCKS, BLOCK)            # token-major
    tables = jnp.ones((1, 2), jnp.int32)
    with pytest.raises(ValueError, match="head-first"):
        forward(CFG, PARAMS, cache, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32),
                block_tables=tables, paged_kernel="gpu", interpret=True)


def test_engine_pallas_gives_the_gather_tokens_and_logprobs():
    """DeviceEngine(attention="pallas"): two slots with 5- and 7-token prompts (block 4),
    greedy, 4 decode steps in one batch (row 1 crosses into its third block): each step's
    tokens are the argmax of the gather path's logits and their logprobs within 1e-5
    (the reference: the decoder over a token-major pool, fed the engine's tokens)."""
    engine = DeviceEngine(CFG, PARAMS, max_slots=2, max_len=MAX_LEN, prefill_buckets=(8,),
                          kv_layout="paged", block_size=BLOCK, num_blocks=NUM_BLOCKS,
                          attention="pallas", interpret=True)
    assert (engine.attention, engine.paged_kernel) == ("pallas", "gpu")
    assert engine.state["cache"][0][0].shape == (CFG.num_kv_heads, NUM_BLOCKS, BLOCK,
                                                 CFG.head_dim)
    rows = [[1, 2, 3, 4], [5, 6, 7, 8]]
    for slot, blocks in enumerate(rows):
        engine.set_blocks(slot, blocks)
    prompts = [[11, 12, 13, 14, 15], [40, 41, 42, 43, 44, 45, 46]]
    firsts = [engine.insert(slot, p, 0, SamplingParams(temperature=0.0), 7).result()
              for slot, p in enumerate(prompts)]
    tokens = [[int(f.tokens[0]) for f in firsts]]
    logprobs = [[float(f.logprobs[0]) for f in firsts]]
    for _ in range(4):
        out = engine.step().result()
        tokens.append([int(t) for t in out.tokens[:2]])
        logprobs.append([float(x) for x in out.logprobs[:2]])

    tables = jnp.asarray(rows, jnp.int32)
    cache = init_paged_cache(CFG, NUM_BLOCKS, BLOCK)
    lens = np.array([len(p) for p in prompts])
    pre = np.full((2, 8), paged.void_position(tables, BLOCK), np.int32)
    ids = np.zeros((2, 8), np.int32)
    for i, p in enumerate(prompts):
        pre[i, :len(p)], ids[i, :len(p)] = np.arange(len(p)), p
    logits, cache = FORWARD(CFG, PARAMS, cache, jnp.asarray(ids), jnp.asarray(pre),
                            logits_index=jnp.asarray(lens - 1), attend_len=8,
                            block_tables=tables)
    for step, (toks, lps) in enumerate(zip(tokens, logprobs)):
        ref = np.asarray(jax.nn.log_softmax(logits, -1))
        assert toks == ref.argmax(-1).tolist(), step
        np.testing.assert_allclose(lps, ref[[0, 1], toks], atol=1e-5)
        logits, cache = FORWARD(CFG, PARAMS, cache, jnp.asarray(toks, jnp.int32)[:, None],
                                jnp.asarray(lens + step, jnp.int32)[:, None], attend_len=16,
                                block_tables=tables)
        logits = logits[:, 0]


def test_auto_is_gather_on_cpu_and_pallas_needs_a_device():
    assert resolve_attention("auto", "cpu") is None
    assert resolve_attention("auto", "gpu") == "gpu"
    assert resolve_attention("auto", "tpu") == "tpu"
    assert resolve_attention("auto", "gpu", devices=8) is None
    assert resolve_attention("auto", "gpu", block_size=8) is None     # Triton tiles >= 16
    assert resolve_attention("auto", "tpu", head_dim=64) is None      # Mosaic lanes of 128
    assert resolve_attention("auto", "tpu", dtype="float32") is None  # rounds K/V to bf16
    assert resolve_attention("auto", "gpu", dtype="float32") is None  # TF32 matmuls
    assert resolve_attention("pallas", "tpu", dtype="float32") == "tpu"
    with pytest.raises(ValueError, match="block_size >= 16"):
        resolve_attention("pallas", "gpu", block_size=8)
    assert resolve_attention("pallas", "cpu", interpret=True) == "gpu"
    with pytest.raises(ValueError, match="needs a GPU or TPU"):
        resolve_attention("pallas", "cpu")
    with pytest.raises(ValueError, match="one device"):
        resolve_attention("pallas", "gpu", devices=2)
    with pytest.raises(ValueError, match="paged_attention must be one of"):
        resolve_attention("flash", "gpu")
    engine = DeviceEngine(CFG, PARAMS, max_slots=1, max_len=MAX_LEN, kv_layout="paged",
                          block_size=BLOCK, num_blocks=4)
    assert (engine.attention, engine.paged_kernel) == ("gather", None)
    with pytest.raises(ValueError, match="needs a GPU or TPU"):
        DeviceEngine(CFG, PARAMS, max_slots=1, max_len=MAX_LEN, kv_layout="paged",
                     block_size=BLOCK, num_blocks=4, attention="pallas")


def test_the_flag_reaches_the_engine():
    from serving.cli import build_parser
    from serving.engine.main import kv_engine_args
    from serving.serve import engine_command

    args = build_parser().parse_args(["engine", "--paged-attention", "pallas",
                                      "--block-size", "4"])
    kv = kv_engine_args(args, CFG, 1, MAX_LEN)
    assert kv["attention"] == "pallas" and kv["kv_layout"] == "paged"
    engine = DeviceEngine(CFG, PARAMS, max_slots=1, max_len=MAX_LEN, interpret=True, **kv)
    assert engine.attention == "pallas"
    default = kv_engine_args(build_parser().parse_args(["engine"]), CFG, 1, MAX_LEN)
    assert default["attention"] == "auto"
    with pytest.raises(ValueError, match="--paged-attention"):
        kv_engine_args(build_parser().parse_args(
            ["engine", "--kv-layout", "dense", "--paged-attention", "gather"]), CFG, 1, MAX_LEN)
    serve = build_parser().parse_args(["serve", "--paged-attention", "gather"])
    cmd = engine_command(serve)
    assert cmd[cmd.index("--paged-attention") + 1] == "gather"
    assert "--paged-attention" not in engine_command(build_parser().parse_args(["serve"]))
    assert isinstance(args, argparse.Namespace)
