"""The HTTP worker's link to the batch server: gRPC calls in, protocol-neutral events out.

`EngineLink.generate(GenRequest)` opens one server-streaming `Generate` call and returns a
`GenStream`: it waits for the engine's first answer (so a refused request, a full queue or
a bad argument, raises `APIError` before the HTTP status line is written), then yields
`Delta`s, `None` during long gaps (the caller writes a keep-alive), and one `Final`.
`cancel()` cancels the call, which frees the engine slot; it is safe to call twice.
gRPC status codes map to HTTP statuses here and nowhere else.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass

import grpc

from serving.http import admission
from serving.http.errors import APIError, from_value_error
from serving.http.generation import Delta, GenRequest

_END = object()
HEALTH_INTERVAL_S = 0.25
SLOW_CHECKS_UNHEALTHY = 3     # ~4 s without an answer: the engine is stuck, not busy


@dataclass
class EngineModel:
    name: str
    model_dir: str | None
    max_model_len: int | None
    vocab_size: int | None = None


def map_rpc_error(e: grpc.RpcError) -> APIError:
    code = e.code() if hasattr(e, "code") else None
    details = (e.details() if hasattr(e, "details") else None) or str(e)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:   # 529 on /v1/messages (app.py)
        return APIError(429, f"the engine is at capacity: {details}",
                        code="server_overloaded", retry_after=1.0)
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE,
                grpc.StatusCode.FAILED_PRECONDITION):
        return from_value_error(ValueError(details))
    if code == grpc.StatusCode.NOT_FOUND:
        return APIError(404, details, param="model", code="model_not_found")
    if code == grpc.StatusCode.UNAVAILABLE:
        return APIError(503, f"the engine is unavailable: {details}", retry_after=1.0)
    if code == grpc.StatusCode.UNAUTHENTICATED:   # a server problem, not the client's
        return APIError(503, "the engine refused this front end's gRPC token (set the same "
                             "FLAXSERVE_GRPC_TOKEN for both)")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return APIError(504, f"the engine did not answer in time: {details}")
    if code == grpc.StatusCode.CANCELLED:
        return APIError(503, f"the generation was cancelled: {details}", retry_after=1.0)
    return APIError(500, f"engine error ({code.name if code else 'unknown'}): {details}")


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


class GenStream:
    """One generation's events, read by a thread so that gaps can be reported."""

    def __init__(self, call, convert, keepalive_s: float | None):
        self._call = call
        self._convert = convert          # one gRPC response -> list of events
        self._keepalive_s = keepalive_s
        self._queue: queue.Queue = queue.Queue()
        self._cancelled = False
        self._aborted: APIError | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        admission.attach(self)      # a client that leaves, or a shutdown, can abort it now
        self._pending = self._next_blocking()   # the first answer, or its error, now

    def _read(self) -> None:
        try:
            for response in self._call:
                for ev in self._convert(response):
                    self._queue.put(ev)
            self._queue.put(_END)
        except grpc.RpcError as e:
            self._queue.put(e)
        except Exception as e:  # an engine-side failure or a conversion bug ends the
            self._queue.put(e)  # stream with an error, never a hang

    def _next_blocking(self):
        item = self._queue.get()
        self._raise_if_error(item)
        return item

    def _raise_if_error(self, item) -> None:
        if self._aborted is not None:
            raise self._aborted
        if isinstance(item, grpc.RpcError):
            raise map_rpc_error(item)
        if isinstance(item, APIError):
            raise item
        if isinstance(item, Exception):
            raise APIError(500, f"engine stream error: {item}")

    def __iter__(self):
        item = self._pending
        while item is not _END:
            if isinstance(item, Delta):
                item = self._coalesce(item)
                if isinstance(item, tuple):          # a delta, then what could not join it
                    item, following = item
                    yield item
                    item = following
                    self._raise_if_error(item)
                    continue
            yield item                   # None: nothing came for keepalive_s seconds
            try:
                item = self._queue.get(timeout=self._keepalive_s)
            except queue.Empty:
                item = None
            self._raise_if_error(item)

    def _coalesce(self, delta: Delta):
        """`delta` with the deltas already queued behind it joined to it (one protocol chunk
        and one socket write for what arrived while the last one was written), or
        (delta, the next item) when that item cannot join it."""
        while True:
            try:
                following = self._queue.get_nowait()
            except queue.Empty:
                return delta
            joined = join(delta, following) if isinstance(following, Delta) else None
            if joined is None:
                return delta, following
            delta = joined

    def cancel(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            self._call.cancel()

    def abort(self, err: APIError) -> None:
        """End the stream with `err` (its reader sees it next) and free the engine slot.
        From any thread: the client left, or the server is shutting down."""
        self._aborted = err
        self._queue.put(_END)       # wakes a reader blocked on the queue
        self.cancel()


class EngineLink:
    """`serving.client.EngineClient` plus what the front end adds: errors as `APIError`,
    a stream with keep-alive gaps and cancellation, events instead of proto messages."""

    def __init__(self, address: str):
        from serving.client import EngineClient
        self.address = address
        self._healthy = False
        self._health_thread: threading.Thread | None = None
        self._health_lock = threading.Lock()
        self._closed = False
        self.client = EngineClient(address)

    def close(self) -> None:
        self._closed = True
        self.client.close()

    def healthy(self, timeout_s: float = 2.0) -> bool:
        return self.client.healthy(timeout=timeout_s)

    def healthy_cached(self) -> bool:
        """The engine's health as last seen by a watcher thread (every 0.25 s), so that
        `/health` answers at once under any load and while the engine is down."""
        if self._health_thread is None:
            with self._health_lock:
                if self._health_thread is None:
                    self._healthy = self.healthy(timeout_s=1.0)
                    self._health_thread = threading.Thread(
                        target=self._watch_health, daemon=True, name="flaxserve-health")
                    self._health_thread.start()
        return self._healthy

    def _watch_health(self) -> None:
        slow = 0
        while not self._closed:
            # while the engine is starting (or down), look more often: /health turns 200
            # within 50 ms of the engine being ready
            time.sleep(HEALTH_INTERVAL_S if self._healthy else 0.05)
            try:
                state = self.client.health(timeout=1.0)
            except Exception:  # noqa: BLE001 - e.g. the channel closed under us: down
                state = "down"
            # a check that times out under a heavy load is not a dead engine: a healthy
            # engine stays healthy until SLOW_CHECKS_UNHEALTHY checks in a row time out
            # (a refused or closed connection, or NOT_SERVING, counts at once)
            slow = slow + 1 if state == "slow" else 0
            if state != "slow" or slow >= SLOW_CHECKS_UNHEALTHY or not self._healthy:
                self._healthy = state == "serving"

    def model_info(self) -> EngineModel:
        try:
            m = self.client.list_models()[0]
        except grpc.RpcError as e:
            raise map_rpc_error(e) from None
        return EngineModel(name=m.name, model_dir=m.model_dir or None,
                           max_model_len=m.max_model_len or None,
                           vocab_size=m.vocab_size or None)

    def stats(self) -> dict:
        from serving.proto import flaxserve_pb2 as pb
        reply = self.client.stub.Stats(pb.StatsRequest(), timeout=1.0)
        from serving.http.metrics import KV_STATS, MEMORY_STATS, SPEC_STATS
        return {"queue_depth": reply.queue_depth, "slots_in_use": reply.slots_in_use,
                "max_slots": reply.max_slots, **{k: getattr(reply, k) for k in SPEC_STATS},
                **({k: getattr(reply, k) for k in KV_STATS} if reply.kv_blocks_total else {}),
                **({k: getattr(reply, k) for k in MEMORY_STATS} if reply.rss_bytes else {})}

    def generate(self, request: GenRequest, keepalive_s: float | None = None) -> GenStream:
        message = self.client.request(request.prompt_ids, request.sampling.to_dict(),
                                      request_id=request.request_id,
                                      skip_special_tokens=request.skip_special_tokens)
        message.spaces_between_special_tokens = request.spaces_between_special_tokens
        if request.variants is not None:
            message.variants_json = json.dumps(request.variants)
        for e in request.steering or ():
            message.steering.add(**steering_fields(e))
        call = self.client.stub.Generate(message, timeout=request.deadline_s)
        return GenStream(call, self._converter(request), keepalive_s)

    def _converter(self, request: GenRequest):
        from serving.http.generation import Delta, Final, TokenInfo, TopEntry, Usage
        token_bytes = self.token_bytes

        def entry(token_id: int, logprob: float) -> TopEntry:
            raw = token_bytes(token_id)
            return TopEntry(raw.decode("utf-8", errors="replace"), logprob, list(raw), token_id)

        def convert(r) -> list:
            events = []
            if r.HasField("delta"):
                d = r.delta
                if d.finish_reason == "error":
                    raise APIError(500, f"the engine failed while generating sample {d.index}")
                if d.finish_reason == "abort":
                    raise APIError(503, f"the engine aborted sample {d.index}")
                lps = {k: lp for k, lp in enumerate(d.logprobs)}
                tokens = []
                for k, token_id in enumerate(d.token_ids):
                    # the text joins exactly to the content: it goes with the last token
                    text = d.text if k == len(d.token_ids) - 1 else ""
                    lp = lps.get(k)
                    tokens.append(TokenInfo(
                        token_id, text, lp.logprob if lp is not None else None,
                        list(token_bytes(token_id)),
                        [] if lp is None else [entry(t, v) for t, v in
                                               zip(lp.top_ids, lp.top_logprobs)],
                        lp.rank if lp is not None else None,
                        _counterfactual(lp)))
                metrics = None
                if d.HasField("metrics"):
                    m = d.metrics
                    metrics = {"length": m.length, "mean_entropy": m.mean_entropy,
                               "distinct_1": m.distinct_1, "distinct_2": m.distinct_2,
                               "perplexity": m.perplexity}
                if d.HasField("beam_score"):        # use_beam_search
                    metrics = {"beam_score": d.beam_score,
                               "cumulative_logprob": d.cumulative_logprob}
                events.append(Delta(d.index, d.text, tokens, d.finish_reason or None,
                                    d.stop_sequence or None, metrics))
            if r.HasField("usage"):
                u = r.usage
                prompt_lps = None
                if u.prompt_logprobs:
                    ids = request.prompt_ids
                    prompt_lps = [TokenInfo(ids[0], _text(token_bytes(ids[0])), None,
                                            list(token_bytes(ids[0])))] + [
                        TokenInfo(lp.token_id, _text(token_bytes(lp.token_id)), lp.logprob,
                                  list(token_bytes(lp.token_id)),
                                  [entry(t, v) for t, v in zip(lp.top_ids, lp.top_logprobs)],
                                  lp.rank)
                        for lp in u.prompt_logprobs]
                spec = None
                if u.HasField("speculative"):       # serving/engine/spec_jobs.py
                    s = u.speculative
                    spec = {"method": s.method, "num_tokens": s.num_tokens,
                            "draft_tokens": s.draft_tokens,
                            "accepted_tokens": s.accepted_tokens,
                            "verify_steps": s.verify_steps}
                events.append(Final(Usage(u.prompt_tokens, u.completion_tokens,
                                          u.cached_tokens, u.gpu_seconds, spec), seed=u.seed,
                                    prompt_logprobs=prompt_lps))
            return events

        return convert

    # token id -> its exact bytes; the app sets it from the model's tokenizer
    token_bytes = None


def join(a: Delta, b: Delta) -> Delta | None:
    """`b` appended to `a` (their tokens keep their own texts and logprobs), or None when
    they are two chunks: another sample, or either one ends its sample or has metrics (the
    last chunk of a sample stays alone, as when the reader keeps up)."""
    if (a.index != b.index or a.finish_reason is not None or b.finish_reason is not None
            or a.metrics is not None or b.metrics is not None):
        return None
    return Delta(a.index, a.text + b.text, a.tokens + b.tokens)


def steering_fields(e: dict) -> dict:
    """A validated steering entry (serving/http/openai_fields.py) as pb.SteeringEntry fields."""
    out = {"layer": e["layer"]}
    if "name" in e:
        out["name"] = e["name"]
    if "vector" in e:
        out["vector"] = e["vector"]
    if "scale" in e:
        out["scale"] = e["scale"]
    return out


_COUNTERFACTUAL = ("raw_logprob", "constrained_logprob", "unconstrained_logprob", "removed_mass")


def _counterfactual(lp) -> dict | None:
    """A pb.TokenLogprob's logprobs_mode "unconstrained" / "all" fields, if it has them."""
    if lp is None or not lp.HasField("removed_mass"):
        return None
    from serving.http.generation import floor_logprob
    return {n: (round(getattr(lp, n), 7) if n == "removed_mass" else
                floor_logprob(getattr(lp, n))) for n in _COUNTERFACTUAL}
