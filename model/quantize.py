"""Weight-only int8 quantization with one float32 scale per output channel.

Decode at small batch reads every weight once per step, so storing the matmul weights as
int8 (plus a scale per output column) reads about a quarter of float32's bytes. The math
is symmetric round-to-nearest: scale = max|w| over the input axes / 127, q = round(w /
scale). Norm scales, biases and an untied embedding table (only one row is gathered per
token) stay in float. `forward` dequantises inside the jitted program (q * scale); whether
that saves memory traffic depends on the compiler fusing the convert into the matmul (on
XLA:CPU it does not: docs/speed.md, "int8").
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig

# parameter name -> the axes a matmul contracts over (the rest are output channels)
INPUT_AXES = {"qkv": (0,), "o": (0, 1, 2), "gate_up": (0,), "down": (0,), "lm_head": (0,)}


@jax.tree_util.register_dataclass
@dataclass
class Int8Weight:
    """An int8 weight and its float32 scales (shape: the weight's, 1 on the input axes)."""
    q: jax.Array
    scale: jax.Array

    def dequantize(self, dtype) -> jax.Array:
        return (self.q.astype(jnp.float32) * self.scale).astype(dtype)


def quantize_array(w, input_axes: tuple[int, ...]) -> Int8Weight:
    """Symmetric per-output-channel int8 of `w` (numpy or jax array)."""
    w = np.asarray(jax.device_get(w), np.float32)
    amax = np.max(np.abs(w), axis=input_axes, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return Int8Weight(jnp.asarray(q), jnp.asarray(scale))


def _axes_for(config: ModelConfig, name: str):
    if name == "embed":     # tied: the logits contract over hidden, one scale per token row
        return (1,) if config.tie_word_embeddings else None
    return INPUT_AXES.get(name)


def quantize_params(config: ModelConfig, params):
    """The parameter tree with every matmul weight replaced by an `Int8Weight`."""
    def walk(node, name=None):
        if isinstance(node, dict):
            return {k: walk(v, k) for k, v in node.items()}
        axes = _axes_for(config, name)
        return node if axes is None else quantize_array(node, axes)
    return walk(params)


def is_quantized(params) -> bool:
    return any(isinstance(x, Int8Weight) for x in
               jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, Int8Weight)))


def dequantize_params(params, dtype):
    """Plain arrays again (inside jit: a convert and a multiply per weight); a tree with
    no `Int8Weight` comes back as it is."""
    if not is_quantized(params):
        return params
    return jax.tree.map(lambda x: x.dequantize(dtype) if isinstance(x, Int8Weight) else x,
                        params, is_leaf=lambda x: isinstance(x, Int8Weight))


def quantized_bytes(config: ModelConfig, shapes) -> int:
    """Weight bytes a decode step reads once quantized, from shapes (bench decode's rule:
    an untied embedding is gathered, not read)."""
    total = 0

    def walk(node, name=None):
        nonlocal total
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, k)
            return
        shape = tuple(node.shape)
        axes = _axes_for(config, name)
        if name == "embed" and not config.tie_word_embeddings:
            return
        if axes is None:
            total += int(np.prod(shape)) * np.dtype(node.dtype).itemsize
        else:
            out = int(np.prod([d for i, d in enumerate(shape) if i not in axes]))
            total += int(np.prod(shape)) + 4 * out
    walk(shapes)
    return total
