"""What a dispatched device call hands back: `Pending` waits for the device and copies the
sampled ids, logprobs and top-N logprobs to the host as a `StepOutput`; `Forward` is a
decode forward pass awaiting its sampler. Kept apart from serving/engine/device.py so the
scheduler, the multi-step loop and the tests read results without the engine's programs.

One read per call: the sampler's SampleOutput is 11 arrays, and on the host each array a
step copies back costs its own transfer (bench waterfall: the per-array reads were the
largest piece of a batch-1 step's host time). So every program that feeds a `Pending`
packs them on the device (`pack`) into ONE int32 array [rows, 9 + 2K]: the int fields
as they are, the float32 ones bit-cast (lax.bitcast_convert_type, so NaN payloads, -inf
and -0.0 survive bit for bit), the bool as 0/1; the host reads it once and `unpack`s it
with numpy views into the same StepOutput. Columns (`COLUMNS`): tokens, rank, error,
then the six float32 scalars, then K top ids and K top logprobs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from serving.engine.device import DeviceEngine


@dataclass
class StepOutput:
    """Host copies of one call's results, indexed by slot (insert: one row)."""

    tokens: np.ndarray          # [S] int32
    logprobs: np.ndarray        # [S] float32, sampled token, in the row's logprobs_mode
    ranks: np.ndarray           # [S] int32
    top_ids: np.ndarray         # [S, K] int32
    top_logprobs: np.ndarray    # [S, K] float32
    errors: np.ndarray          # [S] bool: every token was masked
    device_seconds: float
    entropies: np.ndarray | None = None  # [S] float32, if a row asked for it
    # logprobs_mode "all" / "unconstrained" (sampling/counterfactual.py)
    raw_logprobs: np.ndarray | None = None            # [S] float32
    processed_logprobs: np.ndarray | None = None      # [S] float32
    unconstrained_logprobs: np.ndarray | None = None  # [S] float32
    removed_mass: np.ndarray | None = None            # [S] float32


# the packed array's scalar columns, in order (SampleOutput's field names); then
# top_ids [K] and top_logprobs [K]
INT_COLUMNS = ("tokens", "rank", "error")
FLOAT_COLUMNS = ("logprob", "raw_logprob", "processed_logprob", "entropy",
                 "unconstrained_logprob", "removed_mass")
COLUMNS = INT_COLUMNS + FLOAT_COLUMNS
SCALARS = len(COLUMNS)      # 9


def pack(out) -> jax.Array:
    """A SampleOutput ([S] fields, top-N [S, K]) as one int32 array [S, 9 + 2K]; traced
    inside the jitted program that sampled it. The float32 fields are bit-cast, not
    converted: `unpack` gives back the same bits."""
    def f32(x):
        if x.dtype != jnp.float32:   # a bit-cast of another width would add an axis
            raise TypeError(f"pack: float32 expected, got {x.dtype}")
        return jax.lax.bitcast_convert_type(x, jnp.int32)

    def i32(x):
        if x.dtype not in (jnp.int32, jnp.bool_):
            raise TypeError(f"pack: int32 or bool expected, got {x.dtype}")
        return x.astype(jnp.int32)

    cols = [i32(getattr(out, n))[:, None] for n in INT_COLUMNS]
    cols += [f32(getattr(out, n))[:, None] for n in FLOAT_COLUMNS]
    cols += [i32(out.top_ids), f32(out.top_logprobs)]
    return jnp.concatenate(cols, axis=1)


def pad_packed(packed: np.ndarray, slots: int) -> np.ndarray:
    """A packed array over the first rows, zero-padded to every slot (zero bits: token 0,
    rank 0, no error, 0.0 in every field)."""
    if packed.shape[0] == slots:
        return packed
    return np.concatenate([packed, np.zeros((slots - packed.shape[0],) + packed.shape[1:],
                                            packed.dtype)])


def unpack(packed: np.ndarray, seconds: float) -> StepOutput:
    """`pack`'s array, on the host, as a StepOutput of views into it (no copies but the
    bool column)."""
    packed = np.asarray(packed)
    if packed.dtype != np.int32 or packed.ndim != 2 or (packed.shape[1] - SCALARS) % 2:
        raise ValueError(f"unpack: int32 [rows, 9 + 2K] expected, got {packed.dtype} "
                         f"{packed.shape}")
    k = (packed.shape[1] - SCALARS) // 2
    floats = packed.view(np.float32)
    col = {n: packed[:, i] for i, n in enumerate(INT_COLUMNS)}
    col.update({n: floats[:, len(INT_COLUMNS) + i] for i, n in enumerate(FLOAT_COLUMNS)})
    return StepOutput(
        tokens=col["tokens"], logprobs=col["logprob"], ranks=col["rank"],
        top_ids=packed[:, SCALARS:SCALARS + k], top_logprobs=floats[:, SCALARS + k:],
        errors=col["error"] != 0, device_seconds=seconds, entropies=col["entropy"],
        raw_logprobs=col["raw_logprob"], processed_logprobs=col["processed_logprob"],
        unconstrained_logprobs=col["unconstrained_logprob"],
        removed_mass=col["removed_mass"])


class Pending:
    """A dispatched call; `result()` waits for the device and copies the outputs: `out` is
    `pack`'s one array, read in one transfer."""

    def __init__(self, engine: "DeviceEngine", out, slots: int | None = None,
                 dispatched: float | None = None):
        self._engine = engine
        self._out = out
        self._slots = slots          # pad per-slot outputs computed over fewer rows
        self._dispatched = time.perf_counter() if dispatched is None else dispatched
        self._result: StepOutput | None = None

    def result(self) -> StepOutput:
        if self._result is None:
            packed = np.asarray(jax.device_get(self._out))
            done = time.perf_counter()
            seconds = done - max(self._dispatched, self._engine._last_done)
            self._engine._last_done = done
            self._out = None
            if self._slots is not None:
                packed = pad_packed(packed, self._slots)
            self._result = unpack(packed, max(seconds, 0.0))
        return self._result


@dataclass
class Forward:
    """A dispatched decode forward pass awaiting its sampler (DeviceEngine.forward_step)."""
    logits: jax.Array      # [rows, V]
    rows: int
    dispatched: float      # perf_counter() at dispatch, for the step's device time

