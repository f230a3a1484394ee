"""One entry point for every model reference: a Hugging Face dir, our orbax dir, a GGUF
file, `default`, a known name or a Hub id (checkpoints/resolve.py turns the reference into
a local path, fetching it once if needed).

Returns the config, the params (on the given mesh) and the directory that holds the
tokenizer files, which the servers and the CLI read next. With no dtype asked for, every
checkpoint loads in the platform's dtype (float32 on CPU, bfloat16 on accelerators),
whatever dtype it was stored in.
"""

from __future__ import annotations

import os

from checkpoints import hf, orbax_io

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default")


def resolve(path: str) -> str:
    """The local path a model reference names ('default' -> the bundled model)."""
    from checkpoints.resolve import resolve as resolve_ref
    return resolve_ref(path)


def load_model(path: str, mesh=None, dtype: str | None = None, quantize: str | None = None):
    """(config, params, model_dir) for a model reference (see checkpoints/resolve.py).
    quantize="int8": the matmul weights as int8 with per-channel scales (model/quantize.py)."""
    config, params, model_dir = _load(path, mesh, dtype)
    if quantize:
        if quantize != "int8":
            raise ValueError(f"quantize: expected int8, got {quantize!r}")
        if mesh is not None and mesh.size > 1:
            raise ValueError("quantize: int8 weights are single-device only (no --mesh)")
        from model.quantize import quantize_params
        params = quantize_params(config, params)
    return config, params, model_dir


def _load(path: str, mesh, dtype: str | None):
    from checkpoints import gguf_read
    from model.config import default_dtype

    dtype = dtype or default_dtype()
    model_dir = resolve(path)
    if os.path.isfile(model_dir) and gguf_read.is_gguf(model_dir):
        from checkpoints.gguf_tokenizer import tokenizer_dir
        config, params = gguf_read.load_gguf(model_dir, mesh=mesh, dtype=dtype)
        return config, params, tokenizer_dir(gguf_read.GGUFFile(model_dir))
    if not os.path.isdir(model_dir):
        raise ValueError(f"model path {path!r}: not a directory or a .gguf file")
    if orbax_io.is_checkpoint(model_dir):
        config, params = orbax_io.load_checkpoint(model_dir, mesh=mesh, dtype=dtype)
    elif os.path.isfile(os.path.join(model_dir, "config.json")):
        config, params = hf.load_hf(model_dir, mesh=mesh, dtype=dtype)
    else:
        raise ValueError(f"model path {path!r}: not a supported checkpoint (expected a Hugging "
                         f"Face directory with config.json and *.safetensors, a flaxserve "
                         f"checkpoint with {orbax_io.CONFIG_FILE}, or a .gguf file)")
    return config, params, model_dir
