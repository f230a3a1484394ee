"""GET /openapi.json: our routes, and the request fields we add to each protocol.

The sampling extensions are derived from `SamplingParams`, so a new parameter shows up
here without an edit. Response schemas are those of the OpenAI and Anthropic APIs (see
their references); this document says what this server accepts and adds (`gpu_seconds`,
the extension fields), and which fields are a 400 until their issue lands.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

from sampling.params import SamplingParams
from serving.http import anthropic_api, openai_api

_JSON_TYPES = {"float": "number", "int": "integer", "bool": "boolean", "str": "string"}


def _schema_of(f: dataclasses.Field) -> dict:
    hint = str(f.type)
    if "dict" in hint:
        s = {"type": "object"}
    elif "list" in hint:
        s = {"type": "array"}
    else:
        s = {"type": next((v for k, v in _JSON_TYPES.items() if hint.startswith(k)), "string")}
    if "None" in hint:
        s["nullable"] = True
    if f.default is not dataclasses.MISSING:
        s["default"] = f.default
    return s


def _sampling_properties() -> dict:
    return {f.name: _schema_of(f) for f in dataclasses.fields(SamplingParams)}


def _request(fields: set[str], extra: dict) -> dict:
    props = {name: {} for name in sorted(fields)}
    props.update({k: v for k, v in _sampling_properties().items() if k in fields})
    props.update(extra)
    return {"type": "object", "properties": props, "additionalProperties": False}


def _post(summary: str, schema_name: str, description: str = "") -> dict:
    return {"post": {"summary": summary, "description": description,
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": {"$ref": f"#/components/schemas/{schema_name}"}}}},
                     "responses": {"200": {"description": "JSON, or text/event-stream when "
                                                          "`stream` is true"},
                                   "400": {"description": "invalid field (`param` names it)"},
                                   "401": {"description": "missing or wrong API key"},
                                   "404": {"description": "unknown model"},
                                   "429": {"description": "engine queue full (retry-after)"}}}}


@lru_cache(maxsize=1)
def spec() -> dict:
    bool_ = {"type": "boolean"}
    chat_ext = {
        "echo": bool_, "add_generation_prompt": {**bool_, "default": True},
        "continue_final_message": {**bool_, "default": False},
        "add_special_tokens": {**bool_, "default": False},
        "chat_template": {"type": "string", "description": "Jinja, run sandboxed"},
        "chat_template_kwargs": {"type": "object"},
        "documents": {"type": "array", "items": {"type": "object"}},
        "skip_special_tokens": {**bool_, "default": True},
        "spaces_between_special_tokens": {**bool_, "default": True},
        "truncate_prompt_tokens": {"type": "integer", "minimum": 1,
                                   "description": "keep the last N prompt tokens"},
        "tools": {"type": "array", "description": "function tools; calls are parsed from "
                                                  "<tool_call>{json}</tool_call>"},
        "tool_choice": {"description": "none | auto | required | {type: function, function: "
                                       "{name}}; required and named are enforced by a "
                                       "grammar"},
        "response_format": {"description": "text | json_object | json_schema (enforced by "
                                           "guided decoding)"},
        "reasoning_effort": {"description": "none turns thinking off, other values on "
                                            "(chat_template_kwargs.enable_thinking)"},
        "max_thinking_tokens": {"type": "integer", "minimum": 1,
                                "description": "thinking budget: </think> is forced after it"},
        "guided_json": {"type": "object", "description": "JSON schema the output must match"},
        "guided_json_object": bool_,
        "guided_regex": {"type": "string"},
        "guided_choice": {"type": "array", "items": {"type": "string"}},
        "guided_grammar": {"type": "string", "description": "llguidance Lark grammar"},
    }
    chat_ext["chat_template_kwargs"] = {
        "type": "object", "description": "every key reaches the template (enable_thinking, "
        "...); auto_compact: true drops the oldest turns to fit the context and the response "
        "says compacted_tokens"}
    usage = {"type": "object", "properties": {
        "compacted_tokens": {"type": "integer", "description": "top level of a response: "
                             "prompt tokens dropped by auto_compact"},
        "gpu_seconds": {"type": "number", "description": "accelerator seconds spent on this "
                                                         "request (its share of each batch)"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "flaxserve", "version": "1",
                 "description": "OpenAI- and Anthropic-compatible API of a flaxserve engine. "
                                "Sampling fields are those of SAMPLING.md, same names."},
        "paths": {
            "/v1/chat/completions": _post("OpenAI chat completions", "ChatRequest"),
            "/v1/completions": _post("OpenAI legacy completions", "CompletionRequest",
                                     "`echo` with `logprobs` (prompt logprobs) is a 400 "
                                     "until the engine returns prompt logprobs"),
            "/v1/models": {"get": {"summary": "served model names",
                                   "responses": {"200": {"description": "ListModelsResponse"}}}},
            "/v1/messages": _post("Anthropic messages", "MessagesRequest"),
            "/v1/messages/count_tokens": _post("Anthropic token count", "CountTokensRequest"),
            "/health": {"get": {"summary": "200 when the batch server is SERVING, else 503",
                                "responses": {"200": {"description": "ok"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics",
                                 "responses": {"200": {"description": "text exposition"}}}},
            "/openapi.json": {"get": {"summary": "this document",
                                      "responses": {"200": {"description": "OpenAPI 3.1"}}}},
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key"}},
            "schemas": {
                "ChatRequest": _request(openai_api.CHAT_FIELDS, chat_ext),
                "CompletionRequest": _request(openai_api.COMPLETION_FIELDS, {
                    k: v for k, v in chat_ext.items() if k in openai_api.COMPLETION_FIELDS}),
                "MessagesRequest": _request(anthropic_api.MESSAGE_FIELDS, {}),
                "CountTokensRequest": _request(anthropic_api.COUNT_FIELDS, {}),
                "UsageExtensions": usage,
            }},
        "security": [{"bearer": []}, {"apiKeyHeader": []}],
    }
