"""Continuous batching on the host: one thread owns the device, one thread makes text.

The device thread loops: free the slots of finished or cancelled samples; admit queued
requests into free slots and run their prefill within a per-iteration token budget (long
prompts in chunks, interleaved with decode steps; fresh one-sample prompts of the same
iteration prefilled together when the engine batches prefill, DeviceEngine.insert_many);
dispatch decode step N+1; only then read
step N's tokens (JAX dispatch is async, so the device never waits for the host). Each step
remembers which sample owned each slot when it was dispatched: a slot freed or refilled in
between is never credited to the wrong request.

Token-level stops (stop_token_ids, EOS unless ignore_eos, max_tokens, the context limit,
an all-masked row) are decided on the device thread. The detokenize thread turns tokens
into text (incremental, UTF-8 safe), holds back possible stop strings, cuts on a match and
ends the sample; the device thread frees that slot at its next iteration.

Constrained samples (guided_* grammars, thinking budgets): their next-token mask depends
on the token just sampled, so while one is running the loop dispatches step N+1's forward
pass, reads step N's tokens and fills the masks of those rows on the host
(sampling/grammar.py) while the forward runs, then dispatches step N+1's sampler with the
masks; unconstrained rows get all-ones rows, and without constrained samples nothing
changes (step N+1 is dispatched whole before step N is read).

Multi-step decode (`--decode-steps K`, serving/engine/multi_step.py): while every live row
can run without the host (no grammar, default sampler order, few stop ids) and nobody waits
(queue, prefill, fresh first token, beam or speculative job), one dispatch runs K steps and
the device stops each row where `_take` would (EOS, stop ids, max_tokens, the context);
the row's count includes what the call still in flight adds, so the K-step call is
dispatched ahead like a single one. Its tokens go through `_take` in order, K at a time.

Prefix cache: each slot remembers the token ids its KV holds (also after release). A new
prompt takes the slot with the longest common prefix (reused in place when free, copied
from a busy one) and prefills only the rest; at least one prompt token is always left for
`insert`, which samples the first token. `n > 1` prefills once and copies the KV to the
other samples' slots; each sample draws from its own key (`sample_index`).

Paged KV (the engine's kv_layout "paged", serving/engine/paged_kv.py): the prefix cache is
the block manager's, shared by every request at block granularity, and slots hold no KV
of their own. A request is admitted when its blocks are free; before each decode step
every running sample gets the block its next position needs, oldest first, and when the
pool runs out the newest sample (or prefilling request) is preempted: its full blocks are
named and given back, and it is recomputed later from prompt + generated tokens (mostly
prefix-cache hits) with its sampler step, counts and grammar state carried on, so a seeded
sample draws the same tokens as if it had never stopped.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
import traceback

import jax
import numpy as np

from serving.engine.requests import (INTERNAL, RESOURCE_EXHAUSTED, UNAVAILABLE, EngineRequest,
                                     Handle, RequestError, RequestState, Sample,
                                     TokenLogprob)
from serving.engine.containment import Containment
from serving.engine.preemption import Preemption
from serving.engine.request_checks import RequestChecks
from serving.engine.text_thread import TextThread

log = logging.getLogger("flaxserve.engine")

IDLE_WAIT_S = 0.05

# prompt tokens per iteration a batched prefill may take, by backend: on an accelerator a
# [16, 128] prefill costs about what a [4, 128] one does, so 2048 (vLLM's
# max_num_batched_tokens) lets a burst share programs; a CPU is bound by arithmetic from
# ~128 rows on, so a bigger group only makes every first token (and every decoding row)
# wait for all of it: 512 gave 0.61x the mean TTFT of 2048 at concurrency 16 on SmolLM2
# (docs/speed.md)
BATCHED_PREFILL_BUDGET = {"cpu": 512}
BATCHED_PREFILL_BUDGET_DEFAULT = 2048


def default_prefill_budget(largest_chunk: int, batching: bool, backend: str) -> int:
    """Prompt tokens prefilled per scheduler iteration when `--prefill-budget` is unset:
    the largest prefill chunk, or with batched prefill the backend's budget (never below
    the largest chunk, so a long prompt's chunk always fits one iteration)."""
    if not batching:
        return largest_chunk
    return max(largest_chunk, BATCHED_PREFILL_BUDGET.get(backend, BATCHED_PREFILL_BUDGET_DEFAULT))


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    m = min(len(a), len(b))
    if m == 0:
        return 0
    eq = a[:m] == b[:m]
    return m if eq.all() else int(np.argmin(eq))


class Scheduler(RequestChecks, TextThread, Containment, Preemption):
    """Admission queue + slots + the device loop. `submit` from any thread."""

    def __init__(self, engine, tokenizer=None, *, max_queue: int = 256,
                 prefill_budget: int | None = None, prefix_cache: bool = True,
                 eos_ids=None, steering_vectors: dict | None = None, speculative=None):
        self.engine = engine
        # activation steering (model/steering.py): vectors registered by name at start
        self.steering_vectors = dict(steering_vectors or {})
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.largest_chunk = engine.prefill_buckets[-1]
        # batched prefill (DeviceEngine prefill_batch > 1): fresh prompts admitted in one
        # iteration share prefill programs (default_prefill_budget)
        self._batching = bool(getattr(engine, "prefill_rows", ()))
        self.prefill_budget = prefill_budget or default_prefill_budget(
            self.largest_chunk, self._batching, jax.default_backend())
        self.prefix_cache = prefix_cache
        self.eos_ids = frozenset(engine.eos_ids if eos_ids is None else eos_ids)
        self.max_len = engine.max_len
        self.vocab_size = engine.vocab_size
        self.grammar = None
        if tokenizer is not None:
            from sampling.grammar import GrammarCompiler
            self.grammar = GrammarCompiler(tokenizer, engine.vocab_size, self.eos_ids)

        self._lock = threading.Lock()
        self._queue: collections.deque[RequestState] = collections.deque()
        self._wake_event = threading.Event()
        self._stopping = False
        self._failed: str | None = None
        self._step_failures = 0                              # consecutive, device thread
        self._device_thread: threading.Thread | None = None
        self._detok_thread: threading.Thread | None = None
        self._detok_q: queue.Queue = queue.Queue()

        s = engine.max_slots
        self._free: list[int] = list(range(s))               # taken lowest first
        self._owner: list[Sample | None] = [None] * s        # decoding sample per slot
        self._slot_tokens: list[np.ndarray] = [np.zeros(0, np.int32)] * s
        # the steering its KV was computed under (EngineRequest.steering_key; b"": none),
        # and whether its engine steering row is non-zero
        self._slot_key: list[bytes] = [b""] * s
        self._slot_steered: list[bool] = [False] * s
        self._prefilling: list[RequestState] = []
        self._running: set[int] = set()                      # ids of admitted RequestStates
        self.kv = None                                       # paged KV bookkeeping
        if getattr(engine, "paged", False):
            from serving.engine.paged_kv import PagedKV
            self.kv = PagedKV(engine, prefix_cache)
        self._preempted_now: list[Sample] = []               # this iteration's, paged
        self._resume: collections.deque[RequestState] = collections.deque()
        from serving.engine.beam_jobs import BeamJobs
        self.beams = BeamJobs(self)      # use_beam_search requests (serving/beam_search.py)
        from serving.engine.spec_jobs import SpecJobs
        self.spec = SpecJobs(self, speculative)   # speculative decoding (spec_jobs.SpecConfig)
        # decode steps per dispatch when every live row allows (serving/engine/multi_step.py)
        self.decode_steps = getattr(engine, "decode_steps", 1)
        self._preempted_this_iter = False
        self.requests_finished = 0
        self.tokens_generated = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> "Scheduler":
        self._device_thread = threading.Thread(target=self._device_main, name="engine-device",
                                               daemon=True)
        self._detok_thread = threading.Thread(target=self._detok_main, name="engine-detok",
                                              daemon=True)
        self._detok_thread.start()
        self._device_thread.start()
        return self

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new requests, let running ones finish (up to the timeout), then stop."""
        with self._lock:
            self._stopping = True
        deadline = time.monotonic() + drain_timeout_s
        while time.monotonic() < deadline and self._busy():
            time.sleep(0.02)
        with self._lock:
            self._failed = self._failed or "the engine is shutting down"
        self._wake()
        if self._device_thread is not None:
            self._device_thread.join(timeout=10)
        self._detok_q.put(None)
        if self._detok_thread is not None:
            self._detok_thread.join(timeout=10)

    @property
    def failed(self) -> str | None:
        """Why the engine stopped serving (broken or shut down), else None."""
        return self._failed

    @property
    def healthy(self) -> bool:
        return self._failed is None and not self._stopping

    def _busy(self) -> bool:
        with self._lock:
            return bool(self._queue or self._prefilling or self._running or self.beams
                        or self.spec)

    def _wake(self) -> None:
        self._wake_event.set()

    def stats(self) -> dict:
        with self._lock:
            return {"queue_depth": len(self._queue),
                    "slots_in_use": self.engine.max_slots - len(self._free),
                    "max_slots": self.engine.max_slots,
                    "requests_finished": self.requests_finished,
                    "tokens_generated": self.tokens_generated,
                    **(self.kv.stats() if self.kv is not None else {}),
                    **self.spec.stats()}

    # -- admission (any thread) ---------------------------------------------------------------

    def submit(self, request: EngineRequest) -> Handle:
        """Queue a validated request; RESOURCE_EXHAUSTED when the queue is full."""
        if request.sampling.use_beam_search:
            return self.beams.submit(request)
        if request.speculative is not None:   # a job, unless busy (then the batched path)
            handle = self.spec.submit(request)
            if handle is not None:
                return handle
        handle = Handle(request, wake=self._wake)
        state = RequestState(request=request, handle=handle, prompt=list(request.prompt_ids))
        n = request.sampling.n
        if request.variants:      # variant i's sample j: index i*n + j, PRNG index j
            state.samples = [Sample(state, i * n + j, params=p, draw_index=j)
                             for i, p in enumerate(request.variants) for j in range(n)]
        else:
            state.samples = [Sample(state, i) for i in range(n)]
        with self._lock:
            if self._failed is not None or self._stopping:
                raise RequestError(UNAVAILABLE, self._failed or "the engine is shutting down")
            if len(self._queue) >= self.max_queue:
                raise RequestError(RESOURCE_EXHAUSTED, f"the admission queue is full "
                                   f"({self.max_queue} requests waiting); retry later")
            self._queue.append(state)
        self._wake()
        return handle

    # -- the device thread ----------------------------------------------------------------------

    def _device_main(self) -> None:
        try:
            self._device_loop()
        except Exception as e:  # the device state may be lost: fail everything, stay down
            log.error("engine device loop failed:\n%s", traceback.format_exc())
            with self._lock:
                self._failed = f"engine failure: {e}"
            self._fail_all(INTERNAL, f"engine failure: {e}")

    def _device_loop(self) -> None:
        inflight = None          # (Pending, owners snapshot) of the last dispatched step
        while True:
            self._wake_event.clear()
            with self._lock:
                if self._failed is not None:
                    break
            self._reap()
            if self.kv is not None:
                self._grow()
            inserted = [] if self._preempted_this_iter else self._admit_and_prefill()
            if self.beams:
                self.beams.step()       # one step of each running beam search
            if self.spec:
                self.spec.step()        # one verify of each speculative job
            dispatched = None
            owners = list(self._owner)
            k = self._multi_steps(owners, inserted)
            if k > 1:
                # K decode steps in one program (serving/engine/multi_step.py), dispatched
                # before the step in flight is read, as a single step is
                pending = self._guard_step(
                    lambda: self._dispatch_multi(k, owners, inflight), owners)
                dispatched = (pending, owners) if pending is not None else None
            elif any(o is not None and not o.device_done and o.constraint is not None
                   for o in owners):
                # a constrained row's mask needs the token just sampled: dispatch the
                # forward pass (it reads that token on the device), read the token on the
                # host while it runs, fill the masks, then dispatch the sampler
                forward = self._guard_step(self.engine.forward_step, owners)
                if inflight is not None:
                    self._process_step(*inflight)
                    inflight = None
                for sample, pending in inserted:
                    self._process_first(sample, pending)
                inserted = []
                if forward is not None:
                    pending = self._guard_step(
                        lambda: self.engine.sample_step(forward, self._masks()), owners)
                    dispatched = (pending, owners) if pending is not None else None
            elif any(o is not None and not o.device_done for o in owners):
                pending = self._guard_step(self.engine.step, owners)
                dispatched = (pending, owners) if pending is not None else None
            if inflight is not None:
                self._process_step(*inflight)
            for sample, pending in inserted:
                self._process_first(sample, pending)
            inflight = dispatched
            if self.kv is not None:
                self._requeue_preempted()
            if (inflight is None and not inserted and not self._prefilling and not self.beams
                    and not self.spec):
                self._wake_event.wait(IDLE_WAIT_S)
        if inflight is not None:
            inflight[0].result()
        self._fail_all(UNAVAILABLE, self._failed or "the engine stopped")

    def _multi_steps(self, owners, inserted) -> int:
        """K for this iteration's decode: `decode_steps` when every live row may run on the
        device without the host (multi_step.py: no grammar, the default sampler order, not
        deterministic, few stop ids; the lean or the full sampler) and nobody waits (no
        queued, prefilling or resumed request, no first token just sampled, no beam or
        speculative job), else 1. Paged:
        every live row must get the blocks of its next K positions without preempting."""
        k = self.decode_steps
        if k == 1 or inserted or self.beams or self.spec or self._preempted_this_iter:
            return 1
        live = [o for o in owners if o is not None and not o.device_done]
        if not live or self._queue or self._prefilling or self._resume or self._preempted_now:
            return 1
        if not self.engine.multi_step_ok():
            return 1
        width = self.engine.max_stop_ids
        for sample in live:
            p = sample.sampling
            if sample.constraint is not None or sample.state.cancelled or sample.text_done:
                return 1
            if len(set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids)) > width:
                return 1
        if self.kv is not None and not self._grow_ahead(k):
            return 1
        return k

    def _dispatch_multi(self, k: int, owners, inflight):
        """One multi-step call: each live row's budget, min_tokens and stop ids exactly as
        `_take` decides them, so the device stops where the host would. A row's count
        includes what the call in flight (not read yet) adds to it if it does not stop
        there: one token (a single step) or its `advance` (a multi-step call); if it does
        stop there, it is inactive on the device and runs no further."""
        from serving.engine.multi_step import stop_rows
        ahead = np.zeros(len(owners), np.int64)
        if inflight is not None:
            pending, before = inflight
            advance = getattr(pending, "advance", None)
            for slot, sample in enumerate(before):
                if sample is not None and owners[slot] is sample:
                    ahead[slot] = 1 if advance is None else advance[slot]
        rows = {}
        for slot, sample in enumerate(owners):
            if sample is None or sample.device_done:
                continue
            p, count = sample.sampling, len(sample.tokens) + int(ahead[slot])
            budget = self.max_len - len(sample.state.prompt) - count
            if p.max_tokens is not None:
                budget = min(budget, p.max_tokens - count)
            ids = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids)
            rows[slot] = (budget, p.min_tokens - count, ids)
        budget, min_left, stop_ids = stop_rows(self.engine.max_slots,
                                               self.engine.max_stop_ids, rows)
        return self.engine.multi_step(k, budget, min_left, stop_ids)

    def _masks(self):
        """Allowed-token bitmasks for the next step: constrained rows filled, others ones."""
        from sampling.grammar import all_ones
        mask = all_ones(self.engine.max_slots, self.vocab_size)
        for slot, sample in enumerate(self._owner):
            c = sample.constraint if sample is not None else None
            if c is not None and not sample.device_done and c.active:
                c.fill(mask[slot])
        return mask

    # -- slots given back (device thread); failures are contained in containment.py ----------

    def _release(self, slot: int, tokens: np.ndarray) -> None:
        owner = self._owner[slot]
        if owner is not None and owner.sampling.deterministic:
            # generated tokens' KV came from decode steps, not the grid prefill a later
            # deterministic prompt would run: cache the prompt's blocks only
            tokens = tokens[:len(owner.state.prompt)]
        self.engine.release(slot)
        self._owner[slot] = None
        self._slot_tokens[slot] = tokens
        if self.kv is not None:
            self.kv.free(slot, tokens)
        with self._lock:
            self._free.append(slot)

    def _reap(self) -> None:
        """Free the slots of samples that ended (stop, length, cancel) since the last step."""
        for slot, sample in enumerate(self._owner):
            if sample is None:
                continue
            st = sample.state
            if not sample.device_done and (st.cancelled or sample.text_done):
                sample.device_done = True
                if st.cancelled:
                    self._detok_q.put(("end", sample, "abort"))
            if sample.device_done:
                kv = np.asarray(st.prompt + sample.tokens[:-1], np.int32)
                self._release(slot, kv)
                if all(s.device_done for s in st.samples) and not any(
                        o is not None and o.state is st for o in self._owner):
                    with self._lock:
                        self._running.discard(id(st))
        # cancelled while prefilling: give back the reserved slots
        for st in [p for p in self._prefilling if p.cancelled]:
            with self._lock:
                self._prefilling.remove(st)
                self._running.discard(id(st))
            for k, slot in enumerate(st.slots):
                kv = np.asarray(st.prompt[:st.prefill_pos] if k == 0 else [], np.int32)
                self._slot_tokens[slot] = kv
                if self.kv is not None:
                    self.kv.free(slot)
                with self._lock:
                    self._free.append(slot)
            for sample in st.samples:
                sample.device_done = True
                self._detok_q.put(("end", sample, "abort"))
            if st.parent is not None:
                self._maybe_done(st.parent)

    def _best_prefix(self, prompt: np.ndarray, key: bytes = b"") -> tuple[int, int]:
        """(length, slot) of the longest cached prefix of `prompt` computed under the same
        steering (`key`); free slots win ties."""
        best_len, best_slot = 0, -1
        free = set(self._free)
        for slot, kv in enumerate(self._slot_tokens):
            n = _common_prefix(kv, prompt) if self._slot_key[slot] == key else 0
            if n > best_len or (n == best_len and n > 0 and slot in free and best_slot not in free):
                best_len, best_slot = n, slot
        return best_len, best_slot

    def _next_admissible(self) -> RequestState | None:
        """Pop the queue head into reserved slots when enough are free (FIFO, no skipping;
        preempted samples first)."""
        if self.kv is not None and self._resume:
            return self._next_resume()
        while True:
            with self._lock:
                if not self._queue:
                    return None
                st = self._queue[0]
                if st.cancelled:
                    self._queue.popleft()
                    cancelled = True
                elif len(self._free) < len(st.samples) or (
                        self.kv is not None and not self.kv.can_admit(
                            st.prompt, len(st.samples), self._decoding(),
                            st.request.steering_key)):
                    return None
                else:
                    self._queue.popleft()
                    cancelled = False
            if cancelled:
                for sample in st.samples:
                    sample.device_done = True
                    self._detok_q.put(("end", sample, "abort"))
                continue
            try:
                return self._reserve(st)
            except Exception as e:
                self._contain("admitting", [st], e)
                if self._failed is not None:
                    return None

    def _reserve(self, st: RequestState) -> RequestState:
        """Slots for a popped request (prefix reuse, prompt scoring); it is prefilling."""
        if self.kv is not None:
            return self._reserve_paged(st)
        prompt = np.asarray(st.prompt, np.int32)
        key = st.request.steering_key
        length, src = self._best_prefix(prompt, key) if self.prefix_cache else (0, -1)
        length = min(length, len(prompt) - 1)
        if st.request.sampling.deterministic:   # its prefill starts on the grid
            length -= length % self.engine.block_size
        with self._lock:
            # reuse a free slot in place only when the prompt extends all it holds (or no
            # other slot is free); otherwise copy, so its longer cached sequence survives
            in_place = length > 0 and src in self._free and (
                length >= len(self._slot_tokens[src]) or len(self._free) == len(st.samples))
            if in_place:
                target = src
                self._free.remove(src)
            else:
                # the lowest free slot: decode steps run over the leading slots only
                target = min(s for s in self._free if s != src)
                self._free.remove(target)
            others = []
            for _ in range(len(st.samples) - 1):
                others.append(min(self._free))
                self._free.remove(others[-1])
            self._prefilling.append(st)
            self._running.add(id(st))
            st.slots = [target] + others     # from here a failure gives them back
        for slot in [target] + others:
            if slot != src:
                self._keep_cached(slot, avoid=src)
            self._slot_key[slot] = key
        self._steer_slots(st.request, [target] + others)
        if length > 0 and src != target:
            self.engine.copy_prefix(src, target, length)
        if st.request.sampling.prompt_logprobs is not None:
            self._score_prompt(st)
        st.slots = [target] + others
        st.prefill_pos = length
        st.cached_tokens = length
        st.admitted = time.monotonic()
        self._slot_tokens[target] = prompt[:length]
        for slot in others:
            self._slot_tokens[slot] = np.zeros(0, np.int32)
        return st

    def _keep_cached(self, slot: int, avoid: int) -> None:
        """A low slot is about to be overwritten: move what it caches to the least recently
        used free slot above it, so low-first allocation does not cost the prefix cache."""
        held = self._slot_tokens[slot]
        if not len(held):
            return
        with self._lock:   # the free slot above caching the least (least recently used first)
            above = [s for s in self._free if s > slot and s != avoid]
        spare = min(above, key=lambda s: len(self._slot_tokens[s]), default=None)
        if spare is not None and len(self._slot_tokens[spare]) < len(held):
            self.engine.copy_prefix(slot, spare, len(held))
            self._slot_tokens[spare] = held
            self._slot_key[spare] = self._slot_key[slot]

    def _steer_slots(self, req, slots: list[int]) -> None:
        """Write the request's steering rows (zeros where a steered request left some)."""
        for slot in slots:
            if req.steering is not None or self._slot_steered[slot]:
                self.engine.set_steering(slot, req.steering)
                self._slot_steered[slot] = req.steering is not None

    # -- running samples (device thread); the paged pool's growth and preemption are in
    #    preemption.py ---------------------------------------------------------------------

    def _decoding(self) -> int:
        return sum(1 for o in self._owner if o is not None and not o.device_done)

    def _maybe_done(self, st: RequestState) -> None:
        """Drop a request from the running set once no sample of it holds or awaits a slot."""
        if all(s.device_done for s in st.samples) and not any(
                o is not None and o.state is st for o in self._owner):
            with self._lock:
                self._running.discard(id(st))

    def _score_prompt(self, st: RequestState) -> None:
        """prompt_logprobs: one forward over the prompt (compiled per power-of-two length on
        first use; the scoring path, not the serving path)."""
        from model.scoring import prompt_logprobs
        k = st.request.sampling.prompt_logprobs
        t0 = time.perf_counter()
        score = getattr(self.engine, "score_prompt", None)   # lockstep: every process
        lp, rank, ids, tops = (score(st.prompt, k) if score is not None else
                               prompt_logprobs(self.engine.config, self.engine.params,
                                               st.prompt, k))
        st.gpu_seconds += time.perf_counter() - t0
        st.prompt_logprobs = [
            TokenLogprob(int(t), float(lp[i]), int(rank[i]), [int(x) for x in ids[i]],
                         [float(x) for x in tops[i]])
            for i, t in enumerate(st.prompt[1:])]

    def _admit_and_prefill(self) -> list:
        """Prefill work within the token budget; returns [(sample, insert Pending)]."""
        spent = 0
        inserted = []
        batch = []           # fresh prompts set aside for one batched prefill
        while True:
            st = self._prefilling[0] if self._prefilling else self._next_admissible()
            if st is None or self._failed is not None:
                break
            try:
                target = st.slots[0]
                remaining = len(st.prompt) - st.prefill_pos
                det = st.request.sampling.deterministic
                if remaining > self.largest_chunk:
                    cost = self.largest_chunk
                    if det:                  # chunks on the grid (DeviceEngine._grid_prefill)
                        cost = max(cost - cost % self.engine.block_size,
                                   self.engine.block_size)
                    if spent and spent + cost > self.prefill_budget:
                        break
                    chunk = st.prompt[st.prefill_pos:st.prefill_pos + cost]
                    self.engine.prefill_chunk(target, chunk, st.prefill_pos, det)
                    st.prefill_pos += cost
                    self._slot_tokens[target] = np.asarray(st.prompt[:st.prefill_pos],
                                                           np.int32)
                    if self.kv is not None:
                        self.kv.filled(target, st.prompt[:st.prefill_pos])
                    spent += cost
                    continue
                cost = remaining + len(st.samples) - 1
                if spent and spent + cost > self.prefill_budget:
                    break
                spent += cost
                # a fresh one-sample prompt waits for the batched prefill below
                batchable = (self._batching and st.prefill_pos == 0 and len(st.samples) == 1
                             and not det)
                inserted += self._insert(st, batch if batchable else None)
            except Exception as e:
                self._contain("prefilling or inserting", [st], e)
                if self._failed is not None:
                    break
        return inserted + self._insert_batch(batch)

    def _insert_batch(self, batch: list) -> list:
        """Dispatch the prompts `_insert` set aside in one go (DeviceEngine.insert_many:
        similar lengths share one prefill program; one prompt alone runs `insert`)."""
        if not batch or self._failed is not None:
            states = [st for st, _, _ in batch]
            for st in states:
                self._fail_request(st, self._failed or "the engine stopped")
            return []
        try:
            pendings = self.engine.insert_many([args for _, _, args in batch])
        except Exception as e:
            self._contain("prefilling or inserting", [st for st, _, _ in batch], e)
            return []
        return [self._inserted(st, sample, args["slot"], args["prompt_ids"], pending)
                for (st, sample, args), pending in zip(batch, pendings)]

    def _inserted(self, st: RequestState, sample: Sample, slot: int, prompt: np.ndarray,
                  pending) -> tuple:
        """Bookkeeping once a sample's insert is dispatched: it owns `slot` now."""
        sample.slot = slot
        self._owner[slot] = sample
        self._slot_tokens[slot] = prompt
        if self.kv is not None:
            self.kv.filled(slot, prompt)
            if st.parent is not None:
                st.parent.slots[sample.index] = slot
        return sample, pending

    def _insert(self, st: RequestState, batch: list | None = None) -> list:
        """Insert every sample of a prefilled request; `batch` (a fresh one-sample
        request): set the insert aside in it for `_insert_batch` instead."""
        with self._lock:
            self._prefilling.remove(st)
        req, prompt = st.request, np.asarray(st.prompt, np.int32)
        out = []
        for k, sample in enumerate(st.samples):
            slot = st.slots[k]
            start = st.prefill_pos
            if k > 0:
                start = len(prompt) - 1
                if self.kv is not None:
                    self.kv.fork(st.slots[0], slot, start)
                else:
                    self.engine.copy_prefix(st.slots[0], slot, start)
            mask = None
            if st.parent is None and (req.grammar is not None or req.sampling.thinking_end_ids):
                sample.constraint = self.grammar.constraint(req.grammar, req.sampling)
            if sample.constraint is not None and sample.constraint.active:
                from sampling.grammar import all_ones
                mask = all_ones(1, self.vocab_size)[0]
                sample.constraint.fill(mask)
            # a resumed sample (st.parent set): its generated tokens end `prompt`
            args = dict(sampling=sample.sampling, seed=req.seed, sample_index=sample.key_index,
                        mask=mask,
                        prompt_len=len(st.parent.prompt) if st.parent is not None else None,
                        carry=sample.carry if st.parent is not None else None)
            if batch is not None:
                batch.append((st, sample, dict(args, slot=slot, prompt_ids=prompt)))
                continue
            pending = self.engine.insert(slot, prompt, start, **args)
            out.append(self._inserted(st, sample, slot, prompt, pending))
        return out

    def _process_first(self, sample: Sample, pending) -> None:
        try:
            out = pending.result()
        except Exception as e:
            self._contain("sampling the first token", [sample.state], e)
            return
        st = sample.state
        st.gpu_seconds += out.device_seconds
        if st.first_token is None:
            st.first_token = time.monotonic()
        if not sample.device_done:
            self._take_contained(sample, out, 0)

    def _process_step(self, pending, owners) -> None:
        try:
            out = pending.result()
        except Exception as e:
            self._step_failed(owners, e)
            return
        self._step_failures = 0
        active = [o for o in owners if o is not None]
        share = out.device_seconds / max(len(active), 1)
        for sample in active:
            sample.state.gpu_seconds += share
        if getattr(out, "steps", None) is not None:
            self._process_multi(out, owners)
            return
        for slot, sample in enumerate(owners):
            if sample is not None and not sample.device_done:
                self._take_contained(sample, out, slot)

    def _process_multi(self, out, owners) -> None:
        """A multi-step call's tokens, step by step, each row's in order through `_take`
        (which stops a row at the token where the device stopped it)."""
        for j, step in enumerate(out.steps):
            for slot, sample in enumerate(owners):
                if sample is not None and not sample.device_done and out.wrote[j, slot]:
                    self._take_contained(sample, step, slot)
        for slot, sample in enumerate(owners):    # never: the device and _take disagree
            if sample is not None and not sample.device_done and not out.wrote[-1, slot]:
                self._contain("multi-step decode", [sample.state], RuntimeError(
                    f"slot {slot} stopped on the device after {len(sample.tokens)} tokens "
                    "but not on the host"))

    def _take_contained(self, sample: Sample, out, row: int) -> None:
        """`_take`, with a host-side failure (a grammar's consume, say) failing that
        request alone."""
        try:
            self._take(sample, out, row)
        except Exception as e:
            self._contain("taking its token", [sample.state], e)

    def _take(self, sample: Sample, out, row: int) -> None:
        """One new token for a sample: token-level stops, then off to the detokenizer."""
        st, params = sample.state, sample.sampling
        token = int(out.tokens[row])
        sample.tokens.append(token)
        if sample.constraint is not None:
            sample.constraint.consume(token)
        count = len(sample.tokens)
        finish, stop_id = None, None
        if bool(out.errors[row]):
            finish = "error"
        elif count > params.min_tokens and token in params.stop_token_ids:
            finish, stop_id = "stop", token
        elif count > params.min_tokens and not params.ignore_eos and token in self.eos_ids:
            finish, stop_id = "stop", token
        elif sample.constraint is not None and sample.constraint.finished:
            finish = "stop"
        elif params.max_tokens is not None and count >= params.max_tokens:
            finish = "length"
        elif len(st.prompt) + count >= self.max_len:
            finish = "length"
        lp = None
        if params.logprobs or params.top_logprobs:
            k = params.top_logprobs
            lp = TokenLogprob(token, float(out.logprobs[row]), int(out.ranks[row]),
                              [int(t) for t in out.top_ids[row][:k]],
                              [float(v) for v in out.top_logprobs[row][:k]])
            if params.logprobs_mode in ("unconstrained", "all"):
                lp.raw_logprob = float(out.raw_logprobs[row])
                lp.constrained_logprob = float(out.processed_logprobs[row])
                lp.unconstrained_logprob = float(out.unconstrained_logprobs[row])
                lp.removed_mass = float(out.removed_mass[row])
        if st.request.variants is not None:        # the metrics' inputs
            sample.raw_logprobs.append(float(out.raw_logprobs[row]))
            sample.entropies.append(float(out.entropies[row]))
        if finish is not None:
            sample.device_done = True
        self.tokens_generated += 1
        self._detok_q.put(("token", sample, token, lp, finish, stop_id))

    def _close(self, st: RequestState, final) -> None:
        if st.closed:
            return
        st.closed = True
        for s in st.samples:
            s.text_done = True
        with self._lock:
            self.requests_finished += 1
        st.handle.put(final)
        self._wake()
