"""Suite-wide settings: CPU JAX, and a persistent compilation cache shared with every
server subprocess the tests start, so each engine start-up after the first reuses the
compiled programs instead of paying the compile again (CI has 2 cores). Every program is
cached, however fast it compiled: a cache read costs less than even a small compile.

The suite compiles at XLA:CPU's backend optimisation level 0 (LLVM does not optimise the
generated loops; the matmuls still call the same Eigen / oneDNN kernels): compiles take a
fraction of the time (a SmolLM2 steering check: 80 s -> under 8 s; the tiny engine's
warm-up 1.5x faster) and the suite's correctness checks do not depend on LLVM's loop
optimisations. What does change is float rounding: without FMA contraction a few more of
SmolLM2's logits land 1e-4 from transformers' (tests/test_smollm2.py says how many).
Servers and benchmarks outside the suite keep XLA's default level."""

import os

_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402  (after the environment is set)

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The real SmolLM2-135M-Instruct GGUF, fetched once into the flaxserve cache
    (~/.cache/flaxserve/models) by our own resolver; its tests skip, saying why, only
    when it cannot be fetched (no network and no cached copy)."""
    from checkpoints.resolve import resolve
    try:
        return resolve("smollm2")
    except ValueError as e:
        pytest.skip(f"the SmolLM2 GGUF is not available: {e}")


@pytest.fixture(scope="session")
def avx2_check(tmp_path_factory):
    """Runs `code` in a fresh Python process whose CPU kernels (model/native.py) are built
    with -mno-avx512f: the AVX2 loops other x86 CPUs run, checked on an AVX-512 machine (a
    process registers one build). One build, in one directory, for the whole session."""
    import subprocess
    import sys
    kernels = str(tmp_path_factory.mktemp("avx2_kernels"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def check(code: str) -> None:
        code = ("import sys; sys.path.insert(0, 'tests'); from model import native; "
                "assert native.vector_path() == 'avx2', native.vector_path(); "
                + code + "; print('ok')")
        env = dict(os.environ, FLAXSERVE_KERNEL_FLAGS="-mno-avx512f", FLAXSERVE_KERNELS=kernels)
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=300, cwd=root)
        assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
    return check
