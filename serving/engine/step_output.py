"""What a dispatched device call hands back: `Pending` waits for the device and copies the
sampled ids, logprobs and top-N logprobs to the host as a `StepOutput`; `Forward` is a
decode forward pass awaiting its sampler. Kept apart from serving/engine/device.py so the
scheduler, the multi-step loop and the tests read results without the engine's programs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import jax
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


def pad_rows(out: StepOutput, slots: int) -> StepOutput:
    """Outputs of a step over the first rows, zero-padded to every slot."""
    def pad(x):
        if x is None or x.ndim == 0 or x.shape[0] == slots:
            return x
        return np.concatenate([x, np.zeros((slots - x.shape[0],) + x.shape[1:], x.dtype)])
    return StepOutput(tokens=pad(out.tokens), logprobs=pad(out.logprobs), ranks=pad(out.ranks),
                      top_ids=pad(out.top_ids), top_logprobs=pad(out.top_logprobs),
                      errors=pad(out.errors), device_seconds=out.device_seconds,
                      entropies=pad(out.entropies), raw_logprobs=pad(out.raw_logprobs),
                      processed_logprobs=pad(out.processed_logprobs),
                      unconstrained_logprobs=pad(out.unconstrained_logprobs),
                      removed_mass=pad(out.removed_mass))


def host_output(out, seconds: float) -> StepOutput:
    """A StepOutput from the sampler's SampleOutput copied to the host."""
    return StepOutput(
        tokens=np.asarray(out.tokens), logprobs=np.asarray(out.logprob),
        ranks=np.asarray(out.rank), top_ids=np.asarray(out.top_ids),
        top_logprobs=np.asarray(out.top_logprobs), errors=np.asarray(out.error),
        device_seconds=seconds, entropies=np.asarray(out.entropy),
        raw_logprobs=np.asarray(out.raw_logprob),
        processed_logprobs=np.asarray(out.processed_logprob),
        unconstrained_logprobs=np.asarray(out.unconstrained_logprob),
        removed_mass=np.asarray(out.removed_mass))


class Pending:
    """A dispatched call; `result()` waits for the device and copies the outputs."""

    def __init__(self, engine: "DeviceEngine", out, slots: int | None = None,
                 dispatched: float | None = None):
        self._engine = engine
        self._out = out
        self._slots = slots          # pad per-slot outputs computed over fewer rows
        self._dispatched = time.perf_counter() if dispatched is None else dispatched
        self._result: StepOutput | None = None

    def result(self) -> StepOutput:
        if self._result is None:
            out = jax.device_get(self._out)
            done = time.perf_counter()
            seconds = done - max(self._dispatched, self._engine._last_done)
            self._engine._last_done = done
            self._result = host_output(out, max(seconds, 0.0))
            self._out = None
            if self._slots is not None:
                self._result = pad_rows(self._result, self._slots)
        return self._result


@dataclass
class Forward:
    """A dispatched decode forward pass awaiting its sampler (DeviceEngine.forward_step)."""
    logits: jax.Array      # [rows, V]
    rows: int
    dispatched: float      # perf_counter() at dispatch, for the step's device time

