"""Import a Hugging Face checkpoint directory (Llama, Mistral, Qwen2, Qwen3).

config.json gives the `ModelConfig`; the tensors come from `model.safetensors` or the
shards listed in `model.safetensors.index.json`. Files are memory-mapped (the safetensors
layout is an 8-byte header length, a JSON header, then raw little-endian data), which
reads bf16 too (the safetensors numpy API cannot) and copies nothing until a tensor is
used. Each of our parameters is built from its HF tensors (checkpoints/hf_layout.py) and
placed shard by shard with `jax.make_array_from_callback`, one leaf at a time, so the
host never holds a second copy of the whole model.
"""

from __future__ import annotations

import glob
import json
import os
import struct

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np

from checkpoints.hf_layout import Source, param_sources
from model.config import ModelConfig

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
           "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class SafetensorsFile:
    """Lazy, memory-mapped access to the tensors of one .safetensors file."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                if size > os.path.getsize(path) - 8:
                    raise ValueError("header length exceeds the file")
                header = json.loads(f.read(size))
        except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self.header = header
        self._base = 8 + size
        self._map = None

    def names(self):
        return self.header.keys()

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        start, end = info["data_offsets"]
        raw = self._map[self._base + start:self._base + end]
        return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and bool(
        glob.glob(os.path.join(path, "*.safetensors")))


def _tensor_index(path: str) -> dict[str, SafetensorsFile]:
    """Tensor name -> the file that holds it."""
    index_file = os.path.join(path, "model.safetensors.index.json")
    files: dict[str, SafetensorsFile] = {}
    where: dict[str, SafetensorsFile] = {}
    if os.path.isfile(index_file):
        with open(index_file) as f:
            weight_map = json.load(f).get("weight_map", {})
        for name, file in weight_map.items():
            full = os.path.join(path, file)
            if full not in files:
                if not os.path.isfile(full):
                    raise ValueError(f"{index_file}: lists {file}, which is missing")
                files[full] = SafetensorsFile(full)
            if name not in files[full].header:
                raise ValueError(f"{full}: tensor {name} listed in the index is missing from it")
            where[name] = files[full]
        return where
    paths = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not paths:
        raise ValueError(f"{path}: no *.safetensors files (only safetensors checkpoints are supported)")
    for full in paths:
        sf = SafetensorsFile(full)
        for name in sf.names():
            where[name] = sf
    return where


def load_hf(path: str, mesh=None, dtype: str | None = None, progress=None):
    """(config, params) from a Hugging Face directory, params placed on `mesh`.

    `progress(name)` is called once per parameter leaf (for a progress bar)."""
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such directory")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"{path}: not a Hugging Face checkpoint directory (no config.json)")
    config = ModelConfig.from_hf_file(config_file, dtype=dtype)
    where = _tensor_index(path)
    if config.tie_word_embeddings:
        where.pop("lm_head.weight", None)

    def get(name: str) -> np.ndarray:
        if name not in where:
            files = sorted({os.path.basename(f.path) for f in where.values()})
            raise ValueError(f"{path}: missing tensor {name} (looked in {', '.join(files)})")
        return where[name].get(name)

    return config, place_params(config, get, path, mesh=mesh, progress=progress)


def place_params(config: ModelConfig, get, label: str, mesh=None, progress=None):
    """Our parameter tree, each leaf built from the Hugging Face tensors `get(name)` returns
    (checkpoints/hf_layout.py) in the config's dtype and placed on `mesh`, one at a time.

    Shared by the safetensors and the GGUF importers; `label` (a path) names the source in
    errors."""
    from model import sharding
    from model.decoder import abstract_params

    mesh = mesh if mesh is not None else sharding.make_mesh(None)
    shapes = nn.meta.unbox(abstract_params(config))
    shardings = sharding.param_shardings(config, mesh)
    target_dtype = np.dtype(config.dtype) if config.dtype != "bfloat16" else ml_dtypes.bfloat16

    def build(source: Source, shape, sharding_, leaf_name: str):
        tensors = [get(name) for name in source.names]
        try:
            value = source.build(*[t.astype(np.float32) for t in tensors])
        except ValueError:
            value = None
        if value is None or value.shape != tuple(shape.shape):
            found = ", ".join(f"{n} {list(t.shape)}" for n, t in zip(source.names, tensors))
            raise ValueError(f"{label}: shape mismatch for {found}: does not fit the "
                             f"config's parameter {leaf_name} of shape {list(shape.shape)}")
        value = value.astype(target_dtype)
        if progress is not None:
            progress(leaf_name)
        return jax.make_array_from_callback(value.shape, sharding_, lambda idx: value[idx])

    def walk(src, shp, shd, prefix):
        if isinstance(src, Source):
            return build(src, shp, shd, prefix)
        return {k: walk(src[k], shp[k], shd[k], f"{prefix}/{k}" if prefix else k) for k in src}

    return walk(param_sources(config), shapes, shardings, "")


def count_leaves(config: ModelConfig) -> int:
    return len(jax.tree.leaves(param_sources(config), is_leaf=lambda x: isinstance(x, Source)))
