"""checkpoints/params_cache.py: the flat copy of a small orbax checkpoint that a restart
reads instead of going through orbax. It must give the very arrays orbax gives, placed the
same way, and never be read for a checkpoint that changed since it was written."""

import os
import shutil

import jax
import numpy as np

from checkpoints.loader import DEFAULT_MODEL_DIR, load_model


def test_the_copy_equals_orbax_and_follows_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAXSERVE_PARAMS_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, model)
    _, restored, _ = load_model(str(model))          # through orbax; writes the copy
    copies = list((tmp_path / "cache").glob("*.npz"))
    assert len(copies) == 1
    _, copied, _ = load_model(str(model))            # from the copy
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(copied), strict=True):
        assert a.sharding == b.sharding and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a checkpoint rewritten in place has another key: the stale copy is never read
    some = next(os.path.join(d, f) for d, _, fs in os.walk(model / "params") for f in fs)
    os.utime(some, ns=(0, 0))
    with open(copies[0], "r+b") as f:                # were it read, this would show
        f.write(b"garbage")
    _, again, _ = load_model(str(model))
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
