"""Orbax round trip, and a simulated 8-device CPU mesh giving the same numbers as one device.

The mesh test runs in a subprocess: the device count is fixed when JAX starts
(XLA_FLAGS=--xla_force_host_platform_device_count=8).
"""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from checkpoints.orbax_io import load_checkpoint, save_checkpoint
from model.config import named_config
from model.decoder import init_params
from model.sharding import make_mesh, parse_mesh_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_orbax_round_trip_is_bit_exact_and_copies_tokenizer_files(tmp_path):
    cfg = named_config("tiny", dtype="float32")
    params = init_params(cfg, seed=7)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text('{"chat_template": "x"}')
    save_checkpoint(str(tmp_path / "ck"), cfg, params, tokenizer_dir=str(tok))
    cfg2, params2 = load_checkpoint(str(tmp_path / "ck"))
    assert cfg2 == cfg
    assert jax.tree.structure(params2) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (tmp_path / "ck" / "tokenizer_config.json").read_text() == '{"chat_template": "x"}'
    with pytest.raises(ValueError, match="not a flaxserve checkpoint"):
        load_checkpoint(str(tmp_path / "tok"))


def test_mesh_spec_errors():
    assert parse_mesh_spec("data=2,model=4") == {"data": 2, "model": 4}
    with pytest.raises(ValueError, match="mesh spec"):
        parse_mesh_spec("data=2,tensor=4")
    with pytest.raises(ValueError, match="needs 8 devices"):
        make_mesh("data=2,model=4", devices=jax.devices()[:1])


MESH_SCRIPT = textwrap.dedent("""
    import os, sys, tempfile
    sys.path.insert(0, {root!r})
    import jax, jax.numpy as jnp, numpy as np
    assert jax.device_count() == 8, jax.devices()
    from model.config import named_config
    from model.decoder import forward, init_cache, init_params
    from model import sharding
    from checkpoints.orbax_io import save_checkpoint, load_checkpoint
    from sampling.params import SamplingParams
    from serving.engine.device import DeviceEngine

    for kv in (2, 4):   # 2 kv heads on a model axis of 4: replicated, not refused
        cfg = named_config("tiny", dtype="float32").replace(num_kv_heads=kv, num_heads=8,
                                                            head_dim=8)
        params = init_params(cfg, seed=kv)
        ids = np.random.default_rng(kv).integers(0, cfg.vocab_size, (2, 12))
        pos = np.broadcast_to(np.arange(12), ids.shape)
        f = jax.jit(lambda p, c, t, q: forward(cfg, p, c, t, q))
        ref, _ = f(params, init_cache(cfg, 2, 32), ids, pos)
        mesh = sharding.make_mesh("data=2,model=4")
        sp = sharding.shard_params(params, sharding.param_shardings(cfg, mesh))
        cache = sharding.shard_cache(init_cache(cfg, 2, 32),
                                     sharding.cache_shardings(cfg, mesh, 2, 32))
        got, cache = f(sp, cache, ids, pos)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)
        if kv == 4:
            assert len(sp["layer_0"]["attn"]["qkv"].sharding.device_set) == 8
            assert sp["layer_0"]["attn"]["qkv"].sharding.spec[1] == "model"
        if kv == 2:
            continue
        # greedy decode through the engine: same tokens on the mesh as on one device
        def greedy(eng):
            out = eng.insert(1, ids[0], 0, SamplingParams(temperature=0.0), 0).result()
            toks = [int(out.tokens[0])]
            for _ in range(5):
                toks.append(int(eng.step().result().tokens[1]))
            return toks
        one = greedy(DeviceEngine(cfg, params, max_slots=2, max_len=32, prefill_buckets=(16,)))
        many = greedy(DeviceEngine(cfg, params, max_slots=2, max_len=32, prefill_buckets=(16,),
                                   mesh=mesh))
        assert one == many, (one, many)
        # orbax restores straight onto the mesh
        d = tempfile.mkdtemp()
        save_checkpoint(d, cfg, params)
        _, restored = load_checkpoint(d, mesh=mesh)
        leaf = restored["layer_0"]["mlp"]["gate_up"]
        assert len(leaf.sharding.device_set) == 8
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(params["layer_0"]["mlp"]["gate_up"]))
    print("MESH OK")
""")


def test_eight_device_mesh_matches_one_device():
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT.format(root=ROOT)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "MESH OK" in proc.stdout, proc.stderr[-4000:]
