"""Research logits processors: register a jnp function, select it per request by name.

A processor is a pure function over the whole batch of logits with per-row parameters, so
a batch where some rows use it and others do not is still one compiled program:

    import jax.numpy as jnp
    from sampling.registry import register

    @register("logit_softcap", cap=30.0)           # name, then its parameters with defaults
    def logit_softcap(logits, args, state):
        cap = args["cap"][:, None]                 # every parameter arrives as a [slots] array
        import jax.numpy as jnp  # here, not at the top: HTTP workers validate names without JAX
    return cap * jnp.tanh(logits / cap)

    # per request:
    SamplingParams(logits_processors=[{"name": "logit_softcap", "args": {"cap": 15.0}}])

`logits` is [slots, vocab] float32; `state` is the `SamplerState` (token history, counts).
Rows that did not ask for the processor keep their logits untouched (the sampler selects
per row), and the stage is skipped entirely when no row asks for it. Processors run at
stage 4 of the default order (after penalties, before temperature). Register them before
the engine compiles its step: the set of processors is part of the compiled program.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Processor:
    name: str
    fn: Callable
    params: dict  # parameter name -> default (float)


_REGISTRY: dict[str, Processor] = {}


def register(name: str, **params: float):
    """Decorator: register `fn(logits, args, state) -> logits` under `name`."""
    if not name or not isinstance(name, str):
        raise ValueError("a processor needs a non-empty string name")
    for key, default in params.items():
        if isinstance(default, bool) or not isinstance(default, (int, float)):
            raise ValueError(f"processor {name!r}: default of {key!r} must be a number")

    def wrap(fn):
        _REGISTRY[name] = Processor(name, fn, dict(params))
        return fn

    return wrap


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered() -> tuple[Processor, ...]:
    """The registered processors in a fixed order (the order rows and the step use)."""
    return tuple(_REGISTRY[k] for k in sorted(_REGISTRY))


def max_args() -> int:
    return max([len(p.params) for p in _REGISTRY.values()] + [1])


def validate_processors(specs) -> None:
    """Each spec is {"name": registered name, "args": {param: number}}; else ValueError."""
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError(f"logits_processors[{i}] must be an object with a 'name'")
        extra = set(spec) - {"name", "args"}
        if extra:
            raise ValueError(f"logits_processors[{i}]: unknown key(s) {sorted(extra)}")
        proc = _REGISTRY.get(spec["name"])
        if proc is None:
            raise ValueError(f"logits_processors[{i}].name: unknown processor "
                             f"{spec['name']!r}; registered: {sorted(_REGISTRY)}")
        args = spec.get("args") or {}
        if not isinstance(args, dict):
            raise ValueError(f"logits_processors[{i}].args must be an object")
        for key, value in args.items():
            if key not in proc.params:
                raise ValueError(f"logits_processors[{i}].args: unknown parameter {key!r} for "
                                 f"{proc.name!r}; known: {sorted(proc.params)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"logits_processors[{i}].args.{key} must be a number")


@register("logit_softcap", cap=30.0)
def logit_softcap(logits, args, state):
    """Gemma-style soft capping: cap * tanh(logits / cap)."""
    cap = args["cap"][:, None]
    import jax.numpy as jnp  # here, not at the top: HTTP workers validate names without JAX
    return cap * jnp.tanh(logits / cap)
