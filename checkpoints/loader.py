"""One entry point for every model PATH: a Hugging Face dir, our orbax dir, or "default".

Returns the config, the params (on the given mesh) and the directory that holds the
tokenizer files, which the servers and the CLI read next.
"""

from __future__ import annotations

import os

from checkpoints import hf, orbax_io

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default")


def resolve(path: str) -> str:
    """The directory a model PATH names ('default' -> the bundled model)."""
    if path in (None, "", "default"):
        if not orbax_io.is_checkpoint(DEFAULT_MODEL_DIR):
            raise ValueError(f"the bundled default model is missing from {DEFAULT_MODEL_DIR}; "
                             "train it with `python -m checkpoints.train_default`")
        return DEFAULT_MODEL_DIR
    return os.path.abspath(os.path.expanduser(path))


def load_model(path: str, mesh=None, dtype: str | None = None):
    """(config, params, model_dir) for a Hugging Face dir, an orbax dir or 'default'."""
    model_dir = resolve(path)
    if not os.path.isdir(model_dir):
        raise ValueError(f"model path {path!r}: no such directory")
    if orbax_io.is_checkpoint(model_dir):
        config, params = orbax_io.load_checkpoint(model_dir, mesh=mesh, dtype=dtype)
    elif os.path.isfile(os.path.join(model_dir, "config.json")):
        config, params = hf.load_hf(model_dir, mesh=mesh, dtype=dtype)
    else:
        raise ValueError(f"model path {path!r}: not a supported checkpoint (expected a Hugging "
                         f"Face directory with config.json and *.safetensors, or a flaxserve "
                         f"checkpoint with {orbax_io.CONFIG_FILE})")
    return config, params, model_dir
