"""The decoder's own invariants: cache writes, slots, chunking, configs (no HF needed).

Parity with transformers lives in test_hf_import.py; here we check the properties the
engine relies on: a prompt can be prefilled in chunks, into any slot, in a padded bucket,
next to other sequences, and decode through the cache equals the full forward.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import ModelConfig, named_config
from model.decoder import forward, init_cache, init_params

CFG = named_config("tiny", dtype="float32")
PARAMS = init_params(CFG, seed=1)
FWD = jax.jit(lambda p, c, t, q, s, i: forward(CFG, p, c, t, q, s, i), donate_argnums=1)


def full_logits(ids):
    cache = init_cache(CFG, 1, 64)
    pos = jnp.arange(len(ids))[None]
    logits, _ = jax.jit(lambda p, c, t, q: forward(CFG, p, c, t, q))(PARAMS, cache,
                                                                     jnp.asarray(ids)[None], pos)
    return np.asarray(logits[0])


def test_chunked_prefill_into_a_slot_matches_full_forward():
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, 23)
    ref = full_logits(ids)
    cache = init_cache(CFG, 4, 64)
    slot = jnp.array([2])
    outs = []
    for start in range(0, 23, 8):  # chunks of 8, the last one padded to 8
        chunk = ids[start:start + 8]
        n = len(chunk)
        padded = np.zeros(8, np.int32)
        padded[:n] = chunk
        pos = np.where(np.arange(8) < n, start + np.arange(8), 64)  # padding: dropped
        logits, cache = FWD(PARAMS, cache, jnp.asarray(padded)[None], jnp.asarray(pos)[None],
                            slot, None)
        outs.append(np.asarray(logits[0, :n]))
    np.testing.assert_allclose(np.concatenate(outs), ref, atol=1e-4)
    # the other slots were not touched
    for k, v in cache:
        assert float(jnp.abs(k[jnp.array([0, 1, 3])]).max()) == 0.0
        assert float(jnp.abs(v[jnp.array([0, 1, 3])]).max()) == 0.0


def test_decode_batch_with_different_positions_matches_each_alone():
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, CFG.vocab_size, n) for n in (5, 11, 3)]
    cache = init_cache(CFG, 3, 64)
    for slot, p in enumerate(prompts):  # prefill each into its own slot
        _, cache = FWD(PARAMS, cache, jnp.asarray(p)[None], jnp.arange(len(p))[None],
                       jnp.array([slot]), None)
    nxt = np.array([7, 8, 9])
    pos = np.array([len(p) for p in prompts])
    logits, cache = FWD(PARAMS, cache, jnp.asarray(nxt)[:, None], jnp.asarray(pos)[:, None],
                        None, None)
    for slot, p in enumerate(prompts):
        ref = full_logits(np.append(p, nxt[slot]))[-1]
        np.testing.assert_allclose(np.asarray(logits[slot, 0]), ref, atol=1e-4)


def test_stale_cache_entries_are_masked_when_a_slot_is_reused():
    rng = np.random.default_rng(2)
    cache = init_cache(CFG, 1, 64)
    long = rng.integers(0, CFG.vocab_size, 30)
    _, cache = FWD(PARAMS, cache, jnp.asarray(long)[None], jnp.arange(30)[None], None, None)
    short = rng.integers(0, CFG.vocab_size, 6)
    logits, cache = FWD(PARAMS, cache, jnp.asarray(short)[None], jnp.arange(6)[None], None, None)
    np.testing.assert_allclose(np.asarray(logits[0]), full_logits(short), atol=1e-4)


def test_logits_index_selects_one_position_per_row():
    ids = np.random.default_rng(3).integers(0, CFG.vocab_size, 9)
    cache = init_cache(CFG, 1, 64)
    logits, _ = FWD(PARAMS, cache, jnp.asarray(ids)[None], jnp.arange(9)[None], None,
                    jnp.array([4]))
    np.testing.assert_allclose(np.asarray(logits[0]), full_logits(ids)[4], atol=1e-4)


def test_same_bucket_compiles_once():
    f = jax.jit(lambda p, c, t, q: forward(CFG, p, c, t, q), donate_argnums=1)
    cache = init_cache(CFG, 1, 64)
    for n in (3, 9, 16):  # every prompt padded to the 16 bucket
        tokens = np.zeros((1, 16), np.int32)
        pos = np.where(np.arange(16) < n, np.arange(16), 64)[None]
        _, cache = f(PARAMS, cache, tokens, pos)
    assert f._cache_size() == 1


def test_from_hf_errors_name_the_problem():
    base = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16,
                num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(ValueError, match="unsupported architecture.*gpt2"):
        ModelConfig.from_hf(dict(base, model_type="gpt2"))
    missing = dict(base)
    del missing["vocab_size"]
    with pytest.raises(ValueError, match="vocab_size"):
        ModelConfig.from_hf(missing)
    with pytest.raises(ValueError, match="hidden_act"):
        ModelConfig.from_hf(dict(base, hidden_act="gelu"))
    with pytest.raises(ValueError, match="rope type"):
        ModelConfig.from_hf(dict(base, rope_scaling={"rope_type": "yarn", "factor": 2.0}))
    with pytest.raises(ValueError, match="num_heads"):
        ModelConfig.from_hf(dict(base, num_key_value_heads=3, num_attention_heads=4))


def test_config_round_trips_through_dict():
    cfg = named_config("qwen3-100m", dtype="float32")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict(dict(cfg.to_dict(), bogus=1))


def test_one_query_attention_equals_the_batched_dots():
    """The decode step's block-diagonal attention (model/decoder.py) is the batched-dot
    attention: two rows at different positions, a sliding window, GQA (3 kv heads x 2)."""
    from model.decoder import dot_attention, one_query_attention
    rng = np.random.default_rng(0)
    b, s, kvh, g, hd = 2, 40, 3, 2, 16
    q = jnp.asarray(rng.standard_normal((b, 1, kvh, g, hd)), jnp.float32)
    keys = jnp.asarray(rng.standard_normal((b, s, kvh, hd)), jnp.float32)
    values = jnp.asarray(rng.standard_normal((b, s, kvh, hd)), jnp.float32)
    pos = jnp.array([[7], [33]])
    key_pos = jnp.arange(s)[None, None]
    causal = key_pos <= pos[:, :, None]
    for mask in (causal, causal & (key_pos > pos[:, :, None] - 6)):
        want = dot_attention(q, keys, values, mask)
        got = one_query_attention(q, keys.reshape(b, s, -1), values.reshape(b, s, -1),
                                  mask[:, 0])
        assert got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_decode_step_reads_the_cache_in_its_own_layout():
    """No cache-sized buffer in another axis order in a dense decode step's compiled
    program: the batched dots used to copy every layer's keys and values into head-major
    order each step (docs/speed.md, "The batch-1 step, op by op")."""
    import re
    length = 37                                   # a size no other buffer has
    cache = init_cache(CFG, 1, length)
    step = jax.jit(lambda c, t: forward(CFG, PARAMS, c, t, jnp.array([[5]])), donate_argnums=0)
    hlo = step.lower(cache, jnp.zeros((1, 1), jnp.int32)).compile().as_text()
    elems = length * CFG.num_kv_heads * CFG.head_dim
    shapes = {tuple(int(d) for d in m.split(","))
              for m in re.findall(r"= f32\[([0-9,]+)\]", hlo)}
    cache_sized = [sh for sh in shapes if np.prod(sh) == elems]
    assert cache_sized, "the cache should appear in the program"
    kvh, hd = CFG.num_kv_heads, CFG.head_dim
    own = {(1, length, kvh, hd), (1, length, kvh * hd), (length, kvh * hd)}
    assert set(cache_sized) <= own, sorted(set(cache_sized) - own)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_the_waterfalls_last_piece_is_the_models_forward(quantize):
    """serving/bench_waterfall.py rebuilds the layer piece by piece; with every piece in
    (q/k norms included) its program must compute the model's own decode step, over float
    or int8 weights (`--quantize int8`)."""
    import dataclasses

    from model.quantize import quantize_params
    from serving.bench_waterfall import _piece
    config = dataclasses.replace(named_config("tiny"), family="qwen3", qk_norm=True)
    params = init_params(config)
    if quantize:
        params = quantize_params(config, params)
    cache = init_cache(config, 1, 16)
    prompt = jnp.arange(1, 9, dtype=jnp.int32)[None]
    _, cache = forward(config, params, cache, prompt, jnp.arange(8, dtype=jnp.int32)[None])
    token, pos = jnp.array([[7]], jnp.int32), jnp.array([[8]], jnp.int32)
    want, _ = forward(config, params, jax.tree.map(jnp.copy, cache), token, pos,
                      attend_len=16)
    got, _ = _piece(config, 4)(params, jax.tree.map(jnp.copy, cache), token, pos)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want[:, 0]), atol=1e-5)
    fewer, _ = _piece(config, 3)(params, jax.tree.map(jnp.copy, cache), token, pos)
    assert not np.allclose(np.asarray(fewer), np.asarray(want[:, 0]), atol=1e-3)
