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


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def data(obj) -> bytes:
    """A data-only event (OpenAI's framing)."""
    return f"data: {dumps(obj)}\n\n".encode()


def event(name: str, obj) -> bytes:
    """A named event (Anthropic's framing): the `event:` line matches the data's type."""
    return f"event: {name}\ndata: {dumps(obj)}\n\n".encode()


def comment(text: str = "ping") -> bytes:
    return f": {text}\n\n".encode()
