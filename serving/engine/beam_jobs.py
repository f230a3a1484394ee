"""Beam-search requests inside the batch server, on its device thread.

A `use_beam_search` request does not take the continuous batcher's slots: it runs
serving/beam_search.py's loop (its own W-row KV cache, W = best_of or n), and the
scheduler's device loop advances every running beam search by ONE beam step per loop
iteration, between its decode steps. So the device keeps a single owning thread, a long
beam search never stalls the other requests, and the other requests never change a beam
search's result (it shares nothing with them). When a search ends, its n beams go back as
n complete `Delta`s (sample i = the i-th best beam: its tokens, text, finish reason, with
`logprobs` each token's logprob / rank / top alternatives, and, in `metrics`, `beam_score`
and `cumulative_logprob`), then the `Usage`. Not streamed.
"""

from __future__ import annotations

import collections
import threading
import time
import traceback

from serving.engine.requests import (INTERNAL, INVALID_ARGUMENT, RESOURCE_EXHAUSTED,
                                     UNAVAILABLE, Delta, Failure, Handle, RequestError,
                                     TokenLogprob, Usage)

MAX_RUNNING = 4       # beam searches advanced together; the rest wait in order


class BeamJobs:
    def __init__(self, scheduler):
        self.s = scheduler
        self._lock = threading.Lock()
        self._waiting: collections.deque = collections.deque()
        self._running: list = []
        self._searcher = None

    def __bool__(self) -> bool:
        return bool(self._waiting or self._running)

    def submit(self, request) -> Handle:
        """Queue a validated beam-search request (any thread)."""
        import jax
        if jax.process_count() > 1:     # its loop is not replayed by lockstep followers
            raise RequestError(INVALID_ARGUMENT, "use_beam_search: not available on an "
                               "engine that spans several processes")
        handle = Handle(request, wake=self.s._wake)
        with self._lock:
            if not self.s.healthy:
                raise RequestError(UNAVAILABLE, self.s.failed or "the engine is shutting down")
            if len(self._waiting) >= self.s.max_queue:
                raise RequestError(RESOURCE_EXHAUSTED, "the beam-search queue is full; retry "
                                   "later")
            self._waiting.append(handle)
        self.s._wake()
        return handle

    def step(self) -> None:
        """Device thread: start waiting searches, advance each running one by one step."""
        while self._waiting and len(self._running) < MAX_RUNNING:
            with self._lock:
                handle = self._waiting.popleft()
            req = handle.request
            if self._searcher is None:
                from serving.beam_search import BeamSearcher
                e = self.s.engine
                self._searcher = BeamSearcher(e.config, e.params, e.max_len,
                                              sorted(self.s.eos_ids))
            job = dict(handle=handle, started=time.monotonic(), busy=0.0,
                       steps=self._searcher.steps(req.prompt_ids, req.sampling))
            self._running.append(job)
        for job in list(self._running):
            handle = job["handle"]
            if handle.cancelled:
                self._running.remove(job)
                handle.put(Failure(UNAVAILABLE, "cancelled"))
                continue
            t0 = time.monotonic()
            try:
                next(job["steps"])
                job["busy"] += time.monotonic() - t0
            except StopIteration as done:
                job["busy"] += time.monotonic() - t0
                self._running.remove(job)
                self._finish(job, done.value)
            except Exception as e:      # this request fails, the engine goes on
                self._running.remove(job)
                handle.put(Failure(INTERNAL, f"beam search failed: {e}"))
                traceback.print_exc()

    def fail_all(self, kind: str, message: str) -> None:
        with self._lock:
            jobs = [j["handle"] for j in self._running] + list(self._waiting)
            self._running, self._waiting = [], collections.deque()
        for handle in jobs:
            handle.put(Failure(kind, message))

    def _finish(self, job, beams) -> None:
        handle = job["handle"]
        req, p = handle.request, handle.request.sampling
        tok = self.s.tokenizer
        for i, b in enumerate(beams):
            stop_id = b.token_ids[-1] if b.finish_reason == "stop" else None
            shown = b.token_ids if stop_id is None or p.include_stop_str_in_output else b.token_ids[:-1]
            text = tok.decode(shown, skip_special_tokens=req.skip_special_tokens) if tok else ""
            lps = [TokenLogprob(t, lp, rank, ids, tops) for t, (lp, rank, ids, tops)
                   in zip(b.token_ids, b.logprobs or ())]
            handle.put(Delta(index=i, token_ids=list(b.token_ids), text=text, logprobs=lps,
                             finish_reason=b.finish_reason, stop_token_id=stop_id,
                             metrics={"beam_score": b.score,
                                      "cumulative_logprob": b.cumulative_logprob}))
        now = time.monotonic()
        seed = req.seed if req.seed < 2 ** 63 else req.seed - 2 ** 64
        handle.put(Usage(prompt_tokens=len(req.prompt_ids),
                         completion_tokens=sum(len(b.token_ids) for b in beams),
                         cached_tokens=0, gpu_seconds=job["busy"],
                         queue_time=job["started"] - req.arrival, ttft=now - req.arrival,
                         seed=seed))
        with self.s._lock:
            self.s.requests_finished += 1
