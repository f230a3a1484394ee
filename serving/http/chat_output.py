"""One sample's output as chat semantics see it: reasoning, answer text and tool calls.

`OutputParser` chains the special-token filter, the `<think>` splitter (serving.http.
reasoning) and the tool-call parser (serving.http.tool_calls) over the engine's text
deltas, and counts reasoning tokens by id. Both protocols build their streamed chunks and
their whole responses from its events, so the two always agree. `OutputSpec` says, per
request, which parsers run; the engine detokenizes with special tokens kept when one
does (the markers are special tokens), and the filter drops the other special tokens'
text when the request asked for `skip_special_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from serving.http import reasoning, tool_calls


@dataclass
class OutputSpec:
    reasoning: bool = False             # parse <think> ... </think>
    thinking_open: bool = False         # the prompt left <think> open
    tools: bool = False                 # parse <tool_call> ... </tool_call>
    max_calls: int | None = None        # 1 when parallel tool calls are off
    forced: bool = False                # a forced call: an unfinished one is not content
    strip: tuple[str, ...] = ()         # special-token texts to drop from the output
    think_ids: tuple[int | None, int | None] = (None, None)   # ids of <think>, </think>

    @property
    def active(self) -> bool:
        return self.reasoning or self.tools


@dataclass
class ParsedOutput:
    reasoning: str = ""
    content: str = ""
    calls: list[dict] = field(default_factory=list)    # {"name", "arguments"} (a string)
    reasoning_tokens: int = 0


class OutputParser:
    def __init__(self, spec: OutputSpec):
        self.spec = spec
        self.think = reasoning.ThinkSplitter(spec.thinking_open) if spec.reasoning else None
        self.tools = tool_calls.ToolCallParser(spec.max_calls, spec.forced) if spec.tools else None
        self.in_think = spec.reasoning and spec.thinking_open
        self.reasoning_tokens = 0
        self.calls = 0
        self.held = ""            # a tail that may be the start of a special token's text

    def _count(self, token_ids) -> None:
        open_id, close_id = self.spec.think_ids
        for t in token_ids:
            if self.in_think:
                self.reasoning_tokens += 1
                if t == close_id:
                    self.in_think = False
            elif self.spec.reasoning and t == open_id and self.reasoning_tokens == 0:
                self.in_think = True
                self.reasoning_tokens += 1

    def _answer(self, pieces) -> list[tuple]:
        out = []
        for kind, text in pieces:
            if kind == "reasoning" or self.tools is None:
                out.append((kind, text))
            else:
                out.extend(self.tools.feed(text))
        return out

    def feed(self, text: str, token_ids=()) -> list[tuple]:
        """Events: ("reasoning", text), ("content", text), ("tool", k, name),
        ("args", k, fragment)."""
        self._count(token_ids)
        text = self._strip(text)
        pieces = self.think.feed(text) if self.think else [("content", text)]
        return self._merge(self._answer(pieces))

    def _strip(self, text: str) -> str:
        """Drop the special-token texts; hold back a tail that may start one."""
        if not self.spec.strip:
            return text
        text = self.held + text
        for s in self.spec.strip:
            text = text.replace(s, "")
        keep = max(reasoning._partial_suffix(text, s) for s in self.spec.strip)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def finish(self) -> list[tuple]:
        tail, self.held = self.held, ""
        pieces = self.think.feed(tail) if self.think else [("content", tail)]
        events = self._answer(pieces)
        events += self._answer(self.think.finish()) if self.think else []
        if self.tools is not None:
            events.extend(self.tools.finish())
        return self._merge(events)

    def _merge(self, events) -> list[tuple]:
        out: list[tuple] = []
        for ev in events:
            if ev[0] in ("reasoning", "content") and not ev[1]:
                continue
            if ev[0] == "tool":
                self.calls += 1
            if out and ev[0] in ("reasoning", "content") and out[-1][0] == ev[0]:
                out[-1] = (ev[0], out[-1][1] + ev[1])
            elif out and ev[0] == "args" and out[-1][0] == "args" and out[-1][1] == ev[1]:
                out[-1] = ("args", ev[1], out[-1][2] + ev[2])
            else:
                out.append(ev)
        return out


def delta_events(parser: OutputParser | None, delta) -> list[tuple]:
    """One engine `Delta` as parser events, for both protocols' streams: plain content when
    no parser runs; the delta that ends the sample also flushes what the parser held back."""
    if parser is None:
        return [("content", delta.text)] if delta.text else []
    events = parser.feed(delta.text, [t.id for t in delta.tokens])
    if delta.finish_reason is not None:
        events += parser.finish()
    return events


def parse_whole(spec: OutputSpec, text: str, token_ids=()) -> ParsedOutput:
    """A whole sample at once (the non-streaming path)."""
    p = OutputParser(spec)
    result = ParsedOutput()
    for ev in p.feed(text, token_ids) + p.finish():
        if ev[0] == "reasoning":
            result.reasoning += ev[1]
        elif ev[0] == "content":
            result.content += ev[1]
        elif ev[0] == "tool":
            result.calls.append({"name": ev[2], "arguments": ""})
        else:
            result.calls[-1]["arguments"] += ev[2]
    result.reasoning_tokens = p.reasoning_tokens
    return result


def make_spec(tok, prompt_text: str, tools: bool, max_calls: int | None,
              skip_special_tokens: bool, forced: bool = False) -> OutputSpec:
    """Which parsers a request's output needs, for this tokenizer and rendered prompt.

    Reasoning is parsed when the vocabulary has `<think>`/`</think>` as special tokens
    (a reasoning model's vocabulary); tool calls when the request has tools and may call
    one. `tok` is a serving.http.prompt.PromptTokenizer."""
    open_id = tok.single_token(reasoning.OPEN)
    close_id = tok.single_token(reasoning.CLOSE)
    has_reasoning = close_id is not None
    markers = set()
    if has_reasoning:
        markers |= {reasoning.OPEN, reasoning.CLOSE}
    if tools:
        markers |= {tool_calls.OPEN, tool_calls.CLOSE}
    strip = tuple(t for t in tok.skip_texts if t not in markers) if skip_special_tokens \
        else ()
    return OutputSpec(reasoning=has_reasoning,
                      thinking_open=has_reasoning and reasoning.prompt_opens_thinking(
                          prompt_text),
                      tools=tools, max_calls=max_calls, forced=forced, strip=strip,
                      think_ids=(open_id, close_id))


def thinking_fields(tok, spec: OutputSpec, constrained: bool,
                    max_thinking_tokens: int | None, max_tokens: int | None = None) -> dict:
    """`thinking_end_ids` / `max_thinking_tokens` for the engine: only when the prompt
    opened a thinking block (then a guided constraint starts after `</think>`, and a
    budget forces `</think>`); otherwise the sample is all answer and neither applies.
    A forced tool call with no budget of its own may think for half of `max_tokens`, so
    that the call (which the engine will not let the sample skip) fits in the rest."""
    if not spec.thinking_open or not (constrained or max_thinking_tokens is not None):
        return {"max_thinking_tokens": None}
    if spec.forced and max_thinking_tokens is None and max_tokens:
        max_thinking_tokens = max(1, max_tokens // 2)
    end_ids = tok.encode(reasoning.CLOSE, add_special_tokens=False)
    return {"thinking_end_ids": end_ids, "max_thinking_tokens": max_thinking_tokens}
