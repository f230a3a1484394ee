"""A flat copy of a small orbax checkpoint's params, so that a restart skips orbax.

Importing orbax and restoring through it cost ~0.5 s of every engine start, most of a warm
restart's load for the bundled model (15 MB), while reading the same arrays from one .npz
file takes ~0.03 s. After an orbax restore onto one device, params of at most `MAX_BYTES`
are written once to `~/.cache/flaxserve/params/<key>.npz` (next to the compilation cache,
the same directory variable); the key hashes the checkpoint's path and every file's
name, size and modification time, so a rewritten checkpoint never reads a stale copy.
Sharded restores (a mesh of several devices) always go through orbax.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import jax
import numpy as np

MAX_BYTES = 256 * 2 ** 20
ENV = "FLAXSERVE_PARAMS_CACHE"     # a directory; '' turns the copy off


def cache_dir() -> str:
    if ENV in os.environ:
        return os.environ[ENV]
    return os.path.join(os.path.expanduser("~"), ".cache", "flaxserve", "params")


def _path(params_dir: str) -> str | None:
    root = cache_dir()
    if not root:
        return None
    h = hashlib.sha256(os.path.abspath(params_dir).encode())
    for base, dirs, files in sorted(os.walk(params_dir)):
        dirs.sort()
        for name in sorted(files):
            st = os.stat(os.path.join(base, name))
            h.update(f"{os.path.relpath(os.path.join(base, name), params_dir)}:{st.st_size}:"
                     f"{st.st_mtime_ns}\n".encode())
    return os.path.join(root, h.hexdigest()[:32] + ".npz")


def _keys(tree) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def load(params_dir: str, target):
    """The params of `target`'s tree (ShapeDtypeStructs with shardings), placed, or None
    when there is no matching copy."""
    path = _path(params_dir)
    if path is None or not os.path.isfile(path):
        return None
    leaves, tree = jax.tree.flatten(target)
    try:
        with np.load(path) as data:
            arrays = [data[k] for k in _keys(target)]
    except Exception:  # noqa: BLE001 - a damaged copy is no copy: orbax reads it
        return None
    if any(a.shape != t.shape or a.dtype != t.dtype for a, t in zip(arrays, leaves)):
        return None
    return jax.tree.unflatten(tree, jax.device_put(arrays, [t.sharding for t in leaves]))


def store(params_dir: str, params) -> None:
    """Write the copy `load` reads (small params only; failures are ignored: it is a cache)."""
    leaves = jax.tree.leaves(params)
    if sum(x.nbytes for x in leaves) > MAX_BYTES:
        return
    path = _path(params_dir)
    if path is None:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz.tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **dict(zip(_keys(params), (np.asarray(x) for x in leaves))))
        os.replace(tmp, path)           # whole or not at all, whoever writes it too
    except OSError:
        if os.path.exists(tmp):
            os.unlink(tmp)
