"""Admission control of one HTTP worker: bounded work, fast refusals, no work for nobody.

A WSGI wrapper around the Falcon app. Every POST takes one of `max_inflight` places for its
whole life (until the server closes the response, streamed or not); up to `max_waiting`
more wait at most `queue_timeout_s` for one. Beyond that the answer is immediate: 429
`rate_limit_exceeded` / `server_overloaded` (OpenAI shape) or 529 `overloaded_error` on
/v1/messages (Anthropic shape), with Retry-After. GETs (`/health`, `/metrics`, models)
never wait here, and the worker has threads for them beyond the POST places
(`Limits.threads`), so they answer fast under any load.

Each admitted request carries a `Ticket`: the engine streams it opened (registered by
`engine_link.GenStream` through `attach`) and its client socket. A watcher thread polls
the sockets of all tickets (POLLRDHUP, every 0.2 s): a client that left gets its engine
calls cancelled, streaming or not, which frees the engine slots within a fraction of a
second. On shutdown (`begin_drain`) new POSTs are refused with 503 and, at the drain
deadline, every ticket still open is aborted with an error that the routes write as the
protocol's in-band error event (and `[DONE]` for OpenAI).
"""

from __future__ import annotations

import json
import logging
import select
import threading
import time
from dataclasses import dataclass

from serving.http.errors import APIError, body_for

log = logging.getLogger("flaxserve.http")

RESERVE_THREADS = 16        # worker threads beyond the POST places: GETs, refusals
WATCH_INTERVAL_S = 0.2
SEND_TIMEOUT_S = 60.0       # a client that stops reading the response is cut after this

_METRICS: dict = {}
_METRICS_LOCK = threading.Lock()


def _metric(name: str):
    """Counters made on first use: prometheus_client must not be imported before
    `flaxserve http` has chosen its multiprocess directory (this module's `Limits` is
    imported by the flag parsers)."""
    with _METRICS_LOCK:
        if not _METRICS:
            _make_metrics()
    return _METRICS[name]


def _make_metrics() -> None:
    from prometheus_client import Counter
    _METRICS["rejected"] = Counter("flaxserve_http_rejected_total",
                                   "requests refused by admission control", ["reason"])
    _METRICS["disconnects"] = Counter("flaxserve_http_client_disconnects_total",
                                      "admitted requests whose client left before the end")


@dataclass
class Limits:
    """The front end's load limits, per gunicorn worker (flags of `flaxserve http`)."""
    max_inflight: int = 64           # POSTs admitted at once
    max_waiting: int = 64            # POSTs waiting for a place
    queue_timeout_s: float = 10.0    # longest wait for a place before a 429/529
    retry_after_s: float = 1.0       # the Retry-After of refusals
    header_timeout_s: float = 10.0   # request line + headers must arrive within this
    body_timeout_s: float = 30.0     # the body within this after the headers
    max_connections: int = 1000      # open connections per worker
    drain_timeout_s: float = 120.0   # shutdown: how long running requests may finish

    def validate(self) -> "Limits":
        for name in ("max_inflight", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_waiting < 0:
            raise ValueError("--max-waiting must be >= 0")
        for name, flag in (("queue_timeout_s", "--queue-timeout"),
                           ("header_timeout_s", "--header-timeout"),
                           ("body_timeout_s", "--body-timeout"),
                           ("drain_timeout_s", "--drain-timeout")):
            value = getattr(self, name)
            if not value >= 0 or value == float("inf"):
                raise ValueError(f"{flag} must be a finite number of seconds >= 0")
        if self.max_connections <= self.threads:
            raise ValueError(f"--max-connections must exceed the worker's threads "
                             f"({self.threads} = --max-inflight + --max-waiting + "
                             f"{RESERVE_THREADS})")
        return self

    @property
    def threads(self) -> int:
        return self.max_inflight + self.max_waiting + RESERVE_THREADS


def _protocol(path: str) -> str:
    while "//" in path:
        path = path.replace("//", "/")
    return "anthropic" if path.startswith("/v1/messages") else "openai"


def overloaded(protocol: str, message: str, retry_after_s: float) -> APIError:
    """The refusal of an overloaded server: 429 (OpenAI) or 529 (Anthropic)."""
    return APIError(529 if protocol == "anthropic" else 429, message,
                    code="server_overloaded", retry_after=retry_after_s)


def shutting_down(retry_after_s: float = 1.0) -> APIError:
    return APIError(503, "the server is shutting down; retry on another instance or later",
                    code="server_shutting_down", retry_after=retry_after_s)


_STATUS_LINE = {429: "429 Too Many Requests", 503: "503 Service Unavailable",
                529: "529 Site Overloaded"}


def error_response(start_response, protocol: str, err: APIError, extra_headers=()) -> list:
    body = json.dumps(body_for(protocol, err)).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    if err.retry_after is not None:
        headers.append(("Retry-After", str(max(1, int(round(err.retry_after))))))
    start_response(_STATUS_LINE.get(err.status, f"{err.status} Error"),
                   headers + list(extra_headers))
    return [body]


class Ticket:
    """One admitted request: its client socket and the engine streams it opened."""

    def __init__(self, sock):
        self.sock = sock
        self.streams: list = []
        self.aborted: APIError | None = None
        self.released = False
        self._lock = threading.Lock()

    def add(self, stream) -> None:
        with self._lock:
            self.streams.append(stream)
            aborted = self.aborted
        if aborted is not None:
            stream.abort(aborted)

    def abort(self, err: APIError) -> None:
        with self._lock:
            if self.aborted is not None:
                return
            self.aborted = err
            streams = list(self.streams)
        for s in streams:
            s.abort(err)


_local = threading.local()
_current: "Admission | None" = None


def attach(stream) -> None:
    """Called by an engine stream as it opens: tie it to this thread's request, if any."""
    ticket = getattr(_local, "ticket", None)
    if ticket is not None:
        ticket.add(stream)


def current() -> "Admission | None":
    """This worker's admission controller (set when the app is built)."""
    return _current


class _Closing:
    """The app's response iterable, plus the release of the place when the server closes it
    (WSGI calls close() whatever happened: done, error, client gone)."""

    def __init__(self, result, release):
        self._result = result
        self._release = release

    def __iter__(self):
        return iter(self._result)

    def close(self):
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                close()
        finally:
            self._release()


class Admission:
    def __init__(self, app, limits: Limits):
        global _current
        self.app = app
        self.limits = limits
        self._cond = threading.Condition()
        self.inflight = 0
        self.waiting = 0
        self.draining = False
        self._tickets: set[Ticket] = set()
        self._watcher: threading.Thread | None = None
        _current = self

    # -- places -------------------------------------------------------------------------

    def _acquire(self) -> str | None:
        """None when admitted, else why not ("busy", "timeout", "draining")."""
        lim = self.limits
        with self._cond:
            if self.draining:
                return "draining"
            if self.inflight < lim.max_inflight and not self.waiting:
                self.inflight += 1
                return None
            if self.waiting >= lim.max_waiting:
                return "busy"
            self.waiting += 1
            deadline = time.monotonic() + lim.queue_timeout_s
            try:
                while self.inflight >= lim.max_inflight:
                    left = deadline - time.monotonic()
                    if self.draining:
                        return "draining"
                    if left <= 0:
                        return "timeout"
                    self._cond.wait(left)
            finally:
                self.waiting -= 1
            self.inflight += 1
            return None

    def _release(self, ticket: Ticket) -> None:
        _local.ticket = None
        with self._cond:
            if ticket.released:
                return
            ticket.released = True
            self.inflight -= 1
            self._tickets.discard(ticket)
            self._cond.notify()

    # -- WSGI ---------------------------------------------------------------------------

    def __call__(self, environ, start_response):
        if environ.get("REQUEST_METHOD") != "POST":
            return self.app(environ, start_response)
        protocol = _protocol(environ.get("PATH_INFO") or "/")
        refused = self._acquire()
        if refused is not None:
            _metric("rejected").labels(refused).inc()
            if refused == "draining":
                err = shutting_down(self.limits.retry_after_s)
            else:
                why = ("no place in the queue" if refused == "busy"
                       else "none finished within the queue timeout")
                err = overloaded(protocol, f"the server is overloaded "
                                 f"({self.limits.max_inflight} requests running, {why}); "
                                 "retry after the Retry-After delay",
                                 self.limits.retry_after_s)
            return error_response(start_response, protocol, err)
        sock = environ.get("gunicorn.socket")
        if sock is not None:
            try:
                sock.settimeout(SEND_TIMEOUT_S)
            except OSError:
                pass
        ticket = Ticket(sock)
        with self._cond:
            self._tickets.add(ticket)
        _local.ticket = ticket
        self._ensure_watcher()
        try:
            result = self.app(environ, start_response)
        except BaseException:
            self._release(ticket)
            raise
        return _Closing(result, lambda: self._release(ticket))

    # -- clients that left ----------------------------------------------------------------

    def _ensure_watcher(self) -> None:
        if self._watcher is None:
            with self._cond:
                if self._watcher is None:
                    self._watcher = threading.Thread(target=self._watch, daemon=True,
                                                     name="flaxserve-disconnects")
                    self._watcher.start()

    def _watch(self) -> None:
        gone_mask = select.POLLHUP | select.POLLERR | select.POLLNVAL | getattr(
            select, "POLLRDHUP", 0)
        while True:
            time.sleep(WATCH_INTERVAL_S)
            with self._cond:
                tickets = [t for t in self._tickets if t.sock is not None
                           and t.aborted is None]
            if not tickets:
                continue
            poller = select.poll()
            by_fd = {}
            for t in tickets:
                try:
                    fd = t.sock.fileno()
                except OSError:
                    continue
                if fd < 0:
                    continue
                by_fd[fd] = t
                poller.register(fd, select.POLLIN | gone_mask)
            try:
                events = poller.poll(0)
            except OSError:
                continue
            for fd, ev in events:
                if ev & gone_mask and fd in by_fd:
                    _metric("disconnects").inc()
                    by_fd[fd].abort(APIError(499, "the client closed the connection"))

    # -- shutdown -------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Refuse new POSTs; abort what still runs at the drain deadline."""
        with self._cond:
            if self.draining:
                return
            self.draining = True
            self._cond.notify_all()
        threading.Thread(target=self._drain, daemon=True, name="flaxserve-drain").start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.limits.drain_timeout_s
        while time.monotonic() < deadline:
            with self._cond:
                if not self._tickets:
                    return
            time.sleep(0.1)
        with self._cond:
            tickets = list(self._tickets)
        if tickets:
            log.warning("drain timeout (%.0f s): ending %d running requests with an error",
                        self.limits.drain_timeout_s, len(tickets))
        err = shutting_down(self.limits.retry_after_s)
        for t in tickets:
            t.abort(err)

    def stats(self) -> dict:
        with self._cond:
            return {"inflight": self.inflight, "waiting": self.waiting,
                    "draining": self.draining}
