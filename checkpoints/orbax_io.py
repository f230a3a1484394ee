"""Our own checkpoint format: orbax-checkpoint params plus a small JSON config.

A directory holds `flaxserve.json` ({"format": 1, "config": ModelConfig fields}),
`params/` (an orbax StandardCheckpointer tree, restored straight onto the target mesh's
shardings, so no host copy of the whole model is made), and the tokenizer files copied
from the source model, so the directory is self-contained.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp

from model.config import ModelConfig

FORMAT = 1
CONFIG_FILE = "flaxserve.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json", "chat_template.jinja",
                   "added_tokens.json", "vocab.json", "merges.txt")


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def copy_tokenizer_files(src_dir: str, dst_dir: str) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(dst_dir, name))
            copied.append(name)
    return copied


def save_checkpoint(path: str, config: ModelConfig, params, tokenizer_dir: str | None = None) -> None:
    """Write config, params and tokenizer files to `path` (created; params/ replaced)."""
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    params_dir = os.path.join(path, "params")
    if os.path.exists(params_dir):
        shutil.rmtree(params_dir)
    import orbax.checkpoint as ocp     # not at import: 0.2 s of every engine start
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(params_dir, params)
        ckptr.wait_until_finished()
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump({"format": FORMAT, "config": config.to_dict()}, f, indent=2)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, path)


def read_config(path: str, dtype: str | None = None) -> ModelConfig:
    file = os.path.join(path, CONFIG_FILE)
    try:
        with open(file) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: not a flaxserve checkpoint (no {CONFIG_FILE})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{file}: unsupported format {meta.get('format')!r} (expected {FORMAT})")
    config = ModelConfig.from_dict(meta["config"])
    return config.replace(dtype=dtype) if dtype else config


def load_checkpoint(path: str, mesh=None, dtype: str | None = None):
    """(config, params), params placed on `mesh` (default: the first device)."""
    from model import sharding
    from model.decoder import abstract_params
    import flax.linen as nn

    path = os.path.abspath(path)
    config = read_config(path, dtype)
    stored = read_config(path)
    shapes = nn.meta.unbox(abstract_params(stored))
    if mesh is None:
        mesh = sharding.make_mesh(None)
    shardings = sharding.param_shardings(config, mesh)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
    params_dir = os.path.join(path, "params")
    if not os.path.isdir(params_dir):
        raise ValueError(f"{path}: checkpoint has no params/ directory")
    # one device: a flat copy of small params skips orbax (~0.5 s of a start)
    from checkpoints import params_cache
    one_device = mesh.devices.size == 1
    params = params_cache.load(params_dir, target) if one_device else None
    if params is None:
        import orbax.checkpoint as ocp     # not at import: 0.2 s of every engine start
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(params_dir, target)
        if one_device:
            params_cache.store(params_dir, params)
    if config.dtype != stored.dtype:
        params = jax.tree.map(lambda x: x.astype(jnp.dtype(config.dtype)), params)
    return config, params
