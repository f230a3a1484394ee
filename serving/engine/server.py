"""The gRPC face of the batch server: FlaxServe service, grpc.health.v1 and reflection.

A thin translation layer: proto messages in, `Scheduler` calls, proto messages out. Every
refusal is a status code with a message naming the field (INVALID_ARGUMENT), a full
admission queue is RESOURCE_EXHAUSTED, and the end of the RPC for any reason (client
cancel, deadline, normal end) cancels the request, so its slots are freed at the next step.

The port is the engine's only door and takes raw token ids, so it is closed by default:
it binds to loopback, server reflection is off unless asked for, and with a shared token
(`FLAXSERVE_GRPC_TOKEN`, `--grpc-token-file`) every call but the health check must carry
`authorization: Bearer TOKEN` metadata (serving/client.py sends it).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import queue
import uuid
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from serving.engine import requests as rq
from serving.engine.scheduler import Scheduler
from serving.proto import flaxserve_pb2 as pb
from serving.proto import flaxserve_pb2_grpc as pb_grpc

STATUS = {
    rq.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    rq.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    rq.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    rq.INTERNAL: grpc.StatusCode.INTERNAL,
    rq.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
}
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FlaxServe"].full_name
TOKEN_ENV = "FLAXSERVE_GRPC_TOKEN"
# How long a Generate call waits for its next event before checking that its client and
# the engine are still there (a stream never waits on a dead engine).
EVENT_POLL_S = 1.0


def load_token(token_file: str | None = None, environ=None) -> str | None:
    """The shared gRPC token: `token_file` (first line) if given, else $FLAXSERVE_GRPC_TOKEN."""
    environ = os.environ if environ is None else environ
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.readline().strip()
        except OSError as e:
            raise ValueError(f"--grpc-token-file: cannot read {token_file}: {e.strerror}") \
                from None
        if not token:
            raise ValueError(f"--grpc-token-file: {token_file} is empty")
        return token
    return environ.get(TOKEN_ENV, "").strip() or None


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


class TokenInterceptor(grpc.ServerInterceptor):
    """Every call but grpc.health.v1 needs `authorization: Bearer TOKEN` (constant time)."""

    def __init__(self, token: str):
        self._expected = _digest(token)

    def _allowed(self, details) -> bool:
        if details.method.startswith("/grpc.health.v1.Health/"):
            return True
        for key, value in details.invocation_metadata or ():
            if key == "authorization" and isinstance(value, str):
                scheme, _, presented = value.strip().partition(" ")
                if scheme.lower() == "bearer" and hmac.compare_digest(
                        _digest(presented.strip()), self._expected):
                    return True
        return False

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or self._allowed(details):
            return handler

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "this engine needs its shared token: send `authorization: Bearer "
                          f"TOKEN` metadata (${TOKEN_ENV} for serving.client)")

        kind = ((handler.request_streaming, handler.response_streaming))
        make = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[kind]
        return make(deny, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


def _counterfactual(lp: rq.TokenLogprob) -> dict:
    """The optional logprobs_mode "unconstrained" / "all" fields that are set."""
    names = ("raw_logprob", "constrained_logprob", "unconstrained_logprob", "removed_mass")
    return {n: getattr(lp, n) for n in names if getattr(lp, n) is not None}


def delta_message(d: rq.Delta, n_per_variant: int | None = None) -> pb.Delta:
    """`n_per_variant`: the request's n when it has variants (sets `variant`)."""
    extra = {}
    if n_per_variant:
        extra["variant"] = d.index // n_per_variant
    if d.metrics is not None and "beam_score" in d.metrics:     # serving/engine/beam_jobs.py
        extra.update(d.metrics)
    elif d.metrics is not None:
        extra["metrics"] = pb.SampleMetrics(**d.metrics)
    return pb.Delta(**extra,
        index=d.index, token_ids=d.token_ids, text=d.text,
        logprobs=[pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, rank=lp.rank,
                                  top_ids=lp.top_ids, top_logprobs=lp.top_logprobs,
                                  **_counterfactual(lp))
                  for lp in d.logprobs],
        finish_reason=d.finish_reason or "", stop_sequence=d.stop_sequence or "",
        stop_token_id=-1 if d.stop_token_id is None else d.stop_token_id)


def merge(a: rq.Delta, b: rq.Delta) -> rq.Delta | None:
    """`b` appended to `a` as one delta, when one message can carry both: the same sample,
    neither the sample's last delta, no logprobs (a message's text goes with its last
    token, so per-token texts would be lost) and no metrics. None otherwise."""
    if (a.index != b.index or a.finish_reason is not None or b.finish_reason is not None
            or a.logprobs or b.logprobs or a.metrics is not None or b.metrics is not None):
        return None
    return rq.Delta(a.index, a.token_ids + b.token_ids, a.text + b.text)


def coalesce(events, handle):
    """`events`, with the deltas already queued behind a delta merged into it: whatever
    the engine produced while the last message was being sent goes out as one message, so
    a slow consumer (a loaded front end, a slow network) costs fewer messages, not a
    growing backlog. A consumer that keeps up sees one message per token, as before."""
    for event in events:
        while isinstance(event, rq.Delta):
            try:
                following = handle.get(timeout=0)
            except queue.Empty:
                break
            merged = merge(event, following) if isinstance(following, rq.Delta) else None
            if merged is None:
                yield event
                event = following
            else:
                event = merged
        yield event
        if isinstance(event, (rq.Usage, rq.Failure)):
            return


def usage_message(u: rq.Usage) -> pb.Usage:
    return pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                    cached_tokens=u.cached_tokens, gpu_seconds=u.gpu_seconds,
                    queue_time=u.queue_time, ttft=u.ttft, seed=u.seed,
                    prompt_logprobs=[pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                                                     rank=lp.rank, top_ids=lp.top_ids,
                                                     top_logprobs=lp.top_logprobs)
                                     for lp in u.prompt_logprobs or ()],
                    speculative=(pb.SpeculativeUsage(**u.speculative) if u.speculative
                                 else None))


def steering_entry(e: pb.SteeringEntry) -> dict:
    """A proto SteeringEntry as model/steering.py's dict (which validates it)."""
    d = {"layer": e.layer}
    if e.name:
        d["name"] = e.name
    if len(e.vector):
        d["vector"] = list(e.vector)
    if e.HasField("scale"):
        d["scale"] = e.scale
    return d


def memory_stats(engine) -> dict:
    """The engine process's resident bytes, and the bytes of its weights and KV cache
    (array sizes: fixed at start, so they are read once)."""
    from serving.process import rss_mib
    fixed = getattr(engine, "_memory_bytes", None)
    if fixed is None:
        import jax
        size = lambda tree: sum(int(x.nbytes) for x in jax.tree.leaves(tree))
        fixed = engine._memory_bytes = {"weights_bytes": size(engine.params),
                                        "kv_cache_bytes": size(engine.state["cache"])}
    return {"rss_bytes": int(rss_mib() * 2 ** 20), **fixed}


class FlaxServeServicer(pb_grpc.FlaxServeServicer):
    def __init__(self, scheduler: Scheduler, model_name: str, model_dir: str = "",
                 tokenizer=None):
        self.scheduler = scheduler
        self.model_name = model_name
        self.model_dir = model_dir
        self.tokenizer = tokenizer
        self.starting = False     # EngineServer.start(serving=False) until serve_now()

    def _prompt(self, ids, text: str, add_special_tokens: bool, context) -> list[int]:
        ids = list(ids)
        if ids and text:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "give prompt_ids or prompt_text, not both")
        if text:
            if self.tokenizer is None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              "prompt_text: this engine has no tokenizer; send prompt_ids")
            ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return ids

    def Generate(self, request, context):
        if self.starting:     # the port is open early; the device is not ours yet
            context.abort(grpc.StatusCode.UNAVAILABLE, "the engine is starting (compiling "
                          "the programs a first request needs); retry in a moment")
        ids = self._prompt(request.prompt_ids, request.prompt_text,
                           request.add_special_tokens, context)
        try:
            sampling = json.loads(request.sampling_json) if request.sampling_json else {}
        except (json.JSONDecodeError, RecursionError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"sampling_json is not JSON (or "
                          f"nests too deeply): {e}")
        if not isinstance(sampling, dict):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "sampling_json must be a JSON object of sampling parameters")
        request_id = request.request_id or uuid.uuid4().hex
        skip = (request.skip_special_tokens if request.HasField("skip_special_tokens")
                else True)
        truncate = (request.truncate_prompt_tokens
                    if request.HasField("truncate_prompt_tokens") else None)
        variants = None
        if request.variants_json:
            try:
                variants = json.loads(request.variants_json)
            except (json.JSONDecodeError, RecursionError) as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"variants_json is not JSON "
                              f"(or nests too deeply): {e}")
        steering = [steering_entry(e) for e in request.steering] or None
        try:
            req = self.scheduler.make_request(request_id, ids, sampling, skip, truncate,
                                              variants=variants, steering=steering)
            handle = self.scheduler.submit(req)
        except rq.RequestError as e:
            context.abort(STATUS[e.kind], e.message)
        context.add_callback(handle.cancel)
        for event in coalesce(self._events(handle, context), handle):
            if isinstance(event, rq.Delta):
                yield pb.GenerateResponse(request_id=request_id, delta=delta_message(
                    event, req.sampling.n if req.variants else None))
            elif isinstance(event, rq.Usage):
                yield pb.GenerateResponse(request_id=request_id, usage=usage_message(event))
            else:
                context.abort(STATUS.get(event.kind, grpc.StatusCode.INTERNAL), event.message)

    def _events(self, handle, context):
        """The request's events; ends if the client left, and fails the call if the
        engine stopped without sending this request its end (never waits forever)."""
        quiet = 0
        while True:
            try:
                event = handle.get(timeout=EVENT_POLL_S)
            except queue.Empty:
                if not context.is_active():
                    handle.cancel()
                    return
                quiet = quiet + 1 if self.scheduler.failed is not None else 0
                if quiet >= 3:
                    event = rq.Failure(rq.UNAVAILABLE, self.scheduler.failed)
                else:
                    continue
            yield event
            if isinstance(event, (rq.Usage, rq.Failure)):
                return

    def CountTokens(self, request, context):
        ids = self._prompt(request.prompt_ids, request.prompt_text,
                           request.add_special_tokens, context)
        return pb.CountTokensResponse(count=len(ids), token_ids=ids,
                                      max_model_len=self.scheduler.max_len)

    def ListModels(self, request, context):
        engine = self.scheduler.engine
        return pb.ListModelsResponse(models=[pb.ModelCard(
            name=self.model_name, model_dir=self.model_dir, max_model_len=engine.max_len,
            vocab_size=engine.vocab_size, max_slots=engine.max_slots,
            eos_token_ids=sorted(self.scheduler.eos_ids))])

    def Stats(self, request, context):
        return pb.StatsResponse(**self.scheduler.stats(), **memory_stats(self.scheduler.engine))


class EngineServer:
    """A started scheduler behind a gRPC server; `start()` returns the bound port."""

    def __init__(self, scheduler: Scheduler, model_name: str, model_dir: str = "",
                 tokenizer=None, *, token: str | None = None, reflection: bool = False):
        self.scheduler = scheduler
        self.token = token
        self.reflection = reflection
        self.servicer = FlaxServeServicer(scheduler, model_name, model_dir, tokenizer)
        self.health = health.HealthServicer()
        self.server: grpc.Server | None = None
        self.port: int | None = None

    def start(self, host: str = "127.0.0.1", port: int = 0, serving: bool = True) -> int:
        """Listen and (serving=True) start the scheduler and say SERVING. serving=False:
        listen while the engine still warms up (health NOT_SERVING, Generate UNAVAILABLE;
        ListModels, CountTokens and Stats answer), so clients connect and read the model's
        card before it serves; `serve_now()` then starts the scheduler."""
        # one thread per open stream: queued + running requests, plus room for unary calls
        workers = self.scheduler.max_queue + self.scheduler.engine.max_slots + 16
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
            maximum_concurrent_rpcs=workers,
            interceptors=[TokenInterceptor(self.token)] if self.token else [],
            options=[("grpc.max_receive_message_length", 64 * 1024 * 1024),
                     ("grpc.max_send_message_length", 64 * 1024 * 1024),
                     ("grpc.so_reuseport", 0)])
        pb_grpc.add_FlaxServeServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.reflection:
            from grpc_reflection.v1alpha import reflection as grpc_reflection
            grpc_reflection.enable_server_reflection(
                (SERVICE_NAME, health.SERVICE_NAME, grpc_reflection.SERVICE_NAME), self.server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise ValueError(f"--grpc-port: cannot listen on {address}")
        self.servicer.starting = not serving
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.start()
        if serving:
            self.serve_now()
        return self.port

    def serve_now(self) -> None:
        """Start the scheduler (its device thread) and say SERVING."""
        if self.scheduler._device_thread is None:
            self.scheduler.start()
        self.servicer.starting = False
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace_s: float = 30.0) -> None:
        """Health NOT_SERVING, no new requests, running ones finish, then the server stops."""
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.scheduler.stop(drain_timeout_s=grace_s)
        if self.server is not None:
            self.server.stop(grace=2.0).wait()

    def wait(self) -> None:
        if self.server is not None:
            self.server.wait_for_termination()


def start_in_process(config, params, *, max_slots: int, max_len: int, prefill_buckets=None,
                     tokenizer=None, model_name: str = "model", model_dir: str = "",
                     max_queue: int = 256, prefix_cache: bool = True, eos_ids=None,
                     host: str = "127.0.0.1", port: int = 0, mesh=None,
                     progress=None, token: str | None = None,
                     reflection: bool = False, kv: dict | None = None,
                     prefill_batch: int = 1, speculative=None,
                     decode_steps: int = 1, cpu_matmul: str = "default",
                     warmup: bool = True) -> EngineServer:
    """Engine + scheduler + gRPC server in this process (notebooks, tests); warmed up.
    `kv`: DeviceEngine's KV layout arguments (kv_layout, block_size, num_blocks); None:
    the default paged pool (serving/engine/paged_kv.py `pool_args`). `prefill_batch` > 1:
    batched prefill of fresh prompts (DeviceEngine); `decode_steps` > 1: multi-step
    decode (serving/engine/multi_step.py). `cpu_matmul`: the decode matmuls' library on
    CPU (serving/engine/cpu_matmul.py; "auto" measures). `speculative`: a
    serving/engine/spec_jobs.py SpecConfig (None: only requests that ask speculate).
    `warmup=False`: compile each program when a request first needs it, as the engine's
    `--lazy-compile` (tests that do not test the warm-up)."""
    from serving.engine.device import DeviceEngine
    from serving.engine.paged_kv import pool_args

    if kv is None:
        kv = pool_args(config, max_slots, max_len)

    if eos_ids is None:
        eos_ids = set(config.eos_token_ids or ())
        if tokenizer is not None:
            eos_ids |= set(tokenizer.stop_ids)
    engine = DeviceEngine(config, params, max_slots=max_slots, max_len=max_len, mesh=mesh,
                          prefill_buckets=prefill_buckets, eos_ids=tuple(sorted(eos_ids)),
                          token_limit=tokenizer.vocab_size if tokenizer else None,
                          prefill_batch=prefill_batch, decode_steps=decode_steps,
                          cpu_matmul=cpu_matmul, **kv)
    if warmup:
        engine.warmup(progress)
    scheduler = Scheduler(engine, tokenizer, max_queue=max_queue, prefix_cache=prefix_cache,
                          speculative=speculative)
    server = EngineServer(scheduler, model_name, model_dir, tokenizer, token=token,
                          reflection=reflection)
    server.start(host, port)
    return server
