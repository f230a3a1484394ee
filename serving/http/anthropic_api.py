"""The Anthropic Messages protocol: validation -> `GenRequest`, responses and stream events.

Pure functions, like `openai_*`. Anthropic's rules that differ from OpenAI's: `system`
is a top-level string or text blocks; consecutive same-role turns are merged; a final
assistant turn is a prefill that the reply continues (the reply holds only new text);
`max_tokens` is required; temperature is in [0, 1]; `input_tokens` excludes the prompt
tokens read from the prefix cache (`cache_read_input_tokens`), so input + cache_read is
the prompt count that `count_tokens` returns.
Chat semantics: `tools` (`input_schema`), `tool_choice` auto / any / tool / none with
`disable_parallel_tool_use` (any and tool force a call through a guided grammar),
`tool_use` / `tool_result` blocks in the history, `thinking` enabled (the template opens
`<think>`; `budget_tokens` becomes the engine's `max_thinking_tokens`) or disabled,
`thinking` blocks signed with an HMAC (serving.http.thinking_signature) and verified when
they come back, `output_config.format` json_schema (and the `guided_*` extensions).
Research fields (docs/research.md), parsed by the chat route's own code: `steering`, and
`variants`, whose samples come back whole as a `variants` array next to variant 0's
message (not streamed).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from serving.http import thinking_signature
from serving.http.chat_output import (OutputParser, OutputSpec, delta_events, make_spec,
                                      parse_whole, thinking_fields)
from serving.http.errors import bad_request
from serving.http.limits import MAX_STOP_CHARS, MAX_STOP_SEQUENCES
from serving.http.generation import Choice, Delta, Final, GenRequest, ModelInfo, Usage
from serving.http.openai_fields import (GUIDED, SAMPLING_FIELDS, _bool, _is_int, _research,
                                        _sampling)
from serving.http.openai_shapes import speculative_usage
from serving.http.prompt import (ChatOptions, check_context, fit_chat, render_chat,
                                 template_kwargs)
from serving.http.tool_calls import arguments_object
from serving.http.tools import ToolSpec, anthropic_tools, call_grammar, check_schema

ANTHROPIC_MAX_TEMPERATURE = 1.0
MIN_THINKING_BUDGET = 1024
IGNORED = {"metadata", "service_tier", "container", "mcp_servers", "context_management"}
OWN = {"chat_template", "chat_template_kwargs", "skip_special_tokens",
       "spaces_between_special_tokens", *GUIDED, "variants", "steering"}
MESSAGE_FIELDS = {"model", "messages", "system", "max_tokens", "stop_sequences", "stream",
                  "tools", "tool_choice", "thinking", "output_config"} | IGNORED | OWN | \
    SAMPLING_FIELDS
COUNT_FIELDS = MESSAGE_FIELDS - {"stream"}


@dataclass
class AnthropicPlan:
    request: GenRequest
    model: str
    stream: bool
    prompt_tokens: int
    output: OutputSpec = field(default_factory=OutputSpec)
    secret: bytes = b""
    compacted_tokens: int = 0

    @property
    def samples(self) -> int:
        """The generation's choices: one, or one per variant (docs/research.md)."""
        return len(self.request.variants or ()) or 1


def _text_blocks(content, where: str) -> str:
    """`system` or a tool_result's content: a string or text blocks."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}: must be a string or a list of text blocks", where)
    texts = []
    for j, block in enumerate(content):
        p = f"{where}[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "image":
            raise bad_request(f"{p}: this model has no vision; image blocks are not "
                              "supported", f"{p}.type")
        else:
            raise bad_request(f"{p}: expected a text block", f"{p}.type")
    return "".join(texts)


def _turn(m: dict, where: str, secret: bytes | None) -> list[dict]:
    """One Anthropic turn -> template messages (tool results become `tool` messages)."""
    role = m["role"]
    content = m.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise bad_request(f"{where}: content must be a string or a list of content blocks",
                          where)
    texts, calls, results, thinking = [], [], [], []
    for j, block in enumerate(content):
        p = f"{where}[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise bad_request(f"{p}.text: a text block needs a string `text`", f"{p}.text")
            texts.append(block["text"])
        elif kind == "thinking" and role == "assistant":
            text = block.get("thinking")
            if not isinstance(text, str):
                raise bad_request(f"{p}.thinking: a string is required", f"{p}.thinking")
            if secret is not None and not thinking_signature.verify(
                    secret, text, block.get("signature")):
                raise bad_request(f"{p}.signature: the thinking block's signature does not "
                                  "match its text (it was changed, or signed by another "
                                  "server)", f"{p}.signature")
            thinking.append(text)
        elif kind == "redacted_thinking" and role == "assistant":
            if not isinstance(block.get("data"), str):
                raise bad_request(f"{p}.data: a string is required", f"{p}.data")
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise bad_request(f"{p}: a tool_use block needs `id` and `name`", p)
            if not isinstance(block.get("input"), dict):
                raise bad_request(f"{p}.input: must be an object", f"{p}.input")
            calls.append({"id": block["id"], "type": "function",
                          "function": {"name": block["name"], "arguments": block["input"]}})
        elif kind == "tool_result" and role == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise bad_request(f"{p}.tool_use_id: required", f"{p}.tool_use_id")
            is_error = block.get("is_error", False)
            if not isinstance(is_error, bool):
                raise bad_request(f"{p}.is_error: must be a boolean", f"{p}.is_error")
            text = _text_blocks(block.get("content", ""), f"{p}.content")
            results.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                            "content": ("Error: " + text) if is_error else text})
        elif kind == "image":
            raise bad_request(f"{p}: this model has no vision; image blocks are not "
                              "supported", f"{p}.type")
        elif kind in ("document", "server_tool_use", "web_search_tool_result"):
            raise bad_request(f"{p}: {kind} blocks are not supported", f"{p}.type")
        else:
            raise bad_request(f"{p}.type: content block type {kind!r} is not valid in a "
                              f"{role} turn", f"{p}.type")
    out = list(results)
    if texts or calls or thinking or not results:
        msg = {"role": role, "content": "".join(texts)}
        if calls:
            msg["tool_calls"] = calls
        if thinking:
            msg["reasoning_content"] = "\n".join(thinking)
        out.append(msg)
    return out


def normalize(body: dict, secret: bytes | None = None) -> tuple[list[dict], bool]:
    """Template messages (system first, same-role turns merged) and whether the last turn
    is an assistant prefill. Thinking signatures are checked when `secret` is given."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages: must be a non-empty list", "messages")
    out: list[dict] = []
    system = body.get("system")
    if system is not None:
        text = _text_blocks(system, "system")
        if text:
            out.append({"role": "system", "content": text})
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise bad_request(f"{where}.role: must be 'user' or 'assistant'", f"{where}.role")
        for msg in _turn(m, f"{where}.content", secret):
            last = out[-1] if out else None
            if last is not None and last["role"] == msg["role"] and msg["role"] != "tool" \
                    and not last.get("tool_calls"):
                sep = "\n\n" if last["content"] and msg["content"] else ""
                last["content"] += sep + msg["content"]
                for key in ("tool_calls", "reasoning_content"):
                    if key in msg:
                        last[key] = msg[key]
            else:
                out.append(msg)
    prefill = out[-1]["role"] == "assistant"
    if prefill:
        out[-1]["content"] = out[-1]["content"].rstrip()  # Anthropic rejects trailing space
    return out, prefill


def _tool_choice(body: dict, tools: list[ToolSpec]) -> tuple[str, list[ToolSpec], bool]:
    """(auto | any | tool | none, the tools a forced call may use, parallel allowed)."""
    choice = body.get("tool_choice")
    if choice is None:
        return ("auto" if tools else "none"), tools, True
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise bad_request("tool_choice.type: must be auto, any, tool or none",
                          "tool_choice.type")
    no_parallel = choice.get("disable_parallel_tool_use", False)
    if not isinstance(no_parallel, bool):
        raise bad_request("tool_choice.disable_parallel_tool_use: must be a boolean",
                          "tool_choice.disable_parallel_tool_use")
    if kind in ("any", "tool") and not tools:
        raise bad_request(f"tool_choice: `{kind}` needs `tools`", "tool_choice")
    if kind == "tool":
        named = [t for t in tools if t.name == choice.get("name")]
        if not named:
            raise bad_request(f"tool_choice.name: {choice.get('name')!r} is not in `tools`",
                              "tool_choice.name")
        return kind, named, not no_parallel
    return kind, tools, not no_parallel


def _thinking(body: dict, max_tokens) -> tuple[bool | None, int | None]:
    """(enable_thinking for the template, the thinking budget)."""
    thinking = body.get("thinking")
    if thinking is None:
        return None, None
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "disabled":
        return False, None
    if kind == "adaptive":
        return True, None
    if kind != "enabled":
        raise bad_request("thinking.type: must be enabled, disabled or adaptive",
                          "thinking.type")
    budget = thinking.get("budget_tokens")
    if not _is_int(budget) or budget < MIN_THINKING_BUDGET:
        raise bad_request(f"thinking.budget_tokens: an integer >= {MIN_THINKING_BUDGET} is "
                          f"required, got {budget!r}", "thinking.budget_tokens")
    if _is_int(max_tokens) and budget >= max_tokens:
        raise bad_request(f"thinking.budget_tokens: must be less than max_tokens "
                          f"({max_tokens}), got {budget}", "thinking.budget_tokens")
    return True, budget


def _output_format(body: dict) -> dict:
    config = body.get("output_config")
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise bad_request("output_config: must be an object", "output_config")
    fmt = config.get("format")
    if fmt is None:
        return {}
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise bad_request("output_config.format.type: must be json_schema",
                          "output_config.format.type")
    return {"guided_json": check_schema(fmt.get("schema"), "output_config.format.schema")}


@dataclass
class _Prompt:
    ids: list[int]
    text: str
    tools: list[ToolSpec]
    choice: str
    allowed: list[ToolSpec]
    parallel: bool
    budget: int | None
    compacted_tokens: int


def _check(body, known: set[str]) -> None:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    unknown = sorted(set(body) - known)
    if unknown:
        raise bad_request(f"{unknown[0]}: Extra inputs are not permitted", unknown[0])
    if "stop" in body:
        raise bad_request("stop: the Messages API calls it `stop_sequences`", "stop")


def _prompt(body: dict, info: ModelInfo, secret: bytes | None, max_tokens) -> _Prompt:
    """Validate the chat parts and render + tokenize the prompt (count_tokens uses it too,
    so its count equals a real request's)."""
    tools = anthropic_tools(body.get("tools"))
    choice, allowed, parallel = _tool_choice(body, tools)
    enable, budget = _thinking(body, max_tokens)
    messages, prefill = normalize(body, secret)
    kwargs, compact = template_kwargs(body)
    # The Messages API thinks only when asked to.
    kwargs.setdefault("enable_thinking", bool(enable))
    template = body.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise bad_request("chat_template: must be a string", "chat_template")
    options = ChatOptions(add_generation_prompt=not prefill, continue_final_message=prefill,
                          chat_template=template, chat_template_kwargs=kwargs,
                          tools=[t.for_template() for t in tools] or None)
    tok = info.tokenizer

    def encode_chat(msgs):
        text = render_chat(tok.chat_template, msgs, options, tok.bos_token, tok.eos_token)
        return text, tok.encode(text, add_special_tokens=False)

    fitted = fit_chat(encode_chat, messages, max_tokens if _is_int(max_tokens) else None,
                      info.max_model_len, compact)
    return _Prompt(fitted.ids, fitted.text, tools, choice, allowed, parallel, budget,
                   fitted.compacted_tokens)


def prompt_ids(body: dict, info: ModelInfo) -> list[int]:
    return _prompt(body, info, None, body.get("max_tokens")).ids


def parse_messages(body, info: ModelInfo, request_id: str | None = None,
                   secret: bytes = b"") -> AnthropicPlan:
    _check(body, MESSAGE_FIELDS)
    model = info.resolve(body.get("model"))
    max_tokens = body.get("max_tokens")
    if not _is_int(max_tokens) or max_tokens < 1:
        raise bad_request(f"max_tokens: required, an integer >= 1, got {max_tokens!r}",
                          "max_tokens")
    stops = body.get("stop_sequences")
    if stops is not None and not (isinstance(stops, list) and
                                  all(isinstance(s, str) and s for s in stops)):
        raise bad_request("stop_sequences: must be a list of non-empty strings",
                          "stop_sequences")
    if stops and (len(stops) > MAX_STOP_SEQUENCES or
                  any(len(s) > MAX_STOP_CHARS for s in stops)):
        raise bad_request(f"stop_sequences: at most {MAX_STOP_SEQUENCES} strings of at most "
                          f"{MAX_STOP_CHARS} characters each", "stop_sequences")
    if body.get("max_thinking_tokens") is not None:
        raise bad_request("max_thinking_tokens: the Messages API sets the thinking budget "
                          "with thinking.budget_tokens", "max_thinking_tokens")
    t = body.get("temperature")
    if isinstance(t, (int, float)) and not isinstance(t, bool) and t > ANTHROPIC_MAX_TEMPERATURE:
        raise bad_request(f"temperature: must be in [0, 1] on the Messages API, got {t}",
                          "temperature")
    meta = body.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise bad_request("metadata: must be an object", "metadata")
    stream = _bool(body, "stream", False)
    prompt = _prompt(body, info, secret, max_tokens)
    guided = {**{g: body[g] for g in GUIDED if body.get(g) is not None}, **_output_format(body)}
    forced = prompt.choice in ("any", "tool")
    if forced and any(v not in (None, False) for v in guided.values()):
        raise bad_request("tool_choice: a forced tool call cannot be combined with "
                          "output_config.format or guided decoding", "tool_choice")
    tok = info.tokenizer
    skip = _bool(body, "skip_special_tokens", True)
    spec = make_spec(tok, prompt.text, bool(prompt.tools) and prompt.choice != "none",
                     None if prompt.parallel else 1, skip, forced=forced)
    if forced:
        guided = {"guided_grammar": call_grammar(prompt.allowed, prompt.parallel,
                                                 tok.special_texts)}
    constrained = any(v not in (None, False) for v in guided.values())
    sampling = _sampling({k: v for k, v in body.items() if k in SAMPLING_FIELDS},
                         {"max_tokens": max_tokens, "stop": stops or [], **guided,
                          **thinking_fields(tok, spec, constrained, prompt.budget,
                                            max_tokens)},
                         tok.vocab_size, tok.encode)
    if sampling.n != 1 or sampling.best_of not in (None, 1):
        raise bad_request("n: the Messages API returns one message", "n")
    ids = prompt.ids
    check_context(len(ids), max_tokens, info.max_model_len)
    research = _variants_here(_research(body, sampling, tok.vocab_size, stream), stream)
    rid = request_id or "msg_" + secrets.token_hex(12)
    req = GenRequest(rid, model, ids, sampling,
                     skip_special_tokens=skip and not spec.active,
                     spaces_between_special_tokens=_bool(body, "spaces_between_special_tokens",
                                                         True), **research)
    return AnthropicPlan(req, model, stream, len(ids), spec, secret, prompt.compacted_tokens)


def _variants_here(research: dict, stream: bool) -> dict:
    """The Messages API's own rules for `variants`: answered whole, temperature <= 1."""
    for i, v in enumerate(research.get("variants") or ()):
        t = v.get("temperature")
        if isinstance(t, (int, float)) and not isinstance(t, bool) and \
                t > ANTHROPIC_MAX_TEMPERATURE:
            raise bad_request(f"variants[{i}].temperature: must be in [0, 1] on the Messages "
                              f"API, got {t}", f"variants[{i}].temperature")
    if stream and research.get("variants"):
        raise bad_request("stream: `variants` are answered whole on the Messages API (a "
                          "`variants` array); set stream to false", "stream")
    return research


def parse_count_tokens(body, info: ModelInfo) -> int:
    _check(body, COUNT_FIELDS)
    info.resolve(body.get("model"))
    return len(prompt_ids(body, info))


# ---- responses ------------------------------------------------------------------------------------

def stop_reason(c: Choice | Delta, tool_calls: int = 0) -> str:
    if c.finish_reason == "length":
        return "max_tokens"
    if tool_calls:
        return "tool_use"
    return "stop_sequence" if c.stop_sequence else "end_turn"


def usage_body(u: Usage) -> dict:
    return {"input_tokens": u.prompt_tokens - u.cached_tokens, "output_tokens":
            u.completion_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": u.cached_tokens, "gpu_seconds": round(u.gpu_seconds, 6),
            **speculative_usage([u])}


def _tool_id() -> str:
    return "toolu_" + secrets.token_hex(12)


def _extensions(plan: AnthropicPlan) -> dict:
    return {"compacted_tokens": plan.compacted_tokens} if plan.compacted_tokens else {}


def message_response(plan: AnthropicPlan, choice: Choice, final: Final,
                     variants: list[Choice] | None = None) -> dict:
    """The message for `choice`. With `variants` (every variant's choice in order, `choice`
    the first): a `variants` array of {variant, content, stop_reason, stop_sequence,
    metrics} beside it; the message is variant 0's, its usage counts every variant."""
    content, calls = _content(plan, choice)
    extra = {}
    if variants:
        extra["variants"] = []
        for i, c in enumerate(variants):
            blocks, n = (content, calls) if i == 0 else _content(plan, c)
            extra["variants"].append({"variant": i, "content": blocks,
                                      "stop_reason": stop_reason(c, n),
                                      "stop_sequence": c.stop_sequence, "metrics": c.metrics})
    return {"id": plan.request.request_id, "type": "message", "role": "assistant",
            "model": plan.model, "content": content,
            "stop_reason": stop_reason(choice, calls), "stop_sequence": choice.stop_sequence,
            "usage": usage_body(final.usage), **_extensions(plan), **extra}


def _content(plan: AnthropicPlan, choice: Choice) -> tuple[list[dict], int]:
    """A choice's content blocks (thinking, text, tool_use) and its tool-call count."""
    content: list[dict] = []
    calls = 0
    if plan.output.active:
        parsed = parse_whole(plan.output, choice.text, [t.id for t in choice.tokens])
        if parsed.reasoning or plan.output.thinking_open:
            content.append({"type": "thinking", "thinking": parsed.reasoning,
                            "signature": thinking_signature.sign(plan.secret,
                                                                 parsed.reasoning)})
        if parsed.content or not parsed.calls:
            content.append({"type": "text", "text": parsed.content})
        for call in parsed.calls:
            content.append({"type": "tool_use", "id": _tool_id(), "name": call["name"],
                            "input": arguments_object(call["arguments"])})
        calls = len(parsed.calls)
    else:
        content.append({"type": "text", "text": choice.text})
    return content, calls


class _Blocks:
    """Content blocks opened and closed in order as parser events arrive."""

    def __init__(self, secret: bytes):
        self.secret = secret
        self.index = -1
        self.kind: str | None = None      # the open block's kind
        self.key = None                   # tool index of an open tool_use block
        self.thinking = ""

    def close(self) -> Iterator[tuple[str, dict]]:
        if self.kind is None:
            return
        if self.kind == "thinking":
            yield "content_block_delta", {"type": "content_block_delta", "index": self.index,
                                          "delta": {"type": "signature_delta", "signature":
                                                    thinking_signature.sign(self.secret,
                                                                            self.thinking)}}
        yield "content_block_stop", {"type": "content_block_stop", "index": self.index}
        self.kind = None

    def open(self, kind: str, block: dict, key=None) -> Iterator[tuple[str, dict]]:
        yield from self.close()
        self.index += 1
        self.kind, self.key = kind, key
        yield "content_block_start", {"type": "content_block_start", "index": self.index,
                                      "content_block": block}

    def delta(self, delta: dict) -> tuple[str, dict]:
        return "content_block_delta", {"type": "content_block_delta", "index": self.index,
                                       "delta": delta}

    def event(self, ev: tuple) -> Iterator[tuple[str, dict]]:
        kind = ev[0]
        if kind == "reasoning":
            if self.kind != "thinking":
                yield from self.open("thinking", {"type": "thinking", "thinking": "",
                                                  "signature": ""})
            self.thinking += ev[1]
            yield self.delta({"type": "thinking_delta", "thinking": ev[1]})
        elif kind == "content":
            if self.kind != "text":
                yield from self.open("text", {"type": "text", "text": ""})
            yield self.delta({"type": "text_delta", "text": ev[1]})
        elif kind == "tool":
            yield from self.open("tool_use", {"type": "tool_use", "id": _tool_id(),
                                              "name": ev[2], "input": {}}, ev[1])
        elif self.kind == "tool_use" and self.key == ev[1]:
            yield self.delta({"type": "input_json_delta", "partial_json": ev[2]})


def message_stream(plan: AnthropicPlan, events: Iterable[Delta | Final | None]
                   ) -> Iterator[tuple[str, dict] | None]:
    """(event name, data) pairs in Anthropic's order; `None` marks a long gap (ping)."""
    yield "message_start", {"type": "message_start", "message": {
        "id": plan.request.request_id, "type": "message", "role": "assistant",
        "model": plan.model, "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": plan.prompt_tokens, "output_tokens": 0,
                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}}
    parser = OutputParser(plan.output) if plan.output.active else None
    blocks = _Blocks(plan.secret)
    if parser is None or not plan.output.thinking_open:
        if parser is None:
            yield from blocks.open("text", {"type": "text", "text": ""})
    else:
        yield from blocks.open("thinking", {"type": "thinking", "thinking": "",
                                            "signature": ""})
    yield "ping", {"type": "ping"}
    last: Delta | None = None
    for ev in events:
        if ev is None:
            yield "ping", {"type": "ping"}
        elif isinstance(ev, Final):
            if blocks.index < 0:      # nothing at all: one empty text block
                yield from blocks.open("text", {"type": "text", "text": ""})
            yield from blocks.close()
            yield "message_delta", {"type": "message_delta", "delta": {
                "stop_reason": stop_reason(last, parser.calls if parser else 0)
                if last else "end_turn",
                "stop_sequence": last.stop_sequence if last else None},
                "usage": usage_body(ev.usage), **_extensions(plan)}
            yield "message_stop", {"type": "message_stop"}
        else:
            parsed = delta_events(parser, ev)
            for item in parsed:
                yield from blocks.event(item)
            if ev.finish_reason is not None:
                last = ev


def model_card(info: ModelInfo, name: str) -> dict:
    """A model in Anthropic's shape (`GET /v1/models` with an anthropic-version header)."""
    import datetime
    created = datetime.datetime.fromtimestamp(info.created, datetime.timezone.utc)
    return {"type": "model", "id": name, "display_name": name,
            "created_at": created.strftime("%Y-%m-%dT%H:%M:%SZ")}


def models_body(info: ModelInfo) -> dict:
    names = list(info.served_names)
    return {"data": [model_card(info, n) for n in names], "has_more": False,
            "first_id": names[0] if names else None, "last_id": names[-1] if names else None}
