"""The CPU int8 matmul kernel (model/cpu_kernels/int8_matmul.cc), built on first use.

XLA:CPU dequantises an int8 weight in full before a dot (it does not fuse the convert into
the matmul's operand), so a decode step over int8 weights reads more bytes than over
float32 (docs/speed.md, "int8"). This XLA FFI custom call reads each int8 weight byte once
per call and keeps the few rows of a decode step in L1, splitting the output channels over
XLA's own intra-op thread pool; over a prefill chunk's many rows its int16 multiply-adds
(AVX-512 VNNI where the CPU has it, else AVX2: `vector_path()`) outpace XLA's float32
GEMM. It is compiled here with the machine's C++ compiler
(`$CXX`, else `c++`; `-O3 -march=native`) against jaxlib's FFI headers, once per source,
compiler flags, jaxlib and CPU, into `~/.cache/flaxserve/kernels` (`$FLAXSERVE_KERNELS`).
Where it cannot be built (no compiler) `available()` says why and int8 weights take the
dequantising XLA path instead: same numbers, slower. Other backends always take that path
(their compilers fuse the convert), and say so only at debug level.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

TARGET = "flaxserve_int8_matmul"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels",
                      "int8_matmul.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


def _flags() -> tuple[str, ...]:
    """FLAGS and `$FLAXSERVE_KERNEL_FLAGS` after them (e.g. `-mno-avx512f`: the AVX2 path on
    an AVX-512 machine, as the tests build it)."""
    return FLAGS + tuple(os.environ.get("FLAXSERVE_KERNEL_FLAGS", "").split())

_lock = threading.Lock()
_state: dict = {}        # "lib": the loaded library, or "error": why it is not available


def kernel_dir() -> str:
    return os.path.expanduser(os.environ.get("FLAXSERVE_KERNELS")
                              or os.path.join("~", ".cache", "flaxserve", "kernels"))


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str) -> str:
    with open(SOURCE, "rb") as f:
        source = f.read()
    include = jax.ffi.include_dir()
    key = hashlib.sha256(b"\0".join([
        source, " ".join(_flags()).encode(), compiler.encode(), include.encode(),
        jax.__version__.encode(), platform.machine().encode(), _cpu_flags().encode(),
    ])).hexdigest()[:16]
    path = os.path.join(kernel_dir(), f"int8_matmul-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(kernel_dir(), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=kernel_dir())
    os.close(fd)
    try:
        run = subprocess.run([compiler, *_flags(), "-I", include, SOURCE, "-o", tmp],
                             capture_output=True, text=True, timeout=300)
        if run.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {run.stderr.strip()[-2000:]}")
        os.replace(tmp, path)        # atomic: concurrent processes each build, one wins
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _load() -> None:
    if jax.default_backend() != "cpu":
        _state["error"] = f"the default backend is {jax.default_backend()}, not cpu"
        return
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        _state["error"] = f"no C++ compiler ({compiler!r} is not on PATH)"
        return
    try:
        lib = ctypes.cdll.LoadLibrary(_build(compiler))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.FlaxserveInt8Matmul),
                                    platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
        _state["error"] = f"the kernel did not build or load: {e}"
        return
    _state["lib"] = lib


def available() -> bool:
    """Whether int8 matmuls can run through the kernel in this process (built, loaded and
    registered on the first call; a failure is logged once)."""
    with _lock:
        if not _state:
            _load()
            if "error" in _state:
                say = log.warning if jax.default_backend() == "cpu" else log.debug
                say("int8 CPU kernel unavailable (%s): int8 weights are dequantised by XLA "
                    "instead", _state["error"])
        return "lib" in _state


def unavailable_reason() -> str | None:
    available()
    return _state.get("error")


def vector_path() -> str | None:
    """The kernel's inner loop as built for this CPU: "avx512-vnni", "avx2" or "scalar"
    (None: not available)."""
    if not available():
        return None
    fn = _state["lib"].FlaxserveInt8Path
    fn.restype = ctypes.c_char_p
    return fn().decode()


def int8_matmul(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """x [M, K] float32 @ (q [N, K] int8 * scale [N, 1]).T -> [M, N] float32; call only
    after `available()` returned true."""
    m, n = x.shape[0], q.shape[0]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32))
    return call(x.astype(jnp.float32), q, scale.reshape(n).astype(jnp.float32))
