"""The CPU int8 matmul (model/cpu_kernels/int8_matmul.cc, built by model/native.py).

XLA:CPU dequantises an int8 weight in full before a dot (it does not fuse the convert into
the matmul's operand), so a decode step over int8 weights reads more bytes than over
float32 (docs/speed.md, "int8"). This XLA FFI custom call reads each int8 weight byte once
per call and keeps the few rows of a decode step in L1, splitting the output channels over
XLA's own intra-op thread pool; over a prefill chunk's many rows its int16 multiply-adds
(AVX-512 VNNI where the CPU has it, else AVX2: `vector_path()`) outpace XLA's float32
GEMM. Where the kernels cannot be built `available()` is false and int8 weights take the
dequantising XLA path instead: same numbers, slower. Other backends always take that path
(their compilers fuse the convert).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model import native

TARGET = "flaxserve_int8_matmul"
unavailable_reason = native.unavailable_reason
vector_path = native.vector_path


def available() -> bool:
    """Whether int8 matmuls can run through the kernel in this process."""
    return native.library() is not None


def int8_matmul(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """x [M, K] float32 @ (q [N, K] int8 * scale [N, 1]).T -> [M, N] float32"""
    native.require()
    m, n = x.shape[0], q.shape[0]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32))
    return call(x.astype(jnp.float32), q, scale.reshape(n).astype(jnp.float32))
