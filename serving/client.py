"""A small Python client of the batch server's gRPC API (notebooks, benchmarks, tests).

`EngineClient("127.0.0.1:50051").generate(prompt_ids, {"temperature": 0, "max_tokens": 8})`
returns a `Generation` (one `Choice` per sample, and the usage); `stream(...)` yields the raw
`GenerateResponse` messages as they arrive, and `.cancel()` on the returned call frees the
engine slot. gRPC errors come through as `grpc.RpcError` with the engine's status code.
An engine started with a shared token (FLAXSERVE_GRPC_TOKEN) needs it on every call:
`EngineClient(address, token=...)`, or the same environment variable here.
"""

from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass, field

import grpc

from serving.proto import flaxserve_pb2 as pb
from serving.proto import flaxserve_pb2_grpc as pb_grpc


@dataclass
class Choice:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list = field(default_factory=list)      # pb.TokenLogprob per token, if asked
    finish_reason: str | None = None
    stop_sequence: str | None = None
    stop_token_id: int | None = None


@dataclass
class Generation:
    request_id: str
    choices: list[Choice]
    usage: pb.Usage


class _CallDetails(collections.namedtuple("_CallDetails", (
        "method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
        grpc.ClientCallDetails):
    pass


class _TokenMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer TOKEN` to every call."""

    def __init__(self, token: str):
        self._metadata = (("authorization", f"Bearer {token}"),)

    def _with_token(self, details):
        return _CallDetails(details.method, details.timeout,
                            tuple(details.metadata or ()) + self._metadata,
                            details.credentials, getattr(details, "wait_for_ready", None),
                            getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)


class EngineClient:
    def __init__(self, address: str, token: str | None = None):
        """`token`: the engine's shared token (default: $FLAXSERVE_GRPC_TOKEN, if set)."""
        self.address = address
        if token is None:
            token = os.environ.get("FLAXSERVE_GRPC_TOKEN", "").strip() or None
        self._raw_channel = grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            # reconnect within 0.2 s of a (re)started engine (gRPC's default backoff
            # grows to minutes: a front end took ~7 s to see its engine back; at 1 s,
            # `serve` saw a starting engine up ~0.5 s late)
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 1000),
            ("grpc.max_reconnect_backoff_ms", 200)])
        self.channel = (grpc.intercept_channel(self._raw_channel, _TokenMetadata(token))
                        if token else self._raw_channel)
        self.stub = pb_grpc.FlaxServeStub(self.channel)

    def close(self) -> None:
        self._raw_channel.close()

    def __enter__(self) -> "EngineClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def request(prompt_ids=None, sampling: dict | None = None, *, prompt_text: str = "",
                request_id: str = "", skip_special_tokens: bool = True,
                truncate_prompt_tokens: int | None = None) -> pb.GenerateRequest:
        msg = pb.GenerateRequest(request_id=request_id, prompt_ids=list(prompt_ids or []),
                                 prompt_text=prompt_text,
                                 sampling_json=json.dumps(sampling or {}),
                                 skip_special_tokens=skip_special_tokens)
        if truncate_prompt_tokens is not None:
            msg.truncate_prompt_tokens = truncate_prompt_tokens
        return msg

    def stream(self, prompt_ids=None, sampling: dict | None = None, *,
               timeout: float | None = None, **kw):
        """The streaming call itself: iterate it for responses, `.cancel()` it to stop."""
        return self.stub.Generate(self.request(prompt_ids, sampling, **kw), timeout=timeout)

    def generate(self, prompt_ids=None, sampling: dict | None = None, *,
                 timeout: float | None = None, **kw) -> Generation:
        """Run one request to the end and gather its samples."""
        n = int((sampling or {}).get("n") or 1)
        choices = [Choice(i) for i in range(n)]
        usage, request_id = None, ""
        for r in self.stream(prompt_ids, sampling, timeout=timeout, **kw):
            request_id = r.request_id
            if r.HasField("delta"):
                d = r.delta
                c = choices[d.index]
                c.token_ids.extend(d.token_ids)
                c.text += d.text
                c.logprobs.extend(d.logprobs)
                if d.finish_reason:
                    c.finish_reason = d.finish_reason
                    c.stop_sequence = d.stop_sequence or None
                    c.stop_token_id = d.stop_token_id if d.stop_token_id >= 0 else None
            if r.HasField("usage"):
                usage = r.usage
        if usage is None:
            raise RuntimeError("the engine's stream ended without usage")
        return Generation(request_id, choices, usage)

    def count_tokens(self, prompt_ids=None, prompt_text: str = "",
                     add_special_tokens: bool = False) -> int:
        return self.stub.CountTokens(pb.CountTokensRequest(
            prompt_ids=list(prompt_ids or []), prompt_text=prompt_text,
            add_special_tokens=add_special_tokens)).count

    def list_models(self) -> list:
        return list(self.stub.ListModels(pb.ListModelsRequest()).models)

    def stats(self) -> pb.StatsResponse:
        return self.stub.Stats(pb.StatsRequest())

    def healthy(self, timeout: float = 2.0) -> bool:
        return self.health(timeout) == "serving"

    def health(self, timeout: float = 2.0) -> str:
        """"serving", "not serving", "slow" (no answer within `timeout`: the engine may be
        alive but starved of CPU) or "down" (refused, closed, any other RPC error)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        try:
            reply = health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as e:
            return "slow" if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED else "down"
        return ("serving" if reply.status == health_pb2.HealthCheckResponse.SERVING
                else "not serving")
