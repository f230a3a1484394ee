"""Suite-wide settings: CPU JAX, and a persistent compilation cache shared with every
server subprocess the tests start, so each engine start-up after the first reuses the
compiled programs instead of paying the compile again (CI has 2 cores). Every program is
cached, however fast it compiled: a cache read costs less than even a small compile."""

import os

_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
