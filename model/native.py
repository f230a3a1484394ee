"""Our CPU kernels (model/cpu_kernels/*.cc): compiled into one library on first use, loaded,
and their XLA FFI targets registered with JAX.

XLA:CPU leaves three things of a decode step far from what the machine can do: a matmul
over int8 weights (it dequantises the weight in full first), attention over a paged pool
(it gathers and masks copies of the keys and values first) and a batch-1 float32 matmul (it
streams the weight at a fraction of the memory's rate). Each is an XLA FFI custom call
written in C++ (model/int8_kernel.py, model/cpu_attention.py, model/cpu_matvec.py wrap
them; parallel.h shares a call's tasks with XLA's own thread pool). The library is
built here with the machine's C++ compiler (`$CXX`, else `c++`; `-O3 -march=native`, plus
`$FLAXSERVE_KERNEL_FLAGS`) against jaxlib's FFI headers, once per sources, flags, jaxlib
and CPU, into `~/.cache/flaxserve/kernels` (`$FLAXSERVE_KERNELS`); ~10 s. Where it cannot
be built (no compiler, a build error) `library()` returns None, `unavailable_reason()` says
why (logged once), and callers take their pure-JAX path: same numbers, slower. Other
backends always take that path.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import jax

log = logging.getLogger(__name__)

_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels")
SOURCES = tuple(sorted(glob.glob(os.path.join(_DIR, "*.cc"))))
HEADERS = tuple(sorted(glob.glob(os.path.join(_DIR, "*.h"))))     # part of the cache key
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC")
# FFI target name -> the handler symbol the library exports
TARGETS = {"flaxserve_int8_matmul": "FlaxserveInt8Matmul",
           "flaxserve_paged_attention": "FlaxservePagedAttention",
           "flaxserve_f32_matvec_kn": "FlaxserveF32MatvecKn",
           "flaxserve_f32_matvec_nk": "FlaxserveF32MatvecNk"}

_lock = threading.Lock()
_state: dict = {}        # "lib": the loaded library, or "error": why it is not available


def kernel_dir() -> str:
    return os.path.expanduser(os.environ.get("FLAXSERVE_KERNELS")
                              or os.path.join("~", ".cache", "flaxserve", "kernels"))


def _flags() -> tuple[str, ...]:
    """FLAGS and `$FLAXSERVE_KERNEL_FLAGS` after them (e.g. `-mno-avx512f`: the AVX2 paths on
    an AVX-512 machine, as the tests build them)."""
    return FLAGS + tuple(os.environ.get("FLAXSERVE_KERNEL_FLAGS", "").split())


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
    parts = []
    for source in SOURCES + HEADERS:
        with open(source, "rb") as f:
            parts.append(f.read())
    include = jax.ffi.include_dir()
    key = hashlib.sha256(b"\0".join(parts + [
        " ".join(_flags()).encode(), compiler.encode(), include.encode(),
        jax.__version__.encode(), platform.machine().encode(), _cpu_flags().encode(),
    ])).hexdigest()[:16]
    path = os.path.join(kernel_dir(), f"flaxserve_kernels-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(kernel_dir(), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=kernel_dir())
    os.close(fd)
    try:
        run = subprocess.run([compiler, *_flags(), "-I", include, *SOURCES, "-o", tmp],
                             capture_output=True, text=True, timeout=600)
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
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
        _state["error"] = f"the CPU kernels did not build or load: {e}"
        return
    _state["lib"] = lib


def library():
    """The loaded library (built and registered on the first call; a failure is logged
    once), or None."""
    with _lock:
        if not _state:
            _load()
            if "error" in _state:
                say = log.warning if jax.default_backend() == "cpu" else log.debug
                say("CPU kernels unavailable (%s): int8 matmuls and paged attention take "
                    "XLA's path instead", _state["error"])
        return _state.get("lib")


def require() -> None:
    """Build and register the kernels, or raise RuntimeError saying why they cannot be."""
    if library() is None:
        raise RuntimeError(f"CPU kernels unavailable: {_state.get('error')}")


def unavailable_reason() -> str | None:
    library()
    return _state.get("error")


def vector_path() -> str | None:
    """The kernels' inner loops as built for this CPU: "avx512-vnni", "avx2" or "scalar"
    (None: not available)."""
    lib = library()
    if lib is None:
        return None
    fn = lib.FlaxserveInt8Path
    fn.restype = ctypes.c_char_p
    return fn().decode()
