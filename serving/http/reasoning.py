"""Splitting a model's output into reasoning and answer (Qwen3 style `<think>...</think>`).

A sample is "inside thinking" from its first token when the prompt left a `<think>` open
(templates that open it for the model, e.g. `enable_thinking: true` on the default model),
or from the moment it emits `<think>` as its first non-blank output. The splitter works on
the text stream and gives the same split however the text is chunked (streaming and
non-streaming agree): a partial `</think>` at the end of a chunk is held back, and so is
trailing whitespace of the reasoning, which the template puts back itself (`<think>\\n`,
`\\n</think>\\n\\n`).
"""

from __future__ import annotations

OPEN = "<think>"
CLOSE = "</think>"


def prompt_opens_thinking(prompt_text: str) -> bool:
    """Whether the rendered prompt ends inside an open `<think>` block."""
    i = prompt_text.rfind(OPEN)
    return i >= 0 and prompt_text.find(CLOSE, i) < 0


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class ThinkSplitter:
    """Text in, ("reasoning" | "content", text) pieces out."""

    def __init__(self, inside: bool):
        self.state = "think" if inside else "start"
        self.buf = ""
        self.started = False      # whether reasoning text has begun (leading blanks dropped)

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.buf += text
        out: list[tuple[str, str]] = []
        while True:
            if self.state == "start":
                head = self.buf.lstrip()
                if head.startswith(OPEN):
                    self.buf = head[len(OPEN):]
                    self.state = "think"
                    continue
                if not head or OPEN.startswith(head):
                    return out            # still possibly the opening tag
                self.state = "content"
                continue
            if self.state == "think":
                i = self.buf.find(CLOSE)
                if i >= 0:
                    self._reasoning(self.buf[:i].rstrip(), out)
                    self.buf = self.buf[i + len(CLOSE):]
                    self.state = "after"
                    continue
                keep = _partial_suffix(self.buf, CLOSE)
                body = self.buf[:len(self.buf) - keep]
                trimmed = body.rstrip()
                self._reasoning(trimmed, out)
                self.buf = body[len(trimmed):] + self.buf[len(self.buf) - keep:]
                return out
            if self.state == "after":
                head = self.buf.lstrip()
                if not head:
                    self.buf = ""
                    return out
                self.buf = head
                self.state = "content"
                continue
            if self.buf:
                out.append(("content", self.buf))
                self.buf = ""
            return out

    def _reasoning(self, text: str, out: list) -> None:
        if not self.started:
            text = text.lstrip()
        if text:
            self.started = True
            out.append(("reasoning", text))

    def finish(self) -> list[tuple[str, str]]:
        """The end of the sample: what was held back."""
        out: list[tuple[str, str]] = []
        if self.state == "think":
            self._reasoning(self.buf.rstrip(), out)
        elif self.state in ("start", "content") and self.buf:
            out.append(("content", self.buf))
        self.buf = ""
        return out
