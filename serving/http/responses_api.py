"""The OpenAI Responses API (`/v1/responses`) on top of chat completions.

A Responses request is translated into a chat request (input items -> messages,
`instructions` -> a system message, `text.format` -> `response_format`, function tools,
`reasoning.effort`, `max_output_tokens`, our sampling extensions unchanged) and validated
by `openai_chat_request.parse_chat`, so every rule of the chat route holds here too. The
engine's output goes through `openai_shapes.chat_stream`; `ResponseBuilder` turns those
chunks into the Responses event sequence (response.created, output_item.added,
content_part.added, output_text.delta, ..., response.completed). The non-streaming body is
the builder's final response, so streamed and whole answers cannot disagree.

Research fields (docs/research.md) pass to the chat route's parser: `steering`, and
`variants`, answered whole: the response is variant 0's, with a `variants` array of every
variant's output (`VariantsBuilder`; not streamed).

Stateless by default (`store` defaults to false here: nothing is kept unless asked);
`store: true` keeps the response and its conversation in `response_store`, which
`previous_response_id`, GET and DELETE read.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from serving.http.errors import APIError, bad_request

LOGPROBS_INCLUDE = "message.output_text.logprobs"
INCLUDES = {LOGPROBS_INCLUDE, "reasoning.encrypted_content"}
# Fields of the API that change nothing here: accepted and ignored.
IGNORED = {"metadata", "user", "service_tier", "prompt_cache_key", "safety_identifier",
           "prompt_cache_retention", "max_tool_calls", "stream_options"}
OWN = {"model", "input", "instructions", "stream", "store", "previous_response_id", "tools",
       "tool_choice", "parallel_tool_calls", "text", "reasoning", "max_output_tokens",
       "include", "truncation", "background", "conversation", "prompt", "top_logprobs"}
# Ours (the chat route's extensions) that make sense here.
EXTENSIONS = {"chat_template_kwargs", "max_thinking_tokens", "skip_special_tokens",
              "variants", "steering"}
NOT_SAMPLING = {"logprobs", "top_logprobs", "max_tokens", "n", "best_of", "prompt_logprobs"}


def _sampling_fields() -> set[str]:
    from serving.http.openai_fields import SAMPLING_FIELDS
    return set(SAMPLING_FIELDS) - NOT_SAMPLING


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


# ---- input items -> chat messages ------------------------------------------------------------

def _text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request("`content` must be a string or a list of content parts", where)
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "summary_text", "reasoning_text"):
            if not isinstance(part.get("text"), str):
                raise bad_request(f"a {kind} part needs a string `text`", f"{where}[{j}].text")
            out.append(part["text"])
        elif kind == "refusal":
            out.append(str(part.get("refusal", "")))
        elif kind in ("input_image", "input_file", "input_audio"):
            raise bad_request(f"this model takes text only; `{kind}` is not supported",
                              f"{where}[{j}].type")
        else:
            raise bad_request(f"unknown content part type {kind!r}", f"{where}[{j}].type")
    return "\n".join(out)


def input_messages(items) -> list[dict]:
    """Responses input (a string or a list of items) as chat messages."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise bad_request("`input` must be a string or a non-empty list of items", "input")
    messages: list[dict] = []
    reasoning = None                       # a reasoning item, given to the next assistant turn

    def assistant() -> dict:
        nonlocal reasoning
        last = messages[-1] if messages else None
        if last is None or last["role"] != "assistant":
            last = {"role": "assistant", "content": ""}
            messages.append(last)
        if reasoning is not None:
            last["reasoning_content"] = reasoning
            reasoning = None
        return last

    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request("an input item must be an object", where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise bad_request(f"`role` must be user, system, developer or assistant, got "
                                  f"{role!r}", f"{where}.role")
            text = _text(item.get("content"), f"{where}.content")
            if role == "assistant":
                msg = assistant()
                msg["content"] = (msg["content"] + text) if msg["content"] else text
            else:
                messages.append({"role": role, "content": text})
        elif kind == "function_call":
            for name in ("call_id", "name", "arguments"):
                if not isinstance(item.get(name), str):
                    raise bad_request(f"a function_call item needs a string `{name}`",
                                      f"{where}.{name}")
            msg = assistant()
            msg.setdefault("tool_calls", []).append(
                {"id": item["call_id"], "type": "function",
                 "function": {"name": item["name"], "arguments": item["arguments"]}})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise bad_request("a function_call_output item needs `call_id`",
                                  f"{where}.call_id")
            output = item.get("output")
            text = output if isinstance(output, str) else _text(output, f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": text})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            reasoning = _text(parts, f"{where}.content")
        elif kind == "item_reference":
            raise bad_request("`item_reference` items are not supported; send the items, or "
                              "`previous_response_id`", f"{where}.type")
        else:
            raise bad_request(f"unknown input item type {kind!r}", f"{where}.type")
    return messages


# ---- the request -----------------------------------------------------------------------------

def _tools(tools) -> list[dict]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise bad_request("`tools` must be a list", "tools")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else None
            raise bad_request(f"only function tools are supported here, got {kind!r}",
                              f"tools[{i}].type")
        unknown = sorted(set(t) - {"type", "name", "description", "parameters", "strict"})
        if unknown:
            raise bad_request(f"unknown field `tools[{i}].{unknown[0]}`",
                              f"tools[{i}].{unknown[0]}")
        fn = {k: t[k] for k in ("name", "description", "parameters", "strict")
              if t.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice):
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and \
            isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise bad_request("`tool_choice` must be 'auto', 'none', 'required' or "
                      "{\"type\": \"function\", \"name\": ...}", "tool_choice")


def _format(text) -> tuple[dict | None, dict]:
    """(`response_format` for the chat route, the `text` object the response echoes)."""
    if text is None:
        return None, {"format": {"type": "text"}}
    if not isinstance(text, dict):
        raise bad_request("`text` must be an object", "text")
    unknown = sorted(set(text) - {"format", "verbosity"})
    if unknown:
        raise bad_request(f"unknown field `text.{unknown[0]}`", f"text.{unknown[0]}")
    fmt = text.get("format") or {"type": "text"}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None, {"format": {"type": "text"}}
    if kind == "json_object":
        return {"type": "json_object"}, {"format": {"type": "json_object"}}
    if kind == "json_schema":
        unknown = sorted(set(fmt) - {"type", "name", "schema", "strict", "description"})
        if unknown:
            raise bad_request(f"unknown field `text.format.{unknown[0]}`",
                              f"text.format.{unknown[0]}")
        if not isinstance(fmt.get("schema"), dict):
            raise bad_request("`text.format.schema` must be a JSON schema (an object)",
                              "text.format.schema")
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}, {"format": dict(fmt)}
    raise bad_request(f"`text.format.type` must be text, json_object or json_schema, got "
                      f"{kind!r}", "text.format.type")


@dataclass
class ResponsesPlan:
    chat: object                       # openai_plan.OpenAIPlan
    request: dict                      # the fields a response echoes
    history: list[dict]                # the conversation before this turn (chat messages)
    stream: bool
    store: bool
    logprobs: bool
    items: list[dict] = field(default_factory=list)   # the input, as items with ids
    response_id: str = field(default_factory=lambda: _new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))


def parse_responses(body, info, store=None) -> ResponsesPlan:
    from serving.http import openai_chat_request

    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    sampling = _sampling_fields()
    unknown = sorted(set(body) - OWN - IGNORED - EXTENSIONS - sampling)
    if unknown:
        raise bad_request(f"unknown field `{unknown[0]}` (unknown fields are an error, not "
                          "silently ignored)", unknown[0])
    for name, why in (("background", "background responses"), ("conversation",
                      "conversations (use previous_response_id)"), ("prompt",
                      "prompt templates")):
        if body.get(name) not in (None, False):
            raise bad_request(f"`{name}`: {why} are not supported by this server", name)
    if body.get("truncation") not in (None, "disabled", "auto"):
        raise bad_request("`truncation` must be 'disabled' or 'auto'", "truncation")
    include = body.get("include") or []
    if not isinstance(include, list) or any(x not in INCLUDES for x in include):
        raise bad_request(f"`include` may hold {', '.join(sorted(INCLUDES))}", "include")
    stored = bool(body.get("store", False))
    if not isinstance(body.get("store", False), bool):
        raise bad_request("`store` must be a boolean", "store")
    history: list[dict] = []
    prev = body.get("previous_response_id")
    if prev is not None:
        if not isinstance(prev, str):
            raise bad_request("`previous_response_id` must be a string", "previous_response_id")
        found = store.get(prev) if store is not None else None
        if found is None:
            raise APIError(404, f"no stored response {prev!r} (only responses created with "
                                "`store: true` can be continued)",
                           param="previous_response_id", code="not_found")
        history = found[1]
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise bad_request("`instructions` must be a string", "instructions")
    if body.get("input") is None:
        raise bad_request("`input` is required", "input")
    turn = input_messages(body.get("input"))
    messages = ([{"role": "system", "content": instructions}] if instructions else []) + \
        history + turn
    response_format, text = _format(body.get("text"))
    reasoning = body.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, dict):
        raise bad_request("`reasoning` must be an object", "reasoning")
    effort = (reasoning or {}).get("effort")
    logprobs = LOGPROBS_INCLUDE in include
    top = body.get("top_logprobs")
    chat = {k: body[k] for k in (sampling | EXTENSIONS) & body.keys()}
    chat.update({"model": body.get("model"), "messages": messages,
                 "stream": bool(body.get("stream", False))})
    for src, dst, value in (("tools", "tools", _tools(body.get("tools")) or None),
                            ("tool_choice", "tool_choice", _tool_choice(body.get("tool_choice"))),
                            ("parallel_tool_calls", "parallel_tool_calls",
                             body.get("parallel_tool_calls")),
                            ("max_output_tokens", "max_completion_tokens",
                             body.get("max_output_tokens")),
                            ("text", "response_format", response_format),
                            ("reasoning", "reasoning_effort", effort)):
        if value is not None:
            chat[dst] = value
    if logprobs:
        chat["logprobs"] = True
        if top:
            chat["top_logprobs"] = top
    elif top:
        raise bad_request("`top_logprobs` needs `include: [\"message.output_text.logprobs\"]`",
                          "top_logprobs")
    try:
        plan = openai_chat_request.parse_chat(chat, info)
    except APIError as e:       # name the Responses field, not the chat one
        e.param = {"max_completion_tokens": "max_output_tokens",
                   "response_format": "text.format", "reasoning_effort": "reasoning.effort",
                   "messages": "input", "logprobs": "include"}.get(e.param, e.param)
        raise
    if plan.requests[0].sampling.n != 1:
        raise bad_request("`n`: a response has one output", "n")
    if plan.requests[0].variants and plan.stream:
        raise bad_request("`variants` are answered whole on /v1/responses (a `variants` "
                          "array); set `stream` to false", "stream")
    plan.include_usage = True
    echo = {"instructions": instructions, "max_output_tokens": body.get("max_output_tokens"),
            "model": plan.model, "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": prev,
            "reasoning": {"effort": effort, "summary": (reasoning or {}).get("summary")},
            "store": stored, "temperature": body.get("temperature"), "text": text,
            "tool_choice": body.get("tool_choice") or "auto",
            "tools": [dict(t, strict=t.get("strict", True)) for t in body.get("tools") or []],
            "top_logprobs": top, "top_p": body.get("top_p"),
            "truncation": body.get("truncation") or "disabled",
            "metadata": body.get("metadata") or {}, "user": body.get("user")}
    return ResponsesPlan(plan, echo, history + turn, bool(body.get("stream", False)), stored,
                         logprobs, input_items(body["input"]))


# ---- chat chunks -> Responses events -------------------------------------------------------------

def _usage(u: dict | None) -> dict | None:
    if u is None:
        return None
    return {"input_tokens": u["prompt_tokens"],
            "input_tokens_details": {"cached_tokens":
                                     u["prompt_tokens_details"]["cached_tokens"],
                                     "cache_write_tokens": 0},
            "output_tokens": u["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens":
                                      u["completion_tokens_details"]["reasoning_tokens"]},
            "total_tokens": u["total_tokens"], "gpu_seconds": u.get("gpu_seconds")}


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


class ResponseBuilder:
    """Chat chunks in, (event type, event) pairs out; `response()` is the whole body."""

    def __init__(self, plan: ResponsesPlan):
        self.plan = plan
        self.seq = 0
        self.output: list[dict] = []
        self.current: dict | None = None      # the open output item
        self.finish: str | None = None
        self.usage: dict | None = None
        self.calls: dict[int, dict] = {}      # chat tool-call index -> its item

    def _event(self, kind: str, **fields) -> tuple[str, dict]:
        ev = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return kind, ev

    def response(self, status: str | None = None) -> dict:
        if status is None:
            status = "incomplete" if self.finish == "length" else "completed"
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {"id": self.plan.response_id, "object": "response",
                "created_at": self.plan.created_at, "status": status, "background": False,
                "error": None, "incomplete_details": incomplete,
                "output": [json.loads(json.dumps(i)) for i in self.output],
                "usage": _usage(self.usage), "service_tier": "default",
                **self.plan.request}

    def start(self) -> list[tuple[str, dict]]:
        snapshot = self.response("in_progress")
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    # items
    def _open(self, item: dict) -> list:
        out = self._close()
        item["status"] = "in_progress"
        self.output.append(item)
        self.current = item
        index = len(self.output) - 1
        out.append(self._event("response.output_item.added", output_index=index,
                               item=json.loads(json.dumps(item))))
        if item["type"] == "message":
            item["content"].append({"type": "output_text", "text": "", "annotations": [],
                                    "logprobs": []})
            out.append(self._event("response.content_part.added", item_id=item["id"],
                                   output_index=index, content_index=0,
                                   part={"type": "output_text", "text": "", "annotations": [],
                                         "logprobs": []}))
        elif item["type"] == "reasoning":
            item["content"].append({"type": "reasoning_text", "text": ""})
            out.append(self._event("response.content_part.added", item_id=item["id"],
                                   output_index=index, content_index=0,
                                   part={"type": "reasoning_text", "text": ""}))
        return out

    def _close(self) -> list:
        item, self.current = self.current, None
        if item is None:
            return []
        index = len(self.output) - 1
        item["status"] = "incomplete" if self.finish == "length" and not (
            item["type"] == "function_call" and _parses(item["arguments"])) else "completed"
        out = []
        if item["type"] == "message":
            part = item["content"][0]
            out.append(self._event("response.output_text.done", item_id=item["id"],
                                   output_index=index, content_index=0, text=part["text"],
                                   logprobs=part["logprobs"]))
            out.append(self._event("response.content_part.done", item_id=item["id"],
                                   output_index=index, content_index=0, part=dict(part)))
        elif item["type"] == "reasoning":
            part = item["content"][0]
            out.append(self._event("response.reasoning_text.done", item_id=item["id"],
                                   output_index=index, content_index=0, text=part["text"]))
            out.append(self._event("response.content_part.done", item_id=item["id"],
                                   output_index=index, content_index=0, part=dict(part)))
        else:
            out.append(self._event("response.function_call_arguments.done",
                                   item_id=item["id"], output_index=index, name=item["name"],
                                   arguments=item["arguments"]))
        out.append(self._event("response.output_item.done", output_index=index,
                               item=json.loads(json.dumps(item))))
        return out

    def feed(self, chunk: dict | None) -> list[tuple[str, dict]]:
        if chunk is None:
            return []
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        out = []
        for choice in chunk.get("choices") or []:
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                if self.current is None or self.current["type"] != "reasoning":
                    out += self._open({"type": "reasoning", "id": _new_id("rs"), "summary": [],
                                       "content": []})
                self.current["content"][0]["text"] += delta["reasoning_content"]
                out.append(self._event("response.reasoning_text.delta",
                                       item_id=self.current["id"],
                                       output_index=len(self.output) - 1, content_index=0,
                                       delta=delta["reasoning_content"]))
            lps = []
            if self.plan.logprobs and choice.get("logprobs"):
                lps = [{k: t[k] for k in ("token", "bytes", "logprob", "top_logprobs")}
                       for t in choice["logprobs"].get("content") or []]
            if delta.get("content"):
                if self.current is None or self.current["type"] != "message":
                    out += self._open({"type": "message", "id": _new_id("msg"),
                                       "role": "assistant", "content": []})
                part = self.current["content"][0]
                part["text"] += delta["content"]
                part["logprobs"] += lps
                out.append(self._event("response.output_text.delta",
                                       item_id=self.current["id"],
                                       output_index=len(self.output) - 1, content_index=0,
                                       delta=delta["content"], logprobs=lps))
            for call in delta.get("tool_calls") or []:
                fn = call.get("function") or {}
                if call.get("id"):
                    item = {"type": "function_call", "id": _new_id("fc"),
                            "call_id": call["id"], "name": fn.get("name", ""),
                            "arguments": ""}
                    out += self._open(item)
                    self.calls[call["index"]] = item
                item = self.calls.get(call.get("index"))
                if item is not None and fn.get("arguments"):
                    item["arguments"] += fn["arguments"]
                    out.append(self._event("response.function_call_arguments.delta",
                                           item_id=item["id"],
                                           output_index=self.output.index(item),
                                           delta=fn["arguments"]))
        return out

    def end(self) -> list[tuple[str, dict]]:
        out = self._close()
        body = self.response()
        kind = "response.incomplete" if body["status"] == "incomplete" else "response.completed"
        out.append(self._event(kind, response=body))
        return out

    def messages(self) -> list[dict]:
        """This turn's output as chat messages (what `previous_response_id` continues)."""
        msg: dict = {"role": "assistant", "content": ""}
        for item in self.output:
            if item["type"] == "reasoning":
                msg["reasoning_content"] = item["content"][0]["text"]
            elif item["type"] == "message":
                msg["content"] += item["content"][0]["text"]
            else:   # a call cut by max_output_tokens is kept, with arguments that parse
                try:
                    json.loads(item["arguments"])
                    arguments = item["arguments"]
                except ValueError:
                    arguments = "{}"
                msg.setdefault("tool_calls", []).append(
                    {"id": item["call_id"], "type": "function",
                     "function": {"name": item["name"], "arguments": arguments}})
        return [msg]


class VariantsBuilder:
    """`variants` (not streamed): one `ResponseBuilder` per variant, each fed its own
    choice; `response()` is variant 0's response with a `variants` array of {variant,
    status, incomplete_details, output, metrics} for every variant (usage counts all)."""

    def __init__(self, plan: ResponsesPlan, count: int):
        self.builders = [ResponseBuilder(plan) for _ in range(count)]
        self.metrics: list[dict | None] = [None] * count
        self.seq = 0

    def start(self) -> list:
        return []

    def feed(self, chunk: dict | None) -> list:
        if chunk is not None:
            if chunk.get("usage"):
                self.builders[0].usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                if choice.get("metrics") is not None:
                    self.metrics[choice["index"]] = choice["metrics"]
                self.builders[choice["index"]].feed({"choices": [choice]})
        return []

    def end(self) -> list:
        for b in self.builders:
            b.end()
        return []

    def response(self, status: str | None = None) -> dict:
        body = self.builders[0].response(status)
        body["variants"] = []
        for i, b in enumerate(self.builders):
            r = b.response(status)
            body["variants"].append({"variant": i, "status": r["status"],
                                     "incomplete_details": r["incomplete_details"],
                                     "output": r["output"], "metrics": self.metrics[i]})
        return body

    def messages(self) -> list[dict]:
        return self.builders[0].messages()


def events(plan: ResponsesPlan, engine_events: Iterable) -> tuple[ResponseBuilder, Iterator]:
    """The builder and the (event type, event) stream of one generation; `None` passes
    through (a keep-alive)."""
    from serving.http import openai_shapes

    variants = plan.chat.requests[0].variants
    builder = VariantsBuilder(plan, len(variants)) if variants else ResponseBuilder(plan)

    def run():
        yield from builder.start()
        for chunk in openai_shapes.chat_stream(plan.chat, engine_events):
            if chunk is None:
                yield None
            else:
                yield from builder.feed(chunk)
        yield from builder.end()

    return builder, run()


def input_items(given) -> list[dict]:
    """The request's input as items, each with an id (what GET .../input_items lists)."""
    if isinstance(given, str):
        given = [{"role": "user", "content": given}]
    out = []
    for item in given:
        item = dict(item)
        item.setdefault("type", "message")
        if item["type"] == "message":
            content = item.get("content")
            if isinstance(content, str):
                item["content"] = [{"type": "input_text", "text": content}]
            item.setdefault("status", "completed")
        item.setdefault("id", _new_id({"message": "msg", "function_call": "fc",
                                       "function_call_output": "fco",
                                       "reasoning": "rs"}.get(item["type"], "item")))
        out.append(item)
    return out


def keep(store, plan: ResponsesPlan, builder: ResponseBuilder) -> None:
    if plan.store and store is not None:
        store.put(builder.response(), plan.history + builder.messages(), plan.items)


# ---- the routes ----------------------------------------------------------------------------

class Responses:
    """POST /v1/responses."""

    def __init__(self, server, store):
        self.server = server
        self.store = store

    def on_post(self, req, resp):
        from serving.http import app, sse

        body = app._read_json(req)
        plan = parse_responses(body, self.server.info(), self.store)
        timed, stream = self.server.open(plan.chat.requests[0], req)
        builder, evs = events(plan, timed)
        if not plan.stream:
            try:
                for _ in evs:
                    pass
            finally:
                stream.cancel()
            keep(self.store, plan, builder)
            resp.media = builder.response()
            return

        def frames():
            for item in evs:
                yield sse.comment() if item is None else sse.event(*item)
            keep(self.store, plan, builder)

        def on_error(err: APIError):
            yield sse.event("error", {"type": "error", "sequence_number": builder.seq,
                                      "code": err.code, "message": err.message,
                                      "param": err.param})

        app._sse_response(resp, app._guarded(frames(), on_error, [stream]))


class InputItems:
    """GET /v1/responses/{response_id}/input_items (newest first unless order=asc)."""

    def __init__(self, store):
        self.store = store

    def on_get(self, req, resp, response_id):
        items = self.store.items(response_id) if self.store is not None else None
        if items is None:
            raise APIError(404, f"no stored response {response_id!r}", code="not_found")
        order = req.get_param("order") or "desc"
        if order not in ("asc", "desc"):
            raise bad_request("`order` must be 'asc' or 'desc'", "order")
        items = items if order == "asc" else items[::-1]
        after = req.get_param("after")
        if after is not None:
            ids = [i["id"] for i in items]
            items = items[ids.index(after) + 1:] if after in ids else []
        limit = req.get_param_as_int("limit", min_value=1, max_value=100) or 20
        page = items[:limit]
        resp.media = {"object": "list", "data": page,
                      "first_id": page[0]["id"] if page else None,
                      "last_id": page[-1]["id"] if page else None,
                      "has_more": len(items) > limit}


class StoredResponse:
    """GET / DELETE /v1/responses/{response_id}."""

    def __init__(self, store):
        self.store = store

    def _found(self, response_id: str):
        found = self.store.get(response_id) if self.store is not None else None
        if found is None:
            raise APIError(404, f"no stored response {response_id!r}", code="not_found")
        return found

    def on_get(self, req, resp, response_id):
        resp.media = self._found(response_id)[0]

    def on_delete(self, req, resp, response_id):
        self._found(response_id)
        self.store.delete(response_id)
        resp.media = {"id": response_id, "object": "response", "deleted": True}

