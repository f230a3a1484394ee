"""Few-row float32 matmuls on CPU (model/cpu_kernels/f32_matvec.cc, built by model/native.py).

A batch-1 decode step's matmuls read every weight once for two flops per 4 bytes: only the
rate the weights stream from memory counts, and XLA:CPU's one-row dot reads them at a third
to two thirds of this machine's memory bandwidth (docs/speed.md, "Float32 matvec on CPU").
The kernel reads a weight as a few long sequential streams split over the calling thread
and XLA's intra-op pool. It takes products of at most MAX_ROWS rows, float32, in a
single-device process; everything else (prefill, big batches, a mesh, bfloat16, other
backends, `FLAXSERVE_CPU_MATVEC=0`) keeps XLA's dot. Each output is summed in one fixed
order, so a call's result does not depend on thread timing.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from model import native

MAX_ROWS = 4
TARGET_KN = "flaxserve_f32_matvec_kn"     # w [K, N]: a layer's weight
TARGET_NK = "flaxserve_f32_matvec_nk"     # w [N, K]: the tied embedding as the LM head


def enabled() -> bool:
    """Off with `FLAXSERVE_CPU_MATVEC=0` (read when a program is traced): XLA's dot, for
    side-by-side measurements."""
    return os.environ.get("FLAXSERVE_CPU_MATVEC", "1") != "0"


def applies(x: jax.Array, w: jax.Array) -> bool:
    """Whether x [..., K] times the float weight w takes the kernel in this process."""
    rows = 1
    for d in x.shape[:-1]:
        rows *= d
    return (0 < rows <= MAX_ROWS and x.dtype == jnp.float32 and w.dtype == jnp.float32
            and enabled() and jax.device_count() == 1 and native.library() is not None)


def matvec(x: jax.Array, w: jax.Array, transposed: bool = False) -> jax.Array:
    """x [M, K] @ w [K, N] (or, `transposed`, x @ w.T for w [N, K]) -> [M, N] float32."""
    native.require()
    n = w.shape[0] if transposed else w.shape[1]
    call = jax.ffi.ffi_call(TARGET_NK if transposed else TARGET_KN,
                            jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))
    return call(x, w)
