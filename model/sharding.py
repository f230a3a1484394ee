"""Mesh and sharding rules: logical axis names -> mesh axes -> NamedSharding.

The decoder names every parameter axis logically (vocab, embed, kv_heads, head_dim, mlp;
the cache: cache_batch, cache_seq, cache_heads, head_dim). One table maps those names to
the two mesh axes, `data` (batch / slots) and `model` (tensor parallel). A dimension that
its mesh axis does not divide is replicated rather than refused (e.g. 2 kv heads on a
model axis of 4), so any mesh runs any model; the cost is memory, never correctness.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model.config import ModelConfig
from model.decoder import CACHE_AXES, abstract_params

MESH_AXES = ("data", "model")

LOGICAL_RULES = {
    "vocab": "model",
    "kv_heads": "model",
    "mlp": "model",
    "embed": None,
    "head_dim": None,
    "cache_batch": "data",
    "cache_seq": None,
    "cache_heads": "model",
    "cache_blocks": None,      # the paged pool: any sequence may own any block
}


def parse_mesh_spec(spec: str | None) -> dict[str, int]:
    """"data=2,model=4" -> {"data": 2, "model": 4}; missing axes are 1."""
    sizes = {"data": 1, "model": 1}
    if not spec:
        return sizes
    for part in spec.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in sizes or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"mesh spec {spec!r}: expected 'data=N,model=M' with N, M >= 1")
        sizes[name] = int(value)
    return sizes


def make_mesh(spec: str | None = None, devices=None) -> Mesh:
    sizes = parse_mesh_spec(spec)
    devices = list(devices if devices is not None else jax.devices())
    need = sizes["data"] * sizes["model"]
    if need > len(devices):
        raise ValueError(f"mesh spec {spec!r} needs {need} devices, only {len(devices)} present")
    grid = np.array(devices[:need]).reshape(sizes["data"], sizes["model"])
    return Mesh(grid, MESH_AXES)


def spec_for(shape, names, mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for one array: each logical name mapped, undivisible dims replicated."""
    axes = []
    for dim, name in zip(shape, names):
        axis = LOGICAL_RULES.get(name) if name else None
        if axis is not None and (mesh.shape[axis] == 1 or dim % mesh.shape[axis]):
            axis = None
        axes.append(axis)
    return PartitionSpec(*axes)


def param_shardings(config: ModelConfig, mesh: Mesh):
    """NamedSharding for every parameter, in the tree of `init_params`."""
    boxed = abstract_params(config)
    names = nn.get_partition_spec(boxed)
    shapes = nn.meta.unbox(boxed)
    return jax.tree.map(lambda shape, spec: NamedSharding(mesh, spec_for(shape.shape, spec, mesh)),
                        shapes, names, is_leaf=lambda x: isinstance(x, PartitionSpec))


def cache_shardings(config: ModelConfig, mesh: Mesh, slots: int, max_len: int):
    shape = (slots, max_len, config.num_kv_heads, config.head_dim)
    one = NamedSharding(mesh, spec_for(shape, CACHE_AXES, mesh))
    return tuple((one, one) for _ in range(config.num_layers))


def shard_params(params, shardings):
    return jax.device_put(params, shardings)


def shard_cache(cache, shardings):
    return jax.device_put(cache, shardings)


def pool_shardings(config: ModelConfig, mesh: Mesh, num_blocks: int, block_size: int):
    """The paged KV pool: blocks replicated, KV heads split over the model axis."""
    from model.paged_attention import POOL_AXES
    shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
    one = NamedSharding(mesh, spec_for(shape, POOL_AXES, mesh))
    return tuple((one, one) for _ in range(config.num_layers))
