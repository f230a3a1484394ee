"""What the scheduler tracks per request and per sample, and what it hands back.

A request is a prompt, validated `SamplingParams` and a seed; it fans out into `n` samples,
each in its own slot. Results come back through a `Handle` as a stream of `Delta`s (one per
sample per step), ended by exactly one `Usage` (success) or one `Failure`. Both the device
thread and the detokenize thread touch a `Sample`; each field says which thread writes it.
Nothing here imports JAX or gRPC.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field

from sampling.params import SamplingParams

# gRPC-neutral error kinds; serving/engine/server.py maps them to status codes.
INVALID_ARGUMENT = "invalid_argument"
RESOURCE_EXHAUSTED = "resource_exhausted"
UNAVAILABLE = "unavailable"
INTERNAL = "internal"
FAILED_PRECONDITION = "failed_precondition"


class RequestError(Exception):
    """A request refused at submission (or failed later), with a gRPC-neutral kind."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    rank: int
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)
    # logprobs_mode "unconstrained" / "all" (sampling/counterfactual.py), else None
    raw_logprob: float | None = None
    constrained_logprob: float | None = None     # the distribution sampled from
    unconstrained_logprob: float | None = None   # the sampler's, without the constraint
    removed_mass: float | None = None            # what the constraint took from it


@dataclass
class Delta:
    index: int
    token_ids: list[int]
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None        # "stop" | "length" | "abort" | "error"
    stop_sequence: str | None = None
    stop_token_id: int | None = None
    metrics: dict | None = None             # variants: the sample's, on its final delta


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    gpu_seconds: float
    queue_time: float
    ttft: float
    seed: int
    prompt_logprobs: list[TokenLogprob] | None = None   # prompt tokens 1.., when asked
    # ran speculative decoding (serving/engine/spec_jobs.py): method, num_tokens,
    # draft_tokens, accepted_tokens, verify_steps
    speculative: dict | None = None


@dataclass
class Failure:
    kind: str
    message: str


@dataclass
class EngineRequest:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    seed: int                                # resolved: drawn by the engine when none was given
    skip_special_tokens: bool = True
    arrival: float = field(default_factory=time.monotonic)
    grammar: str | None = None               # compiled guided_* spec (sampling/grammar.py)
    # paired variants (sampling/variants.py): one SamplingParams per variant, n samples
    # each (sample i*n + j is variant i's sample j, drawn with sample index j)
    variants: list | None = None
    # activation steering (model/steering.py): a [num_layers, hidden] float32 array, and
    # its digest (keys the prefix cache: a steered prompt's KV differs)
    steering: object = None
    steering_key: bytes = b""
    # (method, K) when it may run speculative decoding (serving/engine/spec_jobs.py)
    speculative: tuple | None = None


class Handle:
    """The consumer's side of one request: iterate for events; `cancel()` frees its slots."""

    def __init__(self, request: EngineRequest, wake=None):
        self.request = request
        self._events: queue.Queue = queue.Queue()
        self._wake = wake
        self.cancelled = False

    def put(self, event) -> None:
        self._events.put(event)

    def cancel(self) -> None:
        self.cancelled = True
        if self._wake is not None:
            self._wake()

    def get(self, timeout: float | None = None):
        return self._events.get(timeout=timeout)

    def __iter__(self):
        """Deltas, then the final `Usage` or `Failure` (the last item)."""
        while True:
            event = self._events.get()
            yield event
            if isinstance(event, (Usage, Failure)):
                return


@dataclass
class Sample:
    """One of a request's n samples. Device thread: slot, tokens, device_done. Detokenize
    thread: text_done, completion_tokens, its detokenizer and stop-string state."""
    state: "RequestState"
    index: int
    slot: int = -1
    tokens: list[int] = field(default_factory=list)
    device_done: bool = False       # no more tokens are taken from the device
    text_done: bool = False         # its final delta was sent (a stop string may end it)
    completion_tokens: int = 0
    detok: object = None
    stops: object = None
    constraint: object = None       # device thread: sampling.grammar.Constraint, if any
    params: SamplingParams | None = None   # its variant's params (None: the request's)
    draw_index: int | None = None          # its PRNG sample index (None: `index`)
    # variants: the raw logprob and entropy of each token (device thread appends)
    raw_logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    carry: object = None            # paged: sampler values kept over a preemption

    @property
    def sampling(self) -> SamplingParams:
        return self.params if self.params is not None else self.state.request.sampling

    @property
    def key_index(self) -> int:
        return self.index if self.draw_index is None else self.draw_index


@dataclass
class RequestState:
    """A request inside the scheduler (device thread, except where noted)."""
    request: EngineRequest
    handle: Handle
    prompt: list[int]
    samples: list[Sample] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    prefill_pos: int = 0
    cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob] | None = None
    admitted: float | None = None
    first_token: float | None = None
    gpu_seconds: float = 0.0
    finished_samples: int = 0       # detokenize thread
    closed: bool = False            # detokenize thread: Usage or Failure sent
    # paged KV: the recompute of one preempted sample of `parent` (prompt = the parent's
    # prompt + that sample's tokens so far); it runs the prefill, the parent reports
    parent: "RequestState | None" = None
    speculative: dict | None = None  # device thread: a speculative job's counts (spec_jobs.py)

    @property
    def cancelled(self) -> bool:
        return self.handle.cancelled
