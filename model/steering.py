"""Per-request activation steering: vectors added to the residual stream at chosen layers.

A request's `steering: [{layer, vector | name, scale}]` becomes one [num_layers, hidden]
array: row i is the sum of scale * vector over the entries at layer i (zeros elsewhere).
The engine keeps one such array per slot in its decode state and hands the live rows to
the forward (model/decoder.py adds row b's layer-i vector to sequence b after layer i, at
every position, prompt included, as a forward hook on that layer's output would), so rows
of one batch carry different vectors, rows without steering carry zeros (x + 0 = x,
bitwise), and nothing compiles per request.

Named vectors are registered at start from a .npz file (`load_vectors`): each entry is a
[hidden] vector, or a [num_layers, hidden] one whose row `layer` is used.
"""

from __future__ import annotations

import numpy as np

MAX_ENTRIES = 64


def load_vectors(path: str) -> dict[str, np.ndarray]:
    """name -> float32 array from an .npz file."""
    with np.load(path) as f:
        return {k: np.asarray(f[k], np.float32) for k in f.files}


def steering_array(spec, num_layers: int, hidden: int,
                   named: dict[str, np.ndarray] | None = None) -> np.ndarray | None:
    """Validate a request's steering entries -> [num_layers, hidden] float32 (None if empty).

    ValueError names the offending entry and field."""
    if spec is None or (isinstance(spec, list) and not spec):
        return None
    if not isinstance(spec, list):
        raise ValueError("steering: expected a list of {layer, vector | name, scale}")
    if len(spec) > MAX_ENTRIES:
        raise ValueError(f"steering: at most {MAX_ENTRIES} entries, got {len(spec)}")
    named = named or {}
    out = np.zeros((num_layers, hidden), np.float32)
    for i, e in enumerate(spec):
        where = f"steering[{i}]"
        if not isinstance(e, dict):
            raise ValueError(f"{where}: expected an object")
        unknown = sorted(set(e) - {"layer", "vector", "name", "scale"})
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}: unknown field")
        layer = e.get("layer")
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise ValueError(f"{where}.layer: expected an integer in [0, {num_layers - 1}], "
                             f"got {layer!r}")
        scale = e.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(
                scale) or abs(scale) > 1e4:
            raise ValueError(f"{where}.scale: expected a finite number in [-1e4, 1e4], "
                             f"got {scale!r}")
        if ("vector" in e) == ("name" in e):
            raise ValueError(f"{where}: give exactly one of vector and name")
        if "name" in e:
            if e["name"] not in named:
                raise ValueError(f"{where}.name: no steering vector named {e['name']!r} "
                                 f"(registered: {sorted(named) or 'none'})")
            vec = named[e["name"]]
            if vec.ndim == 2 and vec.shape[0] == num_layers:
                vec = vec[layer]
            field = "name"
        else:
            try:
                vec = np.asarray(e["vector"], np.float64)
            except (TypeError, ValueError):
                raise ValueError(f"{where}.vector: expected a list of {hidden} numbers") from None
            field = "vector"
        if vec.shape != (hidden,):
            raise ValueError(f"{where}.{field}: expected {hidden} numbers (the hidden size), "
                             f"got shape {tuple(vec.shape)}")
        if not np.all(np.isfinite(vec)):
            raise ValueError(f"{where}.{field}: every element must be finite")
        out[layer] += np.float32(scale) * vec.astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise ValueError("steering: the summed vectors overflow float32")
    return out
