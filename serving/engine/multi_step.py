"""Multi-step decode: K decode steps (forward + sampler) in one dispatched program.

Why: on a small model every decode step's two host dispatches, the read-back of its
tokens and the scheduler's bookkeeping cost as much as the step itself (the bundled model
runs ~2.4 ms a token in process). Running K steps inside one `jax.lax.while_loop` pays that
once per K tokens (the loop ends early once every row has stopped). Each step is the
engine's own `_forward_step_fn` then `_sample_step_fn` (the same code as a single step, so
the numbers are the same), and the outputs of step j land in row j of one packed int32
array [K, rows, 9 + 2K' + 1] (serving/engine/step_output.py `pack`, K' the top-N width,
plus a last column: the row was live for that step), which the host reads in one transfer.

Rows stop ON THE DEVICE exactly where the scheduler's `_take` would stop them: an
all-masked row (error), a stop id or EOS once past min_tokens, max_tokens or the context
limit. The host passes each row's `budget` (tokens it may still produce), `min_left`
(min_tokens minus tokens so far: stop ids count only past it) and a padded stop-id set; a
row that stops is marked inactive, so it writes no more KV and its position and last token
stay put (a row with budget 0 does not run at all). The host still takes every token in
order through `_take`, which reaches the same decision at the same token.

The sampler is the lean program while every live row allows it, else the full one
(`lean` static, as for a single step: sampling/sampler.py `needs_full`). Its per-slot
state (output counts for penalties and penalty windows, mirostat's mu, DRY and n-gram
history, a decaying top-p, ...) lives in the decode state and is carried from one loop
step to the next exactly as from one single step to the next, so a row gets the same
tokens and logprobs at any K. The full K-step programs compile only with decode_steps > 1
(the background warm-up's jobs).

Rows that still fall back to K = 1 while they are live (serving/engine/scheduler.py
`_multi_steps`): a grammar (its mask for step j+1 needs the host to read token j), a
custom sampler order or `temperature_last` (the reorderable sampler is a third, larger
program: its K-step variant would be one more compile per shape for a rare request), and
`deterministic` rows (their promise is the same bits in any batch; whether a call runs K
steps depends on the other traffic, so a K-step program would have to match the single
step bit for bit, which XLA does not promise for a body inside a loop).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from serving.engine.step_output import pack, pad_packed, unpack


def run(forward_step, sample_step, params, state, tables, mask_bits, budget, min_left,
        stop_ids, steps: int, attend_len: int, rows: int, custom: bool, lean: bool = True):
    """`steps` decode steps over slots [0, rows); pure (jit it with the callables bound).
    lean: the lean sampler (no live row needs more) or the full one.

    budget, min_left: int32 [max_slots]; stop_ids: int32 [max_slots, M] (-1 pads).
    Returns (state, outputs): int32 [steps, rows, 9 + 2K + 1], step j's row r the sampler's
    output packed (step_output.pack) and then `wrote` (1: the row was live for that step,
    so its token counts)."""
    put = lambda full, part: jax.lax.dynamic_update_slice_in_dim(full, part, 0, axis=0)
    budget, min_left, stop_ids = budget[:rows], min_left[:rows], stop_ids[:rows]
    state = dict(state, active=put(state["active"], state["active"][:rows] & (budget > 0)))

    def one(state, taken):
        alive = state["active"][:rows]
        state, logits = forward_step(params, state, tables, attend_len, rows)
        state, out = sample_step(state, logits, mask_bits, custom, rows, lean=lean)
        n = taken + 1                        # this row's tokens in this call, this one too
        hit = jnp.any(out.tokens[:, None] == stop_ids, axis=-1) & (n > min_left)
        stop = out.error | hit | (n >= budget)
        state = dict(state, active=put(state["active"], alive & ~stop))
        packed = jnp.concatenate([pack(out), alive.astype(jnp.int32)[:, None]], axis=1)
        return state, taken + alive.astype(jnp.int32), packed

    # outputs land in a [steps, rows, width] buffer; the loop ends early once every row
    # stopped (a step it never ran stays zero: wrote 0)
    shape = jax.eval_shape(lambda st: one(st, jnp.zeros((rows,), jnp.int32))[2], state)
    bufs = jnp.zeros((steps,) + shape.shape, shape.dtype)

    def body(carry):
        i, state, taken, bufs = carry
        state, taken, packed = one(state, taken)
        bufs = jax.lax.dynamic_update_index_in_dim(bufs, packed, i, 0)
        return i + 1, state, taken, bufs

    def more(carry):
        i, state, _, _ = carry
        return (i < steps) & jnp.any(state["active"][:rows])

    _, state, _, outs = jax.lax.while_loop(
        more, body, (jnp.int32(0), state, jnp.zeros((rows,), jnp.int32), bufs))
    return state, outs


@dataclass
class MultiStepOutput:
    """Host copies of one multi-step call: `steps[j]` is step j's StepOutput (every slot,
    as a single step gives it); wrote[j, s]: slot s was live at step j."""

    steps: list
    wrote: np.ndarray            # [K, max_slots] bool
    device_seconds: float


class MultiPending:
    """A dispatched multi-step call; `result()` waits and copies `run`'s one packed array
    (DeviceEngine.Pending's counterpart: the same device-time accounting)."""

    def __init__(self, engine, out, dispatched: float):
        self._engine, self._out = engine, out
        self._dispatched = dispatched
        self._result: MultiStepOutput | None = None

    def result(self) -> MultiStepOutput:
        if self._result is None:
            out = np.asarray(jax.device_get(self._out))
            done = time.perf_counter()
            seconds = max(done - max(self._dispatched, self._engine._last_done), 0.0)
            self._engine._last_done = done
            slots = self._engine.max_slots
            steps = [unpack(pad_packed(out[j, :, :-1], slots), 0.0)
                     for j in range(out.shape[0])]
            full = np.zeros((out.shape[0], slots), bool)
            full[:, :out.shape[1]] = out[:, :, -1] != 0
            self._result = MultiStepOutput(steps, full, seconds)
            self._out = None
        return self._result


def stop_rows(max_slots: int, width: int, rows: dict) -> tuple[np.ndarray, ...]:
    """Host arrays for `run` from {slot: (budget, min_left, stop_ids)}; other slots get
    budget 0 (they do not run). A row with more stop ids than `width` is the caller's to
    refuse (see `Scheduler._multi_steps`)."""
    budget = np.zeros(max_slots, np.int32)
    min_left = np.zeros(max_slots, np.int32)
    stop_ids = np.full((max_slots, width), -1, np.int32)
    for slot, (b, m, ids) in rows.items():
        ids = sorted(ids)
        if len(ids) > width:
            raise ValueError(f"slot {slot}: {len(ids)} stop ids exceed {width}")
        budget[slot] = max(min(b, 2 ** 30), 0)
        min_left[slot] = max(min(m, 2 ** 30), -(2 ** 30))
        stop_ids[slot, :len(ids)] = ids
    return budget, min_left, stop_ids
