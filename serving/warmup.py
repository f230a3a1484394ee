"""Start-up helpers shared by every command that compiles: the persistent XLA cache.

A restart (or `flaxserve generate` run twice) reads its executables from this cache
instead of compiling them again; `flaxserve engine --warmup-only` fills it ahead of time.
"""

from __future__ import annotations

import os


def default_cache_dir() -> str:
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "flaxserve", "xla")


def configure_compile_cache(cache_dir: str | None) -> str:
    """Point JAX's persistent compilation cache at `cache_dir` (None: the default; '' turns
    it off) and keep every entry, however small or quick. Returns the directory used."""
    if cache_dir is None:
        cache_dir = default_cache_dir()
    import jax
    # MLIR locations with the innermost frame only, not the whole Python traceback: every
    # start lowers its programs to find their cache entries (the key ignores locations),
    # and full tracebacks cost ~10-25% of that lowering
    jax.config.update("jax_include_full_tracebacks_in_locations", False)
    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return cache_dir
