"""Speculative-decoding requests inside the batch server, on its device thread.

At batch 1 a decode step is memory bound, so verifying K drafted tokens in one forward
costs about one step (serving/speculative.py). Continuous batching already fills that
idle compute with other requests, so speculation only pays while the engine is nearly
idle (vLLM's `speculative_disable_by_batch_size`). A request that asks for it (or gets the
server default, `--speculative ngram[:K]`) therefore runs as a job here only when at most
`max_batch` sequences would then be running and fewer than `max_jobs` jobs hold a cache;
otherwise it goes down the normal batched path, with the same answer distribution.

A job is serving/speculative.py's batch-1 loop (`SpeculativeDecoder.steps`: its own KV
cache, the exact acceptance rule), advanced by ONE verify per scheduler iteration between
the batched decode steps, so the device keeps one owning thread and nobody stalls. Its
tokens travel the normal path: a `RequestState` with one `Sample` whose tokens go to the
detokenize thread (stop strings, text deltas, the final `Usage`); EOS, stop ids and
max_tokens are decided by the loop like `Scheduler._take` decides them. Cancelling frees
the job at the next iteration; its decoder (and cache) goes back to a small pool.
"""

from __future__ import annotations

import collections
import threading
import time
import traceback
from dataclasses import dataclass

from serving.engine.requests import (INTERNAL, INVALID_ARGUMENT, UNAVAILABLE, Failure, Handle,
                                     RequestError, RequestState, Sample)


@dataclass
class SpecConfig:
    """The engine's speculative settings (`flaxserve engine --speculative ...`)."""
    method: str = "none"        # the default for requests that do not say: none | ngram | draft
    num_tokens: int = 4         # K, when the request does not say
    max_batch: int = 1          # speculate only while at most this many sequences run
    max_jobs: int = 2           # jobs holding a batch-1 cache at once
    draft: tuple | None = None  # (config, params) of --draft-model
    draft_name: str = ""


def parse_flag(text: str) -> tuple[str, int]:
    """'ngram', 'ngram:6', 'draft:3', 'none' -> (method, K); ValueError naming the flag."""
    method, _, k = (text or "").partition(":")
    if method not in ("none", "ngram", "draft"):
        raise ValueError(f"--speculative: expected none, ngram[:K] or draft[:K], got {text!r}")
    try:
        num = int(k) if k else 4
    except ValueError:
        raise ValueError(f"--speculative: K must be an integer, got {k!r}") from None
    if not 1 <= num <= 16:
        raise ValueError(f"--speculative: K must be in [1, 16], got {num}")
    return method, num


def add_arguments(parser) -> None:
    """The engine's speculative flags (`flaxserve engine` and `serve`)."""
    parser.add_argument("--speculative", default=None, metavar="ngram[:K]|draft[:K]",
                        help="exact speculative decoding by default for eligible requests "
                             "(docs/speed.md); a request opts out with speculative: null")
    parser.add_argument("--draft-model", default=None, metavar="REF",
                        help="draft model (same tokenizer) for speculative method 'draft'")
    parser.add_argument("--speculative-max-batch", type=int, default=None, metavar="N",
                        help="speculate only while at most N sequences run (default 1); "
                             "busier, requests take the batched path")
    parser.add_argument("--speculative-max-jobs", type=int, default=None, metavar="N",
                        help="speculative requests holding their own cache at once (default 2)")


def config_from_args(args, dtype=None) -> SpecConfig:
    method, k = parse_flag(args.speculative) if args.speculative else ("none", 4)
    cfg = SpecConfig(method=method, num_tokens=k)
    for name in ("speculative_max_batch", "speculative_max_jobs"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    cfg.max_batch = args.speculative_max_batch or cfg.max_batch
    cfg.max_jobs = args.speculative_max_jobs or cfg.max_jobs
    if method == "draft" and not args.draft_model:
        raise ValueError("--speculative draft needs --draft-model")
    if args.draft_model:
        from serving.speculative import load_draft
        cfg.draft = load_draft(args.draft_model, dtype=dtype)
        cfg.draft_name = args.draft_model
    return cfg


class SpecJobs:
    def __init__(self, scheduler, config: SpecConfig | None = None):
        self.s = scheduler
        self.config = config or SpecConfig()
        self._lock = threading.Lock()
        self._waiting: collections.deque = collections.deque()
        self._running: list = []
        self._idle: list = []          # SpeculativeDecoders (each holds a cache) to reuse
        self.requests = self.draft_tokens = self.accepted_tokens = self.fallbacks = 0

    def __bool__(self) -> bool:
        return bool(self._waiting or self._running)

    # -- admission (any thread) ---------------------------------------------------------------

    def choose(self, params, variants=None, steering=None) -> tuple[str, int] | None:
        """(method, K) for a validated request, or None (the batched path). A request that
        asked for speculation explicitly and cannot have it gets INVALID_ARGUMENT naming
        why; one that only had the server default goes batched silently."""
        spec = params.speculative
        explicit = spec is not None
        method = spec.get("method", "ngram") if explicit else self.config.method
        if method == "none":
            return None
        k = (spec.get("num_tokens") if explicit else None) or self.config.num_tokens
        why = self._refusal(params, method, variants, steering)
        if why is None:
            return method, k
        if explicit:
            raise RequestError(INVALID_ARGUMENT, why)
        return None

    def _refusal(self, params, method, variants, steering) -> str | None:
        import jax

        from serving.speculative import check_supported
        if method == "draft" and self.config.draft is None:
            return ("speculative.method: 'draft' needs an engine started with --draft-model")
        if jax.process_count() > 1:
            return "speculative: not available on an engine that spans several processes"
        if params.n != 1 or (params.best_of or 1) != 1:
            return "n: speculative decoding runs one sample (n=1); drop speculative for n > 1"
        if params.use_beam_search:
            return "use_beam_search: not combined with speculative"
        if params.logprobs or params.top_logprobs:
            return ("logprobs: not returned by speculative decoding (ranks are not "
                    "computed); drop logprobs or speculative")
        if variants is not None or steering is not None:
            return "variants/steering: not combined with speculative"
        try:
            check_supported(params)
        except ValueError as e:
            return str(e)
        return None

    def submit(self, request) -> Handle | None:
        """A Handle if the request runs as a job, None when the engine is too busy or the
        job cap is reached (the caller then takes the batched path)."""
        s, cfg = self.s, self.config
        with self._lock:
            # what still runs: a sample whose text ended (a stop string, its last token
            # sent) is not counted, though its slot is freed at the next iteration only
            jobs = len(self._waiting) + sum(1 for j in self._running
                                            if not j["st"].samples[0].text_done)
            others = (sum(1 for o in list(s._owner) if o is not None and not o.device_done
                          and not o.text_done) + len(s._queue) + len(s._prefilling))
            if jobs >= cfg.max_jobs or jobs + others + 1 > cfg.max_batch:
                self.fallbacks += 1
                return None
            if not s.healthy:
                raise RequestError(UNAVAILABLE, s.failed or "the engine is shutting down")
            handle = Handle(request, wake=s._wake)
            st = RequestState(request=request, handle=handle, prompt=list(request.prompt_ids))
            st.samples = [Sample(st, 0)]
            method, k = request.speculative
            st.speculative = {"method": method, "num_tokens": k, "draft_tokens": 0,
                              "accepted_tokens": 0, "verify_steps": 0}
            self._waiting.append(st)
        s._wake()
        return handle

    def stats(self) -> dict:
        return {"spec_requests": self.requests, "spec_draft_tokens": self.draft_tokens,
                "spec_accepted_tokens": self.accepted_tokens,
                "spec_acceptance_rate": (self.accepted_tokens / self.draft_tokens
                                         if self.draft_tokens else 0.0),
                "spec_fallbacks": self.fallbacks, "spec_running": len(self._running)}

    # -- the device thread --------------------------------------------------------------------

    def _decoder(self, method: str, k: int):
        for i, d in enumerate(self._idle):
            if d.method == method and d.k == k:
                return self._idle.pop(i)
        while self._idle and len(self._idle) + len(self._running) >= self.config.max_jobs:
            self._idle.pop(0)                       # its cache goes with it
        from serving.speculative import SpeculativeDecoder
        e = self.s.engine
        draft_config, draft_params = self.config.draft or (None, None)
        return SpeculativeDecoder(e.config, e.params, method=method, num_tokens=k,
                                  max_len=e.max_len, draft_config=draft_config,
                                  draft_params=draft_params,
                                  token_limit=getattr(e, "token_limit", None))

    def _start(self, st) -> None:
        from serving.speculative import SpeculativeResult
        method, k = st.request.speculative
        req = st.request
        st.admitted = time.monotonic()
        decoder = self._decoder(method, k)
        result = SpeculativeResult()
        steps = decoder.steps(req.prompt_ids, req.sampling, req.seed,
                              sorted(self.s.eos_ids), None, result)
        self._running.append(dict(st=st, decoder=decoder, result=result, steps=steps, sent=0))
        with self._lock:
            self.requests += 1

    def step(self) -> None:
        """Start waiting jobs, then advance each running one by one target pass."""
        while self._waiting and len(self._running) < self.config.max_jobs:
            with self._lock:
                st = self._waiting.popleft()
            try:
                self._start(st)
            except Exception as e:      # this request fails, the engine goes on
                self.s._detok_q.put(("fail", st, Failure(INTERNAL, f"speculative: {e}")))
                traceback.print_exc()
        for job in list(self._running):
            st = job["st"]
            sample = st.samples[0]
            if st.cancelled or sample.text_done or st.closed:
                if st.cancelled and not sample.text_done:
                    self.s._detok_q.put(("end", sample, "abort"))
                self._end(job)
                continue
            t0 = time.monotonic()
            try:
                next(job["steps"])
            except StopIteration:
                self._end(job)
                continue
            except Exception as e:      # this request fails, the engine goes on
                self._running.remove(job)    # its decoder's cache may be gone: dropped
                self.s._detok_q.put(("fail", st, Failure(INTERNAL,
                                                         f"speculative decoding failed: {e}")))
                traceback.print_exc()
                continue
            st.gpu_seconds += time.monotonic() - t0
            if st.first_token is None:
                st.first_token = time.monotonic()
            self._emit(job)
            if job["result"].finish_reason is not None:
                self._end(job)

    def _emit(self, job) -> None:
        """New tokens (and this pass's counts) to the request, through the detokenizer."""
        st, r = job["st"], job["result"]
        sample = st.samples[0]
        counts = st.speculative
        drafted = r.proposed - counts["draft_tokens"]
        accepted = r.accepted - counts["accepted_tokens"]
        counts["draft_tokens"] = r.proposed            # drafted before accepted: a reader
        counts["accepted_tokens"] = r.accepted         # never sees accepted > drafted
        counts["verify_steps"] = r.verify_steps
        with self._lock:
            self.draft_tokens += drafted
            self.accepted_tokens += accepted
        new = r.token_ids[job["sent"]:]
        job["sent"] = len(r.token_ids)
        for i, token in enumerate(new):
            last = i == len(new) - 1
            finish = r.finish_reason if last else None
            stop_id = token if finish == "stop" else None
            sample.tokens.append(token)
            if finish is not None:
                sample.device_done = True
            self.s.tokens_generated += 1
            self.s._detok_q.put(("token", sample, token, None, finish, stop_id))

    def _end(self, job) -> None:
        self._running.remove(job)
        job["st"].samples[0].device_done = True
        job["steps"].close()
        if len(self._idle) + len(self._running) < self.config.max_jobs:
            self._idle.append(job["decoder"])

    def fail_all(self, kind: str, message: str) -> None:
        with self._lock:
            states = [j["st"] for j in self._running] + list(self._waiting)
            self._running, self._waiting = [], collections.deque()
        for st in states:
            self.s._detok_q.put(("fail", st, Failure(kind, message)))
