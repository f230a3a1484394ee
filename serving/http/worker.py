"""The gunicorn worker of the front end: gthread, with requests buffered before a thread.

Stock gthread hands a connection to a thread as soon as its first byte arrives, and the
thread then blocks reading the rest of the headers: a few dozen clients that trickle
their headers (slowloris) hold every thread, and normal requests wait behind them. Here
the worker's event loop (the same selector gthread uses for keep-alive connections)
reads each request without blocking until its headers and body are complete, with a
deadline (`header_timeout_s` for the head, `body_timeout_s` more for the body), and only
then gives it to a thread, whose parser reads from that buffer. A slow connection costs a
selector entry and its bytes, never a thread, and is closed at its deadline. When the
worker is at `max_connections`, the oldest incomplete request is dropped so that new
clients are still accepted: slow clients cannot exhaust the connection cap either.

SIGINT drains like SIGTERM (a Ctrl-C never cuts a stream short), and on either one the
worker closes its listening sockets at once (new clients are refused, not left hanging)
and starts the admission drain (see `admission.begin_drain`).
"""

from __future__ import annotations

import collections
import selectors
import signal
import time
from functools import partial

from gunicorn.workers.gthread import ThreadWorker

from serving.http import admission

MAX_HEAD = 64 * 1024                 # a longer head goes to the parser, which refuses it
MAX_BUFFERED_BODY = 32 * 1024 * 1024  # a larger body goes to the app, which refuses it

# set in the master by `serving.http.main` before the workers fork
LIMITS = admission.Limits()


def request_complete(buf: bytes) -> bool:
    """Whether `buf` holds one whole HTTP/1.x request (head and body), or enough for the
    parser to refuse it (too long, malformed): then a thread will not wait for more."""
    start = 0
    while buf.startswith(b"\r\n", start):    # blank lines before a request are allowed
        start += 2
    end = buf.find(b"\r\n\r\n", start)
    if end < 0:
        return len(buf) - start > MAX_HEAD
    length, chunked = None, False
    for line in buf[start:end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = value.strip()
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    body = memoryview(buf)[end + 4:]
    if chunked:
        return _chunked_complete(bytes(body))
    if length is None:
        return True
    try:
        n = int(length)
    except ValueError:
        return True
    return n > MAX_BUFFERED_BODY or len(body) >= n


def _chunked_complete(body: bytes) -> bool:
    pos, total = 0, 0
    while True:
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            return len(body) - pos > MAX_HEAD
        try:
            size = int(body[pos:eol].split(b";")[0].strip(), 16)
        except ValueError:
            return True
        if size == 0:                         # last chunk, then trailers and a blank line
            rest = body[eol + 2:]
            return rest.startswith(b"\r\n") or b"\r\n\r\n" in rest
        total += size
        if total > MAX_BUFFERED_BODY:
            return True
        pos = eol + 2 + size + 2
        if pos > len(body):
            return False


def _expects_continue(buf: bytes) -> bool:
    end = buf.find(b"\r\n\r\n")
    return end >= 0 and b"100-continue" in buf[:end].lower()


class BufferingWorker(ThreadWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.buffering: collections.deque = collections.deque()   # oldest first

    def init_signals(self):
        super().init_signals()
        signal.signal(signal.SIGINT, self.handle_exit)

    def handle_exit(self, sig, frame):
        first = self.alive
        super().handle_exit(sig, frame)
        if first:
            self.method_queue.defer(self._stop_listening)
            controller = admission.current()
            if controller is not None:
                controller.begin_drain()

    def _stop_listening(self):
        self.set_accept_enabled(False)
        for s in self.sockets:
            try:
                s.close()
            except OSError:
                pass

    # -- buffering in the event loop ------------------------------------------------------

    def enqueue_req(self, conn):
        """Every request passes here (new, kept-alive, read ahead): buffer it first."""
        held = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        conn.prebuf = bytearray(held)
        conn.head_done = False
        conn.continue_sent = False
        conn.deadline = time.monotonic() + LIMITS.header_timeout_s
        if held and self._complete(conn):
            self._to_thread(conn)
            return
        conn.sock.setblocking(False)
        self.buffering.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ,
                             partial(self._on_readable, conn))

    def _complete(self, conn) -> bool:
        buf = bytes(conn.prebuf)
        if not conn.head_done and b"\r\n\r\n" in buf:
            conn.head_done = True
            conn.deadline = time.monotonic() + LIMITS.body_timeout_s
        if request_complete(buf):
            return True
        if conn.head_done and not conn.continue_sent and _expects_continue(buf):
            conn.continue_sent = True       # the client waits for this before its body
            try:
                conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            except OSError:
                pass
        return False

    def _to_thread(self, conn):
        conn.data_ready = True
        super().enqueue_req(conn)

    def _on_readable(self, conn, sock):
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:                        # closed before its request was complete
            self._drop(conn)
            return
        conn.prebuf += data
        if self._complete(conn):
            self._unwatch(conn)
            self._to_thread(conn)

    def _unwatch(self, conn):
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        try:
            self.buffering.remove(conn)
        except ValueError:
            pass

    def _drop(self, conn):
        self._unwatch(conn)
        self.nr_conns -= 1
        conn.close()

    def handle(self, conn):
        data = conn.prebuf
        conn.prebuf = None
        conn.sock.setblocking(True)
        conn.init()
        if data:
            conn.parser.unreader.unread(bytes(data))
        return super().handle(conn)

    def murder_pending(self):
        super().murder_pending()
        now = time.monotonic()
        for conn in [c for c in self.buffering if c.deadline <= now]:
            self._drop(conn)
        # at the connection cap, the oldest incomplete request makes room for a new client
        while self.buffering and self.nr_conns >= self.worker_connections:
            self._drop(self.buffering[0])
