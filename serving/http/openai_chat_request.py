"""A `/v1/chat/completions` body -> `OpenAIPlan`: what only the chat route checks.

Messages (roles, content parts, past tool calls, reasoning), `tools` / `tool_choice` /
`parallel_tool_calls` (a forced call is a guided grammar, serving.http.tools),
`reasoning_effort` and `chat_template_kwargs` (`auto_compact`: the oldest turns dropped to
fit, `compacted_tokens`), then the chat template rendered and tokenized (serving.http.prompt)
and the output parser's spec (serving.http.chat_output) chosen (issue 7). The fields the
routes share are checked in openai_fields; the answer is shaped in openai_shapes. Pure
functions: no Falcon, no gRPC. `/v1/responses` and `/tokenize` reuse `parse_chat`.
"""

from __future__ import annotations

import secrets

from serving.http.chat_output import make_spec, thinking_fields
from serving.http.errors import bad_request
from serving.http.generation import GenRequest, ModelInfo
from serving.http.openai_fields import (CHAT_FIELDS, GUIDED, _bool, _check_known,
                                        _check_streamable, _detok_options, _opt_int,
                                        _research, _response_format, _sampling, _stop,
                                        _stream_flags, _unsupported, fit_max_tokens)
from serving.http.openai_plan import OpenAIPlan
from serving.http.prompt import ChatOptions, fit_chat, render_chat, template_kwargs, truncate
from serving.http.tools import ToolSpec, call_grammar, openai_tools
from serving.http import vllm_ext


ROLES = ("developer", "system", "user", "assistant", "tool")
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")


def _text_of(content, where: str) -> str:
    """A message's content as text: a string, or text parts joined by newlines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request("`content` must be a string or a list of content parts", where)
    texts = []
    for j, part in enumerate(content):
        p = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise bad_request("a content part must be an object", p)
        kind = part.get("type")
        if kind in ("text", "refusal"):
            value = part.get(kind)
            if not isinstance(value, str):
                raise bad_request(f"a {kind} part needs a string `{kind}`", f"{p}.{kind}")
            texts.append(value)
        elif kind in ("image_url", "input_audio", "file"):
            raise bad_request(f"this model takes text only; `{kind}` content is not supported",
                              f"{p}.type")
        else:
            raise bad_request(f"unknown content part type {kind!r}", f"{p}.type")
    return "\n".join(texts)


def normalize_messages(messages) -> list[dict]:
    """OpenAI messages -> the plain dicts chat templates expect (content as text)."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("`messages` must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request("a message must be an object", where)
        role = m.get("role")
        if role not in ROLES:
            raise bad_request(f"`role` must be one of {', '.join(ROLES)}, got {role!r}",
                              f"{where}.role")
        msg = {"role": "system" if role == "developer" else role,
               "content": _text_of(m.get("content"), f"{where}.content")}
        if m.get("content") is None and not (role == "assistant" and m.get("tool_calls")):
            raise bad_request("`content` is required (null only on an assistant message "
                              "with tool_calls)", f"{where}.content")
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        if role == "assistant":
            reasoning = m.get("reasoning_content", m.get("reasoning"))
            if reasoning is not None:
                if not isinstance(reasoning, str):
                    raise bad_request("`reasoning_content` must be a string",
                                      f"{where}.reasoning_content")
                msg["reasoning_content"] = reasoning
            if m.get("tool_calls"):
                msg["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}.tool_calls")
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise bad_request("a tool message needs `tool_call_id`",
                                  f"{where}.tool_call_id")
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return out


def _tool_calls(calls, where: str) -> list[dict]:
    """Past tool calls in the history, with arguments parsed for the template."""
    import json
    if not isinstance(calls, list):
        raise bad_request("`tool_calls` must be a list", where)
    out = []
    for k, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request("a tool call needs `function.name`", f"{where}[{k}].function")
        args = fn.get("arguments", "{}")
        if isinstance(args, str) and not args.strip():
            args = "{}"             # vLLM sends "" for a call of a tool without parameters
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            raise bad_request("`function.arguments` must be a JSON string",
                              f"{where}[{k}].function.arguments") from None
        out.append({"id": c.get("id"), "type": "function",
                    "function": {"name": fn["name"], "arguments": args}})
    return out


def _tool_choice(body: dict, tools: list[ToolSpec]) -> tuple[str, list[ToolSpec]]:
    """("none" | "auto" | "required" | "named", the tools a forced call may use)."""
    choice = body.get("tool_choice")
    if choice is None:
        return ("auto" if tools else "none"), tools
    if not tools and choice != "none":
        raise bad_request("`tool_choice` needs `tools` (there is nothing to call)",
                          "tool_choice")
    if choice in ("none", "auto", "required"):
        if choice == "required" and not tools:
            raise bad_request("`tool_choice: required` needs `tools`", "tool_choice")
        return choice, tools
    fn = choice.get("function") if isinstance(choice, dict) else None
    if not (isinstance(choice, dict) and choice.get("type") == "function" and
            isinstance(fn, dict) and isinstance(fn.get("name"), str)):
        raise bad_request("`tool_choice` must be 'none', 'auto', 'required' or "
                          "{\"type\": \"function\", \"function\": {\"name\": ...}}",
                          "tool_choice")
    named = [t for t in tools if t.name == fn["name"]]
    if not named:
        raise bad_request(f"`tool_choice` names {fn['name']!r}, which is not in `tools`",
                          "tool_choice")
    return "named", named


def _kwargs(body: dict) -> tuple[dict, bool]:
    """`chat_template_kwargs`, and its `auto_compact` flag (ours, not the template's)."""
    kwargs, compact = template_kwargs(body)
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in REASONING_EFFORTS:
            raise bad_request(f"`reasoning_effort` must be one of "
                              f"{', '.join(REASONING_EFFORTS)}, got {effort!r}",
                              "reasoning_effort")
        kwargs.setdefault("enable_thinking", effort != "none")
    return kwargs, compact


def parse_chat(body, info: ModelInfo, request_id: str | None = None) -> OpenAIPlan:
    body, ext = vllm_ext.translate(body)
    _check_known(body, CHAT_FIELDS)
    model = info.resolve(body.get("model"))
    _unsupported(body)
    stream, include_usage = _stream_flags(body)
    logprobs = _bool(body, "logprobs", False)
    top = _opt_int(body, "top_logprobs", 0, 20)
    if top is not None and top > 0 and not logprobs:
        raise bad_request("`top_logprobs` needs `logprobs: true`", "top_logprobs")
    max_tokens = _opt_int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _opt_int(body, "max_tokens", 1)
    messages = normalize_messages(body.get("messages"))
    tools = openai_tools(body.get("tools"))
    choice, allowed = _tool_choice(body, tools)
    parallel = _bool(body, "parallel_tool_calls", True)
    guided = _response_format(body)
    if choice in ("required", "named") and (guided or any(
            body.get(g) not in (None, False) for g in GUIDED)):
        raise bad_request("a forced tool call (`tool_choice`) cannot be combined with "
                          "`response_format` or guided decoding", "tool_choice")
    kwargs, compact = _kwargs(body)
    documents = body.get("documents")
    if documents is not None and not (isinstance(documents, list) and
                                      all(isinstance(d, dict) for d in documents)):
        raise bad_request("`documents` must be a list of objects", "documents")
    template = body.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise bad_request("`chat_template` must be a string", "chat_template")
    options = ChatOptions(
        add_generation_prompt=_bool(body, "add_generation_prompt", True),
        continue_final_message=_bool(body, "continue_final_message", False),
        chat_template=template, chat_template_kwargs=kwargs, documents=documents,
        tools=[t.for_template() for t in tools] or None)
    tok = info.tokenizer
    add_special = _bool(body, "add_special_tokens", False)
    keep = _opt_int(body, "truncate_prompt_tokens", 1)

    def encode_chat(msgs):
        text = render_chat(tok.chat_template, msgs, options, tok.bos_token, tok.eos_token)
        return text, truncate(tok.encode(text, add_special_tokens=add_special), keep)

    max_thinking = _opt_int(body, "max_thinking_tokens", 1)
    fitted = fit_chat(encode_chat, messages, max_tokens, info.max_model_len, compact)
    detok = _detok_options(body)
    spec = make_spec(tok, fitted.text, bool(tools) and choice != "none",
                     None if parallel else 1, detok["skip_special_tokens"],
                     forced=choice in ("required", "named"))
    if choice in ("required", "named"):
        guided = {"guided_grammar": call_grammar(allowed, parallel and choice == "required",
                                                 tok.special_texts)}
    guided = {**{g: body[g] for g in GUIDED if body.get(g) is not None}, **guided}
    constrained = any(v not in (None, False) for v in guided.values())
    overrides = {"max_tokens": max_tokens, "stop": _stop(body), "logprobs": logprobs,
                 "top_logprobs": top or 0, **guided,
                 **thinking_fields(tok, spec, constrained, max_thinking, max_tokens)}
    sampling = _sampling(body, overrides, tok.vocab_size, tok.encode)
    _check_streamable(stream, sampling)
    ids = fitted.ids
    sampling, effective = fit_max_tokens(sampling, len(ids), info)
    rid = request_id or "chatcmpl-" + secrets.token_hex(12)
    echo = _bool(body, "echo", False)
    echo_text = messages[-1]["content"] if echo and messages[-1]["role"] == "assistant" else ""
    if spec.active:
        detok = dict(detok, skip_special_tokens=False)   # the parser needs the markers
    research = _research(body, sampling, tok.vocab_size, stream)
    return OpenAIPlan("chat", rid, model, [GenRequest(rid, model, ids, sampling, **detok,
                                                      **research)],
                      [fitted.text], stream, include_usage, logprobs, top or 0, echo,
                      echo_text, output=spec, named_tool=choice == "named",
                      compacted_tokens=fitted.compacted_tokens, max_tokens=[effective],
                      vllm=ext,
                      stop_ids=frozenset(getattr(getattr(tok, "tok", tok), "stop_ids", ()) or ()))
