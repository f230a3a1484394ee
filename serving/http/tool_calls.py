"""Tool calls in model output: the Hermes / Qwen `<tool_call>{json}</tool_call>` format.

The parser reads the answer's text stream and gives content pieces and tool-call events:
("tool", k, name) once the call's name is known, then ("args", k, fragment)* with the
`arguments` JSON as the model wrote it. It is chunking-invariant (the concatenated
fragments are the same however the text arrives), so a streamed call accumulated by an
SDK equals the non-streamed one: a partial `<tool_call>` is held back, and so is the tail
of the arguments that may be the call object's closing `}`. Blank text next to a call is
dropped. A `<tool_call>` whose name never parses is given back as content, except when
the call was forced (`forced`: the grammar made the whole output calls, so an unfinished
one is a call cut by max_tokens, never text the model meant to say).
"""

from __future__ import annotations

import json
import re

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')
_TAIL = re.compile(r"\s*\}?\s*$")


def _partial_suffix(text: str, marker: str) -> int:
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class ToolCallParser:
    def __init__(self, max_calls: int | None = None, forced: bool = False):
        self.max_calls = max_calls
        self.forced = forced
        self.calls = 0            # calls seen (including dropped ones past max_calls)
        self.state = "text"
        self.buf = ""             # text state: unsent text; call state: the call's text
        self.blank = ""           # blank text held back (dropped if a call follows)
        self.header = False       # the current call's name was sent
        self.sent = 0             # characters of the current call's arguments sent

    def _emit(self, out: list, event: tuple) -> None:
        if event[0] == "content" or self.max_calls is None or self.calls <= self.max_calls:
            out.append(event)

    def _content(self, text: str, out: list) -> None:
        if not text:
            return
        stripped = text.rstrip()
        if stripped:
            self._emit(out, ("content", self.blank + stripped))
            self.blank = ""
        self.blank += text[len(stripped):]

    def feed(self, text: str) -> list[tuple]:
        self.buf += text
        out: list[tuple] = []
        while True:
            if self.state == "text":
                i = self.buf.find(OPEN)
                if i >= 0:
                    self._content(self.buf[:i], out)
                    self.blank = ""
                    self.buf = self.buf[i + len(OPEN):]
                    self.state, self.header, self.sent = "call", False, 0
                    self.calls += 1
                    continue
                keep = _partial_suffix(self.buf, OPEN)
                self._content(self.buf[:len(self.buf) - keep], out)
                self.buf = self.buf[len(self.buf) - keep:]
                return out
            end = self.buf.find(CLOSE)
            body = self.buf[:end] if end >= 0 else \
                self.buf[:len(self.buf) - _partial_suffix(self.buf, CLOSE)]
            if not self.header:
                m = _HEADER.match(body)
                if m:
                    self.header = True
                    try:
                        name = json.loads(f'"{m.group(1)}"')
                    except ValueError:
                        name = m.group(1)
                    self._emit(out, ("tool", self.calls - 1, name))
                    self.args_start = m.end()
                elif end >= 0:          # closed without a name: not a call after all
                    self.calls -= 1
                    self._content(OPEN + self.buf[:end + len(CLOSE)], out)
                    self.buf = self.buf[end + len(CLOSE):]
                    self.state = "text"
                    continue
                else:
                    return out
            args = body[self.args_start:]
            cut = len(args) - len(_TAIL.search(args).group(0))
            if cut > self.sent:
                self._emit(out, ("args", self.calls - 1, args[self.sent:cut]))
                self.sent = cut
            if end < 0:
                return out
            self.buf = self.buf[end + len(CLOSE):]
            self.state = "text"

    def finish(self) -> list[tuple]:
        out: list[tuple] = []
        if self.state == "call" and not self.header:
            self.calls -= 1
            if not self.forced:
                self._content(OPEN + self.buf, out)
        elif self.state == "text":
            self._content(self.buf, out)
        if self.calls == 0 and self.blank:
            out.append(("content", self.blank))
        self.buf = self.blank = ""
        return out


def arguments_object(arguments: str):
    """A call's arguments as a mapping (Anthropic `input`); {} when empty or not JSON."""
    if not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
