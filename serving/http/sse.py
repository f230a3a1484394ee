"""Server-sent events framing.

Each event is one `bytes` object that the WSGI server writes (and flushes) on its own,
because the Falcon response is a generator: nothing buffers between the engine's tokens
and the socket. Events end with a blank line; `: ping` comment lines are keep-alives.
"""

from __future__ import annotations

import json

CONTENT_TYPE = "text/event-stream"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"


# Characters that str.splitlines() treats as line ends although SSE does not: escaped (JSON
# allows it), so a client splitting lines the Python way cannot cut generated text in two.
_LINE_LIKE = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})
# one encoder for every event (json.dumps with options builds a new one per call), and the
# translation only when one of those characters is there: together a third of the
# per-token cost of a stream's Python (measured: docs/speed.md)
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def dumps(obj) -> str:
    s = _ENCODER.encode(obj)
    if "\x85" in s or "\u2028" in s or "\u2029" in s:
        s = s.translate(_LINE_LIKE)
    return s


def data(obj) -> bytes:
    """A data-only event (OpenAI's framing)."""
    return f"data: {dumps(obj)}\n\n".encode()


def event(name: str, obj) -> bytes:
    """A named event (Anthropic's framing): the `event:` line matches the data's type."""
    return f"event: {name}\ndata: {dumps(obj)}\n\n".encode()


def comment(text: str = "ping") -> bytes:
    return f": {text}\n\n".encode()
