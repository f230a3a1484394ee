"""The Falcon WSGI app: routes, auth, request ids, errors, SSE, metrics.

`create_app(settings)` builds one app per gunicorn worker (after the fork, so each worker
opens its own gRPC channel). The protocol work lives in `openai_*` / `anthropic_api`;
this file only moves bytes: read JSON, validate + tokenize (all before the status line, so
a bad streaming request is a 4xx), open the engine call, and write the body or the SSE
events. A streaming response is a generator, so each event is written and flushed on its
own; when the client goes away the server closes the generator and the `finally` cancels
the gRPC call, which frees the engine slot. No JAX is imported here.
"""

from __future__ import annotations

import json
import re
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import falcon

from serving.http import admission, anthropic_api, metrics, sse, thinking_signature
from serving.http import openai_chat_request, openai_completion_request, openai_shapes
from serving.http import responses_api, tokenize_api
from serving.http.response_store import DEFAULT_PATH as RESPONSE_STORE_PATH, ResponseStore
from serving.http import json_body, limits
from serving.http.auth import KeyChecker, needs_key, normalize_path, presented_keys
from serving.http.errors import APIError, body_for, openai_body
from serving.http.generation import Delta, Final, ModelInfo, accumulate

log = logging.getLogger("flaxserve.http")
MAX_BODY = limits.MAX_BODY_BYTES
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/messages",
          "/v1/messages/count_tokens", "/health", "/metrics", "/openapi.json",
          "/v1/responses", "/tokenize", "/detokenize", "/version")
# vLLM's paths outside /v1/ (the model's tokenizer): they need a key too
AUTH_OUTSIDE_V1 = ("/tokenize", "/detokenize", "/tokenizer_info")
KEEPALIVE_S = 10.0
ANTHROPIC_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}")


@dataclass
class Settings:
    engine: str                                   # HOST:PORT of the batch server
    engines: list[str] = field(default_factory=list)   # several: routed (http/router.py)
    api_keys: list[str] = field(default_factory=list, repr=False)   # never printed
    served_model_names: list[str] = field(default_factory=list)   # default: the engine's
    model_dir: str | None = None                  # default: the engine's (ListModels)
    keepalive_s: float = KEEPALIVE_S
    chat_template: str | None = None              # --chat-template: overrides the model's
    strict_max_tokens: bool = False               # --strict-max-tokens (docs/fields.md)
    metrics_public: bool = True                   # /metrics without a key (--metrics-auth)
    response_store: str = RESPONSE_STORE_PATH     # --response-store: stored /v1/responses
    # HMAC key of thinking signatures; drawn here, in the gunicorn master, so that every
    # worker shares it (serving.http.thinking_signature)
    thinking_secret: bytes = field(default_factory=thinking_signature.load_secret,
                                   repr=False)


def _protocol(path: str) -> str:
    return "anthropic" if normalize_path(path).startswith("/v1/messages") else "openai"


def _access_line(req, resp, route: str) -> None:
    """One `access` log line: id, route, status, tokens (when the body has usage),
    latency; never the prompt, the body or a key."""
    from serving import logs
    usage = resp.media.get("usage") if isinstance(resp.media, dict) else None
    usage = usage if isinstance(usage, dict) else {}
    start = getattr(req.context, "start", None)
    logs.access(getattr(req.context, "request_id", "-"), req.method,
                route if route != "other" else "other", resp.status_code,
                time.monotonic() - start if start is not None else 0.0,
                usage.get("prompt_tokens", usage.get("input_tokens")),
                usage.get("completion_tokens", usage.get("output_tokens")))


class _Middleware:
    """Request id, auth for /v1/*, and per-route request counts."""

    def __init__(self, keys: KeyChecker, metrics_public: bool = True):
        self.keys = keys
        self.metrics_public = metrics_public

    def process_request(self, req, resp):
        rid = req.get_header("X-Request-Id")
        if not rid or len(rid) > 128 or not rid.isprintable():
            rid = "req_" + secrets.token_hex(12)
        req.context.request_id = rid
        req.context.start = time.monotonic()
        resp.set_header("x-request-id", rid)
        resp.set_header("request-id", rid)
        # every path but the allow-list, judged on the normalised path, and on the raw
        # target too (the server may have decoded or merged parts of req.path)
        raw = (req.env.get("RAW_URI") or req.env.get("REQUEST_URI") or "").split("?", 1)[0]
        if (needs_key(req.path, self.metrics_public)
                or (raw and needs_key(raw, self.metrics_public))) and not self.keys.allows(
                presented_keys(req.get_header("Authorization"), req.get_header("x-api-key"))):
            raise APIError(401, "Invalid API key: send it as `Authorization: Bearer KEY`, "
                                "`Authorization: Api-Key KEY` or `x-api-key: KEY`")
        if normalize_path(req.path).startswith("/v1/messages"):
            # Any dated version is accepted (the official SDK sends its own release date);
            # the wire format we speak is the 2023-06-01 one for all of them.
            version = req.get_header("anthropic-version")
            if version is not None and not ANTHROPIC_VERSION.fullmatch(version):
                raise APIError(400, f"anthropic-version: expected a date such as 2023-06-01, "
                                    f"got {version!r}")

    def process_response(self, req, resp, resource, req_succeeded):
        route = req.path if req.path in ROUTES else "other"   # bounded label values
        _access_line(req, resp, route)
        metrics.REQUESTS.labels(route, str(resp.status_code)).inc()


def _error_handler(req, resp, ex, params):
    if isinstance(ex, APIError):
        err = ex
    elif isinstance(ex, falcon.HTTPError):
        status = ex.status_code
        message = ex.title if not ex.description else f"{ex.title}: {ex.description}"
        if status == 404:
            message = f"no route {req.method} {req.path}"
        err = APIError(status, message)
        if status == 404:
            err.code = "not_found"
    else:
        log.exception("unhandled error on %s %s", req.method, req.path)
        err = APIError(500, "internal server error; the request id is "
                            f"{getattr(req.context, 'request_id', '?')}")
    if err.code == "server_overloaded" and _protocol(req.path) == "anthropic":
        err = admission.overloaded("anthropic", err.message, err.retry_after)   # 529
    resp.status = err.status
    resp.content_type = falcon.MEDIA_JSON
    resp.text = json.dumps(body_for(_protocol(req.path), err))
    if err.retry_after is not None:
        resp.set_header("retry-after", str(max(1, int(round(err.retry_after)))))


def _read_json(req) -> dict:
    length = req.content_length
    if length is not None and length > MAX_BODY:
        raise APIError(413, f"request body of {length} bytes exceeds {MAX_BODY}")
    # a chunked body has no Content-Length: Falcon's bounded_stream then reads nothing,
    # while the server's own input stream ends where the last chunk does
    stream = req.bounded_stream if length is not None else req.stream
    raw = stream.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise APIError(413, f"request body exceeds {MAX_BODY} bytes")
    return json_body.parse(raw)   # depth, NaN/inf, lone surrogates: a 400 naming the field


class _Timed:
    """Wraps an engine stream to record TTFT, TPOT and token counts for /metrics."""

    def __init__(self, events: Iterable, start: float):
        self.events = events
        self.start = start
        self.first: float | None = None

    def __iter__(self):
        for ev in self.events:
            if self.first is None and isinstance(ev, Delta) and ev.tokens:
                self.first = time.monotonic()
            if isinstance(ev, Final):
                metrics.observe_generation(self.start, self.first, time.monotonic(),
                                           ev.usage.prompt_tokens, ev.usage.completion_tokens)
            yield ev


class _Server:
    def __init__(self, settings: Settings, link):
        self.settings = settings
        self.link = link
        self._info: ModelInfo | None = None
        self._lock = threading.Lock()

    def info(self) -> ModelInfo:
        """The model's names, tokenizer and context, fetched once from the engine."""
        if self._info is None:
            with self._lock:
                if self._info is None:
                    self._info = self._load_info()
        return self._info

    def prefetch(self, interval_s: float = 0.1) -> None:
        """`info()` as soon as the engine answers ListModels (it does while it still
        compiles its first programs), so the first request does not load the tokenizer;
        retried while the engine is not up (every `interval_s`, after a minute every
        second), until it works or the link closes."""
        start = time.monotonic()
        while self._info is None and not getattr(self.link, "_closed", False):
            try:
                self.info()
            except Exception:  # noqa: BLE001 - not up yet: a request would get a 503
                time.sleep(interval_s if time.monotonic() - start < 60 else 1.0)

    def _load_info(self) -> ModelInfo:
        from serving.http.prompt import load_prompt_tokenizer
        engine_model = self.link.model_info()
        model_dir = self.settings.model_dir or engine_model.model_dir
        if not model_dir:
            raise APIError(503, "the engine did not say where its model lives; start "
                                "`flaxserve http` with --model DIR")
        names = self.settings.served_model_names or [engine_model.name]
        try:
            tokenizer = load_prompt_tokenizer(model_dir)
        except (ValueError, OSError) as e:
            raise APIError(503, f"cannot load the model's tokenizer: {e}") from None
        self.link.token_bytes = tokenizer.token_bytes
        if self.settings.chat_template is not None:
            tokenizer.chat_template = self.settings.chat_template
        return ModelInfo(served_names=names, tokenizer=tokenizer,
                         max_model_len=engine_model.max_model_len,
                         vocab_size=engine_model.vocab_size,
                         strict_max_tokens=self.settings.strict_max_tokens,
                         created=int(time.time()))

    def open(self, gen_request, req):
        """Start the engine call; engine refusals (queue full, bad argument) raise here,
        before the status line."""
        stream = self.link.generate(gen_request, keepalive_s=self.settings.keepalive_s)
        return _Timed(stream, req.context.start), stream


def _sse_response(resp, frames: Iterator[bytes]) -> None:
    resp.content_type = sse.CONTENT_TYPE
    for k, v in sse.HEADERS.items():
        resp.set_header(k, v)
    resp.stream = frames


def _guarded(frames: Iterator[bytes], on_error: Callable[[APIError], Iterator[bytes]],
             streams: list) -> Iterator[bytes]:
    """Frames, an in-band error if one comes after the 200, and cancellation of every open
    engine call when the generator ends for any reason (done, error, client gone)."""
    try:
        yield from frames
    except APIError as e:
        yield from on_error(e)
    except Exception:
        log.exception("error while streaming")
        yield from on_error(APIError(500, "internal error while streaming"))
    finally:
        for s in streams:
            s.cancel()


class ChatCompletions:
    def __init__(self, server: _Server):
        self.server = server

    def on_post(self, req, resp):
        body = _read_json(req)
        plan = openai_chat_request.parse_chat(body, self.server.info())
        openai_shapes.set_plan_headers(resp, plan)
        timed, stream = self.server.open(plan.requests[0], req)
        if not plan.stream:
            try:
                choices, final = accumulate((e for e in timed if e is not None), plan.n)
            finally:
                stream.cancel()
            resp.media = openai_shapes.chat_response(plan, choices, final)
            return

        def frames():
            for chunk in openai_shapes.chat_stream(plan, timed):
                yield sse.comment() if chunk is None else sse.data(chunk)
            yield sse.DONE

        _sse_response(resp, _guarded(frames(), _openai_stream_error, [stream]))


def _openai_stream_error(err: APIError) -> Iterator[bytes]:
    yield sse.data(openai_body(err))
    yield sse.DONE


class Completions:
    def __init__(self, server: _Server):
        self.server = server

    def on_post(self, req, resp):
        body = _read_json(req)
        plan = openai_completion_request.parse_completion(body, self.server.info())
        openai_shapes.set_plan_headers(resp, plan)
        created = int(time.time())
        opened = _open_all(self.server, plan.requests, req)   # one batch in the engine
        streams = [s for _, s in opened]
        if not plan.stream:
            results = []
            try:
                for timed, _ in opened:
                    results.append(accumulate((e for e in timed if e is not None), plan.n))
            finally:
                for s in streams:
                    s.cancel()
            resp.media = openai_shapes.completion_response(plan, results, created)
            return

        def frames():
            usages = []
            for i, (timed, _) in enumerate(opened):
                for chunk in openai_shapes.completion_stream(plan, i, timed, created, usages):
                    yield sse.comment() if chunk is None else sse.data(chunk)
            if plan.include_usage:
                yield sse.data(openai_shapes.usage_chunk(plan, usages, created))
            yield sse.DONE

        _sse_response(resp, _guarded(frames(), _openai_stream_error, streams))


def _open_all(server: _Server, requests: list, req) -> list:
    """Open every prompt's engine call at once (submitted together, they decode as one
    batch); if any is refused, the others are cancelled and that refusal is raised."""
    if len(requests) == 1:
        return [server.open(requests[0], req)]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=min(len(requests), 16),
                            thread_name_prefix="open") as pool:
        futures = [pool.submit(server.open, r, req) for r in requests]
    opened, error = [], None
    for f in futures:
        try:
            opened.append(f.result())
        except Exception as e:  # noqa: BLE001 - re-raised below, after the cleanup
            error = error or e
    if error is not None:
        for _, s in opened:
            s.cancel()
        raise error
    return opened


class Models:
    def __init__(self, server: _Server):
        self.server = server

    def on_get(self, req, resp):
        if req.get_header("anthropic-version") is not None:    # the Anthropic SDK's shape
            resp.media = anthropic_api.models_body(self.server.info())
            return
        resp.media = openai_shapes.models_body(self.server.info())


class Model:
    def __init__(self, server: _Server):
        self.server = server

    def on_get(self, req, resp, model_id):
        info = self.server.info()
        if model_id not in info.served_names:
            raise APIError(404, f"The model `{model_id}` does not exist; this server serves "
                                f"{', '.join(info.served_names)}", param="model",
                           code="model_not_found")
        resp.media = (anthropic_api.model_card(info, model_id)
                      if req.get_header("anthropic-version") is not None
                      else openai_shapes.model_card(info, model_id))


class Tokenize:
    def __init__(self, server: _Server, detokenize: bool = False):
        self.server = server
        self.detokenize = detokenize

    def on_post(self, req, resp):
        body = _read_json(req)
        fn = tokenize_api.detokenize if self.detokenize else tokenize_api.tokenize
        resp.media = fn(body, self.server.info())


class Version:
    def on_get(self, req, resp):
        resp.media = tokenize_api.version()


class TokenizerInfo:
    def __init__(self, server: _Server):
        self.server = server

    def on_get(self, req, resp):
        resp.media = tokenize_api.tokenizer_info(self.server.info())


class Messages:
    def __init__(self, server: _Server):
        self.server = server

    def on_post(self, req, resp):
        body = _read_json(req)
        plan = anthropic_api.parse_messages(body, self.server.info(),
                                            "msg_" + secrets.token_hex(12),
                                            self.server.settings.thinking_secret)
        timed, stream = self.server.open(plan.request, req)
        if not plan.stream:
            try:
                choices, final = accumulate((e for e in timed if e is not None), plan.samples)
            finally:
                stream.cancel()
            resp.media = anthropic_api.message_response(
                plan, choices[0], final, choices if plan.request.variants else None)
            return

        def frames():
            for item in anthropic_api.message_stream(plan, timed):
                yield sse.event(*item) if item is not None else sse.event(
                    "ping", {"type": "ping"})

        def on_error(err: APIError):
            yield sse.event("error", anthropic_body_of(err))

        _sse_response(resp, _guarded(frames(), on_error, [stream]))


def anthropic_body_of(err: APIError) -> dict:
    return body_for("anthropic", err)


class CountTokens:
    def __init__(self, server: _Server):
        self.server = server

    def on_post(self, req, resp):
        body = _read_json(req)
        resp.media = {"input_tokens": anthropic_api.parse_count_tokens(body, self.server.info())}


class Health:
    def __init__(self, server: _Server):
        self.server = server

    def on_get(self, req, resp):
        # the watcher's last answer: instant under any load, and while the engine is down
        ok = getattr(self.server.link, "healthy_cached", self.server.link.healthy)()
        controller = admission.current()
        if controller is not None and controller.draining:
            resp.status, resp.media = 503, {"status": "draining"}
            return
        resp.status = 200 if ok else 503
        resp.media = {"status": "ok" if ok else "engine unavailable"}


class Metrics:
    def __init__(self, server: _Server):
        self.server = server

    def on_get(self, req, resp):
        try:
            stats = self.server.link.stats()
        except Exception:  # the engine being down must not hide the front end's metrics
            stats = None
        data, content_type = metrics.render(stats)
        resp.content_type = content_type
        resp.data = data


class OpenAPI:
    def on_get(self, req, resp):
        from serving.http.openapi import spec
        resp.media = spec()


def create_app(settings: Settings, link=None) -> falcon.App:
    """The WSGI app. `link` defaults to a gRPC `EngineLink` to `settings.engine`."""
    if link is None and len(settings.engines) > 1:
        from serving.http.router import EngineSet
        link = EngineSet(settings.engines)
    own_link = link is None
    if link is None:
        from serving.http.engine_link import EngineLink
        link = EngineLink(settings.engine)
    server = _Server(settings, link)
    if own_link:       # the model's card and tokenizer before the first request needs them
        threading.Thread(target=server.prefetch, name="flaxserve-model-info",
                         daemon=True).start()
    app = falcon.App(middleware=[_Middleware(KeyChecker(settings.api_keys),
                                             settings.metrics_public)])
    app.req_options.strip_url_path_trailing_slash = True
    app.add_error_handler(Exception, _error_handler)
    app.add_error_handler(falcon.HTTPError, _error_handler)   # 404/405 in protocol shapes
    app.add_route("/v1/chat/completions", ChatCompletions(server))
    app.add_route("/v1/completions", Completions(server))
    app.add_route("/v1/models", Models(server))
    app.add_route("/v1/models/{model_id:path}", Model(server))
    store = ResponseStore(settings.response_store)
    app.add_route("/v1/responses", responses_api.Responses(server, store))
    app.add_route("/v1/responses/{response_id}", responses_api.StoredResponse(store))
    app.add_route("/v1/responses/{response_id}/input_items", responses_api.InputItems(store))
    app.add_route("/tokenize", Tokenize(server))
    app.add_route("/detokenize", Tokenize(server, detokenize=True))
    app.add_route("/version", Version())
    app.add_route("/tokenizer_info", TokenizerInfo(server))
    app.add_route("/v1/messages", Messages(server))
    app.add_route("/v1/messages/count_tokens", CountTokens(server))
    app.add_route("/health", Health(server))
    app.add_route("/metrics", Metrics(server))
    app.add_route("/openapi.json", OpenAPI())
    return app
