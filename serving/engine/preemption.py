"""The paged pool on the device thread (the Scheduler mixes this in): a request is admitted
when its blocks are free; before each decode step (or K-step call) every running sample
gets the blocks its next positions need, oldest first; when the pool runs out the newest
sample or prefilling request is preempted: its full blocks are named and given back, and
it is recomputed later from prompt + generated tokens (mostly prefix-cache hits) with its
sampler step, counts and grammar state carried on, so a seeded sample draws the same
tokens as if it had never stopped.
"""

from __future__ import annotations

import collections
import logging
import time

import numpy as np

from serving.engine.requests import RequestState, Sample

log = logging.getLogger("flaxserve.engine")


class Preemption:
    """The Scheduler's block growth and preemption (serving/engine/scheduler.py owns the
    state; serving/engine/paged_kv.py the blocks)."""

    def _reserve_paged(self, st: RequestState) -> RequestState:
        """Slots and blocks for a popped request (the caller checked that both are free)."""
        with self._lock:
            slots = sorted(self._free)[:len(st.samples)]
            for slot in slots:
                self._free.remove(slot)
            self._prefilling.append(st)
            if st.parent is None:
                self._running.add(id(st))
            st.slots = slots
        cached = self.kv.admit(slots, st.prompt, st.request.steering_key)
        self._steer_slots(st.request, slots)
        if (st.parent is None and st.request.sampling.prompt_logprobs is not None
                and st.prompt_logprobs is None):
            self._score_prompt(st)
        st.prefill_pos = cached
        if st.parent is None:
            st.cached_tokens = cached
            st.admitted = st.admitted or time.monotonic()
        return st

    def _next_resume(self) -> RequestState | None:
        """The oldest preempted sample's recompute, when a slot and its blocks are free."""
        while self._resume:
            st = self._resume[0]
            sample = st.samples[0]
            if not sample.device_done and (st.cancelled or sample.text_done):
                sample.device_done = True
                if st.cancelled:
                    self._detok_q.put(("end", sample, "abort"))
            if sample.device_done:     # ended while it waited (stop string, cancel, error)
                self._resume.popleft()
                self._maybe_done(st.parent)
                continue
            with self._lock:
                if not self._free or not self.kv.can_admit(st.prompt, 1, self._decoding(),
                                                           st.request.steering_key):
                    return None
            self._resume.popleft()
            return self._reserve_paged(st)
        return None

    def _grow(self) -> None:
        """Give every decoding slot the block its next position needs, oldest sample first;
        when the pool runs out, preempt the newest holder of blocks instead of failing."""
        self._preempted_this_iter = False
        live = [s for s, o in enumerate(self._owner) if o is not None and not o.device_done]
        for slot in sorted(live, key=lambda s: self._age(self._owner[s])):
            sample = self._owner[slot]
            if sample is None:             # preempted by an older sample just now
                continue
            need = self.kv.grow_need(slot)
            while need > 0 and self._owner[slot] is sample and \
                    self.kv.manager.num_free() < need:
                victim = self._newest_holder()
                if victim is sample and victim is self._oldest_holder():
                    # alone and still too long for the pool: it ends here
                    sample.device_done = True
                    self._detok_q.put(("end", sample, "length"))
                    self._release(slot, np.asarray(sample.state.prompt + sample.tokens[:-1],
                                                   np.int32))
                    self._maybe_done(sample.state)
                    break
                self._preempt(victim)
            if need > 0 and self._owner[slot] is sample:
                self.kv.grow(slot, need)

    def _grow_ahead(self, k: int) -> bool:
        """Paged: the blocks every live row's next k positions need, if the pool has them
        all (else nothing is allocated and the caller runs one step)."""
        live = [s for s, o in enumerate(self._owner) if o is not None and not o.device_done]
        need = {s: self.kv.grow_need(s, ahead=k) for s in live}
        if sum(n for n in need.values() if n > 0) > self.kv.manager.num_free():
            return False
        for slot, n in need.items():
            if n > 0:
                self.kv.grow(slot, n)
        return True

    @staticmethod
    def _age(holder) -> tuple:
        """Admission order of a sample or a prefilling request (smaller: older)."""
        if isinstance(holder, Sample):
            return (holder.state.request.arrival, holder.index)
        st = holder.parent or holder
        return (st.request.arrival, holder.samples[0].index if holder.parent else 0)

    def _holders(self) -> list:
        return [o for o in self._owner if o is not None] + list(self._prefilling)

    def _newest_holder(self):
        return max(self._holders(), key=self._age)

    def _oldest_holder(self):
        return min(self._holders(), key=self._age)

    def _preempt(self, victim) -> None:
        """Free a holder's blocks: a decoding sample is recomputed later (from its prompt
        and tokens, see `_requeue_preempted`); a prefilling request goes back to the
        front of its queue."""
        self.kv.preemptions += 1
        self._preempted_this_iter = True
        if isinstance(victim, Sample):
            st = victim.state
            slot = victim.slot
            log.info("engine: preempting sample %d of %s (KV pool full)", victim.index,
                     st.request.request_id)
            victim.carry = self.engine.sampler_carry(slot)    # mirostat's mu, ...
            self._release(slot, np.asarray(st.prompt + victim.tokens[:-1], np.int32))
            victim.slot = -1
            st.slots[victim.index] = -1
            self._preempted_now.append(victim)
            return
        st = victim
        with self._lock:
            self._prefilling.remove(st)
            if st.parent is None:
                self._running.discard(id(st))
        for slot in st.slots:
            self.kv.free(slot)
            with self._lock:
                self._free.append(slot)
        st.slots, st.prefill_pos = [], 0
        if st.parent is None:
            with self._lock:
                self._queue.appendleft(st)
        else:
            self._resume.appendleft(st)

    def _requeue_preempted(self) -> None:
        """After the step in flight at their preemption was read: queue each preempted
        sample's recompute (prompt + every token it has), oldest first."""
        for sample in sorted(self._preempted_now, key=self._age):
            st = sample.state
            child = RequestState(request=st.request, handle=st.handle,
                                 prompt=st.prompt + sample.tokens, samples=[sample], parent=st)
            self._resume.append(child)
        self._preempted_now = []
        if len(self._resume) > 1:
            self._resume = collections.deque(sorted(self._resume, key=self._age))

