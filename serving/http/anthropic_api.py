"""The Anthropic Messages protocol: validation -> `GenRequest`, responses and stream events.

Pure functions, like `openai_api`. Anthropic's rules that differ from OpenAI's: `system`
is a top-level string or text blocks; consecutive same-role turns are merged; a final
assistant turn is a prefill that the reply continues (the reply holds only new text);
`max_tokens` is required; temperature is in [0, 1]; `input_tokens` excludes the prompt
tokens read from the prefix cache (`cache_read_input_tokens`), so input + cache_read is
the prompt count that `count_tokens` returns. Tools and thinking come with a later issue
and are a clear 400 until then.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Iterable, Iterator

from serving.http.errors import bad_request
from serving.http.generation import Choice, Delta, Final, GenRequest, ModelInfo, Usage
from serving.http.openai_api import SAMPLING_FIELDS, _bool, _is_int, _sampling
from serving.http.prompt import ChatOptions, check_context, render_chat

ANTHROPIC_MAX_TEMPERATURE = 1.0
IGNORED = {"metadata", "service_tier", "container", "mcp_servers", "context_management"}
OWN = {"chat_template", "chat_template_kwargs", "skip_special_tokens",
       "spaces_between_special_tokens"}
MESSAGE_FIELDS = {"model", "messages", "system", "max_tokens", "stop_sequences", "stream",
                  "tools", "tool_choice", "thinking"} | IGNORED | OWN | SAMPLING_FIELDS
COUNT_FIELDS = MESSAGE_FIELDS - {"stream"}


@dataclass
class AnthropicPlan:
    request: GenRequest
    model: str
    stream: bool
    prompt_tokens: int


def _blocks_text(content, where: str, allow_history_blocks: bool) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}: content must be a string or a list of content blocks",
                          where)
    texts = []
    for j, block in enumerate(content):
        p = f"{where}[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise bad_request(f"{p}.text: a text block needs a string `text`", f"{p}.text")
            texts.append(block["text"])
        elif kind in ("thinking", "redacted_thinking") and allow_history_blocks:
            continue  # earlier turns' thinking is not shown to the model again
        elif kind == "image":
            raise bad_request(f"{p}: this model has no vision; image blocks are not "
                              "supported", f"{p}.type")
        elif kind in ("tool_use", "tool_result", "server_tool_use"):
            raise bad_request(f"{p}: tool use is not supported by this server yet",
                              f"{p}.type")
        elif kind == "document":
            raise bad_request(f"{p}: document blocks are not supported", f"{p}.type")
        else:
            raise bad_request(f"{p}.type: unknown content block type {kind!r}", f"{p}.type")
    return "".join(texts)


def normalize(body: dict) -> tuple[list[dict], bool]:
    """Template messages (system first, same-role turns merged) and whether the last turn
    is an assistant prefill."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages: must be a non-empty list", "messages")
    out: list[dict] = []
    system = body.get("system")
    if system is not None:
        text = _blocks_text(system, "system", False)
        if text:
            out.append({"role": "system", "content": text})
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise bad_request(f"{where}.role: must be 'user' or 'assistant'", f"{where}.role")
        text = _blocks_text(m.get("content"), f"{where}.content", True)
        if out and out[-1]["role"] == m["role"]:
            out[-1]["content"] += "\n\n" + text if out[-1]["content"] and text else text
        else:
            out.append({"role": m["role"], "content": text})
    prefill = out[-1]["role"] == "assistant"
    if prefill:
        out[-1]["content"] = out[-1]["content"].rstrip()  # Anthropic rejects trailing space
    return out, prefill


def _not_yet(body: dict) -> None:
    if body.get("tools") not in (None, []):
        raise bad_request("tools: tool use is not supported by this server yet", "tools")
    choice = body.get("tool_choice")
    if choice is not None and not (isinstance(choice, dict) and choice.get("type") in
                                   ("none", "auto")):
        raise bad_request("tool_choice: not supported by this server yet (no tools)",
                          "tool_choice")
    thinking = body.get("thinking")
    if thinking is not None and not (isinstance(thinking, dict) and
                                     thinking.get("type") == "disabled"):
        raise bad_request("thinking: extended thinking is not supported by this server yet",
                          "thinking")


def _check(body, known: set[str]) -> None:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    unknown = sorted(set(body) - known)
    if unknown:
        raise bad_request(f"{unknown[0]}: Extra inputs are not permitted", unknown[0])
    if "stop" in body:
        raise bad_request("stop: the Messages API calls it `stop_sequences`", "stop")


def prompt_ids(body: dict, info: ModelInfo) -> list[int]:
    _not_yet(body)
    messages, prefill = normalize(body)
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise bad_request("chat_template_kwargs: must be an object", "chat_template_kwargs")
    template = body.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise bad_request("chat_template: must be a string", "chat_template")
    options = ChatOptions(add_generation_prompt=not prefill, continue_final_message=prefill,
                          chat_template=template, chat_template_kwargs=kwargs)
    tok = info.tokenizer
    text = render_chat(tok.chat_template, messages, options, tok.bos_token, tok.eos_token)
    return tok.encode(text, add_special_tokens=False)


def parse_messages(body, info: ModelInfo, request_id: str | None = None) -> AnthropicPlan:
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
    t = body.get("temperature")
    if isinstance(t, (int, float)) and not isinstance(t, bool) and t > ANTHROPIC_MAX_TEMPERATURE:
        raise bad_request(f"temperature: must be in [0, 1] on the Messages API, got {t}",
                          "temperature")
    meta = body.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise bad_request("metadata: must be an object", "metadata")
    stream = _bool(body, "stream", False)
    ids = prompt_ids(body, info)
    sampling = _sampling({k: v for k, v in body.items() if k in SAMPLING_FIELDS},
                         {"max_tokens": max_tokens, "stop": stops or []},
                         info.tokenizer.vocab_size)
    if sampling.n != 1 or sampling.best_of not in (None, 1):
        raise bad_request("n: the Messages API returns one message", "n")
    check_context(len(ids), max_tokens, info.max_model_len)
    rid = request_id or "msg_" + secrets.token_hex(12)
    req = GenRequest(rid, model, ids, sampling,
                     skip_special_tokens=_bool(body, "skip_special_tokens", True),
                     spaces_between_special_tokens=_bool(body, "spaces_between_special_tokens",
                                                         True))
    return AnthropicPlan(req, model, stream, len(ids))


def parse_count_tokens(body, info: ModelInfo) -> int:
    _check(body, COUNT_FIELDS)
    info.resolve(body.get("model"))
    return len(prompt_ids(body, info))


# ---- responses ------------------------------------------------------------------------------------

def stop_reason(c: Choice | Delta) -> str:
    if c.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if c.stop_sequence else "end_turn"


def usage_body(u: Usage) -> dict:
    return {"input_tokens": u.prompt_tokens - u.cached_tokens, "output_tokens":
            u.completion_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": u.cached_tokens, "gpu_seconds": round(u.gpu_seconds, 6)}


def message_response(plan: AnthropicPlan, choice: Choice, final: Final) -> dict:
    return {"id": plan.request.request_id, "type": "message", "role": "assistant",
            "model": plan.model, "content": [{"type": "text", "text": choice.text}],
            "stop_reason": stop_reason(choice), "stop_sequence": choice.stop_sequence,
            "usage": usage_body(final.usage)}


def message_stream(plan: AnthropicPlan, events: Iterable[Delta | Final | None]
                   ) -> Iterator[tuple[str, dict] | None]:
    """(event name, data) pairs in Anthropic's order; `None` marks a long gap (ping)."""
    yield "message_start", {"type": "message_start", "message": {
        "id": plan.request.request_id, "type": "message", "role": "assistant",
        "model": plan.model, "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": plan.prompt_tokens, "output_tokens": 0,
                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}}
    yield "content_block_start", {"type": "content_block_start", "index": 0,
                                  "content_block": {"type": "text", "text": ""}}
    yield "ping", {"type": "ping"}
    last: Delta | None = None
    for ev in events:
        if ev is None:
            yield "ping", {"type": "ping"}
        elif isinstance(ev, Final):
            u = usage_body(ev.usage)
            yield "content_block_stop", {"type": "content_block_stop", "index": 0}
            yield "message_delta", {"type": "message_delta", "delta": {
                "stop_reason": stop_reason(last) if last else "end_turn",
                "stop_sequence": last.stop_sequence if last else None}, "usage": u}
            yield "message_stop", {"type": "message_stop"}
        else:
            if ev.text:
                yield "content_block_delta", {"type": "content_block_delta", "index": 0,
                                              "delta": {"type": "text_delta", "text": ev.text}}
            if ev.finish_reason is not None:
                last = ev
