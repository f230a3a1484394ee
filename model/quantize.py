"""Weight-only int8 quantization with one float32 scale per output channel.

Decode at small batch reads every weight once per step, so storing the matmul weights as
int8 (plus a scale per output channel) reads about a quarter of float32's bytes. The math
is symmetric round-to-nearest: scale = max|w| over the input axes / 127, q = round(w /
scale). Norm scales, biases and an untied embedding table (only one row is gathered per
token) stay in float. Each weight is kept as rows, one output channel per row contiguous
along its inputs ([N, K]), the layout the CPU kernel reads (model/int8_kernel.py): on CPU
every matmul (`int8_linear`) goes through it; other backends dequantise inside the jitted
program (q * scale), where an accelerator's compiler can fuse the convert into the matmul.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from model import int8_kernel
from model.config import ModelConfig

# parameter name -> the axes a matmul contracts over (the rest are output channels)
INPUT_AXES = {"qkv": (0,), "o": (0, 1, 2), "gate_up": (0,), "down": (0,), "lm_head": (0,)}


@jax.tree_util.register_dataclass
@dataclass
class Int8Weight:
    """An int8 weight as rows: `q` [N, K] (N the output channels, flattened in the float
    weight's order; K its input axes, flattened) and `scale` [N, 1] float32. `shape` and
    `input_axes` (static) say how the float weight is laid out."""
    q: jax.Array
    scale: jax.Array
    shape: tuple = field(metadata=dict(static=True))
    input_axes: tuple = field(metadata=dict(static=True))

    def rows(self, dtype) -> jax.Array:
        """The float weight as rows, [N, K]."""
        return (self.q.astype(jnp.float32) * self.scale).astype(dtype)

    def dequantize(self, dtype) -> jax.Array:
        """The float weight, in its own shape."""
        order = _row_order(len(self.shape), self.input_axes)
        rows = self.rows(dtype).reshape([self.shape[i] for i in order])
        return rows.transpose(np.argsort(order))


def _row_order(ndim: int, input_axes: tuple) -> list[int]:
    """The float weight's axes as the rows lay them out: output axes, then input axes."""
    return [i for i in range(ndim) if i not in input_axes] + list(input_axes)


def quantize_array(w, input_axes: tuple[int, ...]) -> Int8Weight:
    """Symmetric per-output-channel int8 of `w` (numpy or jax array), as rows."""
    w = np.asarray(jax.device_get(w), np.float32)
    input_axes = tuple(input_axes)
    order = _row_order(w.ndim, input_axes)
    k = int(np.prod([w.shape[i] for i in input_axes]))
    rows = w.transpose(order).reshape(-1, k)
    amax = np.max(np.abs(rows), axis=1, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.ascontiguousarray(np.clip(np.rint(rows / scale), -127, 127).astype(np.int8))
    return Int8Weight(jnp.asarray(q), jnp.asarray(scale), tuple(w.shape), input_axes)


def int8_linear(x: jax.Array, w: Int8Weight, out_dtype=None) -> jax.Array:
    """x [..., K] times the weight as a [K, N] matrix -> [..., N] (in `out_dtype`, default
    x's). On CPU: the kernel; elsewhere (or where it cannot be built) XLA over the
    dequantised rows."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if int8_kernel.available():
        y = int8_kernel.int8_matmul(x2, w.q, w.scale)
    else:
        y = jnp.einsum("mk,nk->mn", x2, w.rows(x.dtype), preferred_element_type=out_dtype)
    return y.reshape(lead + (w.q.shape[0],)).astype(out_dtype or x.dtype)


def int8_rows(w: Int8Weight, index: jax.Array, dtype) -> jax.Array:
    """Rows `index` of the weight as float (the tied embedding's lookup): [..., K]."""
    return (w.q[index].astype(jnp.float32) * w.scale[index]).astype(dtype)


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
