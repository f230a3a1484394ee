"""Which library runs XLA:CPU's matmuls in the many-row decode programs: measured.

XLA:CPU hands a matmul of more than one row to YNNPACK. On a 2-core AVX2 machine (AMD
EPYC, no AVX-512) YNNPACK ran a decode step's 16- and 32-row products 1.3-3x slower than
Eigen (SmolLM2's LM head at 32 rows: 120 against 37 ms), and a SmolLM2 `bench serve` at
concurrency 16 decoded 1.27x as fast with Eigen's dots (docs/speed.md); at one row Eigen
was 1.11x slower there, and 1.16x on an AVX-512 Intel machine. So the choice is per
machine and only for decode programs over at least `WIDE_ROWS` slots: `auto` times this
model's own matmul chain (a few layers' weights past the last-level cache, and the LM
head) both ways at min(slots, 16) rows, and keeps Eigen where it is 10% faster. Fewer
rows and every prefill keep XLA's default.

The choice is kept per machine and model shape in a small JSON file next to the
compilation cache, so a warm restart does not measure again. On an accelerator, over a
mesh or several processes (every one must run the same programs) it is XLA's default.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

CHOICES = ("auto", "default", "eigen")
# XLA:CPU's debug option: the ops YNNPACK takes (by default its dots); none: Eigen's dots
_EIGEN = {"xla_cpu_experimental_ynn_fusion_type": ""}
WIDE_ROWS = 4                    # decode programs over this many slots or more
_CACHE_BYTES = 32 * 2 ** 20      # measure over at least this many weight bytes
_WIN = 0.90                      # eigen must take <= 0.90x as long
_RULE = 1                        # in the kept choices' keys: a new rule measures again


def options(choice: str) -> dict:
    """Compiler options for the decode programs under a resolved choice."""
    if choice not in ("default", "eigen"):
        raise ValueError(f"cpu_matmul must be 'default' or 'eigen' once resolved, got "
                         f"{choice!r}")
    return dict(_EIGEN) if choice == "eigen" else {}


def _weights(config, params) -> list | None:
    """The matmul weights of a decode step, as [in, out] float arrays, in order: a few
    layers' (qkv, o, gate/up, down) past `_CACHE_BYTES`, then the LM head; None when a
    weight is not a plain float array (int8 quantized params)."""
    d = config.hidden_size
    out = []
    for i in range(config.num_layers):
        layer = params.get(f"layer_{i}")
        if layer is None:
            return None
        a, m = layer["attn"], layer["mlp"]
        ws = [a["qkv"], a["o"], m["gate_up"], m["down"]]
        if any(not hasattr(w, "dtype") or not jnp.issubdtype(w.dtype, jnp.floating)
               for w in ws):
            return None
        out += [ws[0].reshape(d, -1), ws[1].reshape(-1, d), ws[2].reshape(d, -1), ws[3]]
        if sum(w.size * w.dtype.itemsize for w in out) >= _CACHE_BYTES:
            break
    head = params.get("embed") if config.tie_word_embeddings else params.get("lm_head")
    if head is None or not jnp.issubdtype(head.dtype, jnp.floating):
        return None
    return out + [head]


def _chain(config):
    """x [M, d] through the weights one after another (each product's input sliced from
    the previous output), as the decode step runs them; the LM head contracts d."""
    def run(x, layers, head):
        for j in range(0, len(layers), 4):
            qkv, o, gate_up, down = layers[j:j + 4]
            h = x @ qkv
            x = h[:, :o.shape[0]] @ o
            g = x @ gate_up
            x = g[:, :down.shape[0]] @ down
        if config.tie_word_embeddings:
            return jnp.einsum("bd,vd->bv", x, head)
        return x @ head
    return run


def measure(config, params, rows: int, rounds: int = 5) -> dict:
    """Seconds per call of the matmul chain over `rows` rows, {choice: s}; the choices
    interleaved round after round, the minimum kept."""
    weights = _weights(config, params)
    if weights is None:
        raise ValueError("cpu_matmul: the params hold no plain float matmul weights")
    layers, head = weights[:-1], weights[-1]
    run = _chain(config)
    x = jnp.ones((rows, config.hidden_size), head.dtype)
    progs = {c: jax.jit(run, compiler_options=options(c) or None) for c in ("default", "eigen")}
    for f in progs.values():
        f(x, layers, head).block_until_ready()          # compile and first touch
    best = {}
    for _ in range(rounds):
        for choice, f in progs.items():
            t = time.perf_counter()
            f(x, layers, head).block_until_ready()
            best[choice] = min(best.get(choice, np.inf), time.perf_counter() - t)
    return best


def decide(times: dict) -> str:
    """'eigen' where it takes at most _WIN of the default's time."""
    return "eigen" if times["eigen"] <= _WIN * times["default"] else "default"


def label(choice: str) -> str:
    """A resolved choice as the start-up lines print it."""
    return "Eigen" if choice == "eigen" else "XLA default"


def kept_path(cache_dir: str | None) -> str | None:
    """Where the kept choices live: beside the compilation cache (None: nowhere)."""
    return os.path.join(os.path.expanduser(cache_dir), "cpu_matmul.json") if cache_dir else None


def _key(config, weights: list, rows: int) -> str:
    shapes = [tuple(w.shape) for w in weights]
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line for line in f if line.startswith("model name")), "")
            f.seek(0)
            cpu += next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    text = json.dumps([_RULE, platform.machine(), cpu, os.cpu_count(), jax.__version__,
                       str(config.dtype), shapes, rows])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def resolve(choice: str, config, params, rows: int, *, mesh=None, cache_path=None,
            say=None) -> str:
    """'auto' -> 'default' or 'eigen' for this machine, model and decode batch (`rows`,
    the engine's slots, measured at min(rows, 16)); other choices pass through (off
    the CPU: 'default')."""
    if choice not in CHOICES:
        raise ValueError(f"cpu_matmul must be one of {', '.join(CHOICES)}, got {choice!r}")
    if jax.default_backend() != "cpu":
        return "default"        # the option is XLA:CPU's
    if choice != "auto":
        return choice
    if mesh is not None or jax.process_count() > 1 or rows < WIDE_ROWS:
        return "default"
    weights = _weights(config, params)
    if weights is None or sum(w.size * w.dtype.itemsize for w in weights) < _CACHE_BYTES:
        return "default"        # int8, or a model small enough to sit in the cache
    m = min(rows, 16)
    key = _key(config, weights, m)
    kept = _read(cache_path)
    if key in kept:
        return kept[key]
    times = measure(config, params, m)
    chosen = decide(times)
    if say:
        say(f"decode matmuls on this CPU at {m} rows: Eigen takes "
            f"{times['eigen'] / times['default']:.2f}x XLA's default (YNNPACK): "
            f"{'Eigen' if chosen == 'eigen' else 'the default'} from {WIDE_ROWS} rows up "
            "(--cpu-matmul)")
    if cache_path:
        kept[key] = chosen
        try:
            os.makedirs(os.path.dirname(cache_path) or ".", exist_ok=True)
            tmp = f"{cache_path}.{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(kept, f)
            os.replace(tmp, cache_path)
        except OSError:
            pass
    return chosen


def _read(path) -> dict:
    if not path:
        return {}
    try:
        with open(path) as f:
            kept = json.load(f)
        return kept if isinstance(kept, dict) else {}
    except (OSError, ValueError):
        return {}
