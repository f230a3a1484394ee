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


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).translate(_LINE_LIKE)


def data(obj) -> bytes:
    """A data-only event (OpenAI's framing)."""
    return f"data: {dumps(obj)}\n\n".encode()


def event(name: str, obj) -> bytes:
    """A named event (Anthropic's framing): the `event:` line matches the data's type."""
    return f"event: {name}\ndata: {dumps(obj)}\n\n".encode()


def comment(text: str = "ping") -> bytes:
    return f": {text}\n\n".encode()
