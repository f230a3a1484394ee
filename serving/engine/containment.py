"""Failure containment on the device thread (the Scheduler mixes this in): a failed admit,
prefill, insert or step fails the requests it involved, with a message, and the loop goes
on; the engine is broken (every request fails, the loop ends, `flaxserve engine` exits
non-zero for its supervisor) only when the device state is lost or
MAX_CONSECUTIVE_STEP_FAILURES steps in a row fail (serving/engine/scheduler.py).
"""

from __future__ import annotations

import logging
import traceback

import numpy as np

from serving.engine.requests import INTERNAL, Failure, RequestState

log = logging.getLogger("flaxserve.engine")

# Failure containment: a failed admit, prefill, insert or step fails the requests involved
# and the loop goes on; the engine is broken (the loop ends, `flaxserve engine` exits
# non-zero for its supervisor) only when the device state is lost or this many steps in a
# row fail.
MAX_CONSECUTIVE_STEP_FAILURES = 3


class Containment:
    """The Scheduler's failure handling (serving/engine/scheduler.py owns the state)."""

    def _fail_all(self, kind: str, message: str) -> None:
        self.beams.fail_all(kind, message)
        self.spec.fail_all(kind, message)
        with self._lock:
            states = list(self._queue) + list(self._prefilling) + list(self._resume)
            self._queue.clear()
            self._prefilling.clear()
            self._resume.clear()
            self._running.clear()
        states += [o.state for o in self._owner if o is not None]
        states += [s.state for s in self._preempted_now]
        states = [st.parent or st for st in states]
        seen = set()
        for st in states:
            if id(st) not in seen:
                seen.add(id(st))
                self._detok_q.put(("fail", st, Failure(kind, message)))

    def _guard_step(self, dispatch, owners):
        """`dispatch()` (a decode step, or half of one); None when it raised."""
        try:
            return dispatch()
        except Exception as e:
            self._step_failed(owners, e)
            return None

    def _step_failed(self, owners, error: Exception) -> None:
        """A step failed: every sample in it fails (which row caused it is unknown)."""
        self._step_failures += 1
        states = list({id(o.state): o.state for o in owners
                       if o is not None and not o.device_done}.values())
        self._contain("a decode step", states, error)
        if self._failed is None and self._step_failures >= MAX_CONSECUTIVE_STEP_FAILURES:
            with self._lock:
                self._failed = (f"engine failure: {self._step_failures} decode steps in a row "
                                f"failed, the last with {type(error).__name__}: {error}")

    def _contain(self, what: str, states: list, error: Exception) -> None:
        """Fail `states` with a clear error, give back their slots, and mark the engine
        broken only if the device state did not survive."""
        log.error("engine: %s failed for %d request(s); failing them and carrying on:\n%s",
                  what, len(states), traceback.format_exc())
        message = f"the engine failed while {what}: {type(error).__name__}: {error}"
        for st in states:
            self._fail_request(st, message)
        if self._failed is None and self._device_state_lost():
            with self._lock:
                self._failed = f"engine failure: the device state was lost ({message})"

    def _fail_request(self, st: RequestState, message: str) -> None:
        """End one request with INTERNAL and free its slots (their KV is not reused)."""
        for k, sample in enumerate(st.samples):
            sample.device_done = True
            slot = st.slots[k] if k < len(st.slots) else None
            if slot is None or slot < 0:   # < 0: preempted, holds no slot
                continue
            if self._owner[slot] is sample:
                self._owner[slot] = None
                try:
                    self.engine.release(slot)
                except Exception:      # a lost device state is caught by the caller
                    log.exception("engine: releasing slot %d failed", slot)
            elif sample.slot != -1:    # inserted and already freed by _reap
                continue
            self._slot_tokens[slot] = np.zeros(0, np.int32)
            if self.kv is not None:
                self.kv.free(slot)
            with self._lock:
                if slot not in self._free:
                    self._free.append(slot)
        with self._lock:
            self._prefilling[:] = [p for p in self._prefilling if p is not st]
            self._running.discard(id(st))
        if st.parent is not None:          # a preempted sample's recompute: fail the request
            self._fail_request(st.parent, message)
            return
        self._detok_q.put(("fail", st, Failure(INTERNAL, message)))

    def _device_state_lost(self) -> bool:
        """Whether the engine's device state is gone (donated to a call that failed while
        running, or holding an error): then no later step can succeed."""
        import jax
        try:
            leaves = jax.tree.leaves(getattr(self.engine, "state", None))
            if any(x.is_deleted() for x in leaves if hasattr(x, "is_deleted")):
                return True
            jax.block_until_ready(leaves)
        except Exception:
            return True
        return False

