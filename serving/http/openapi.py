"""GET /openapi.json: our routes, and the request fields we add to each protocol.

The sampling extensions are derived from `SamplingParams`, so a new parameter shows up
here without an edit. Response schemas are those of the OpenAI and Anthropic APIs (see
their references); this document says what this server accepts and adds (`gpu_seconds`,
the extension fields), and which fields are a 400 until their issue lands.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

from sampling.params import BOUNDS, MAX_SEQUENCE, MAX_STOP_STRINGS, MAX_VOCAB, SamplingParams
from serving.http import anthropic_api, limits, openai_chat_request, openai_fields

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
        s["type"] = [s["type"], "null"]          # OpenAPI 3.1: JSON Schema's null
    if f.default is not dataclasses.MISSING:
        s["default"] = f.default
    return s


_LIMIT_OF = {"vocab": (MAX_VOCAB, "and at most the model's vocabulary size"),
             "context": (MAX_SEQUENCE, "and at most the model's context length")}


def _bounded(schema: dict, name: str) -> dict:
    """`schema` with the range of sampling.params.BOUNDS (the engine checks the same)."""
    if name not in BOUNDS:
        return schema
    lo, hi, lo_open, hi_open, integer = BOUNDS[name]
    note = ""
    if isinstance(hi, str):
        hi, note = _LIMIT_OF[hi]
    kind = "integer" if integer else "number"
    out = dict(schema, type=[kind, "null"] if isinstance(schema.get("type"), list) else kind)
    out["exclusiveMinimum" if lo_open else "minimum"] = lo
    out["exclusiveMaximum" if hi_open else "maximum"] = hi
    if note:
        out["description"] = note
    return out


def _sampling_properties() -> dict:
    return {f.name: _bounded(_schema_of(f), f.name) for f in dataclasses.fields(SamplingParams)}


def _request(fields: set[str], extra: dict, required: tuple[str, ...] = ()) -> dict:
    props = {name: {} for name in sorted(fields)}
    props.update({k: v for k, v in _sampling_properties().items() if k in fields})
    props.update({k: v for k, v in extra.items() if k in fields})
    return {"type": "object", "properties": props, "required": list(required),
            "additionalProperties": False}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}}}
_OPENAI_MESSAGE = {
    "type": "object", "required": ["role", "content"],
    "properties": {
        "role": {"enum": list(openai_chat_request.ROLES)},
        "content": _nullable({"anyOf": [{"type": "string"},
                                        {"type": "array", "items": _TEXT_PART}]}),
        "name": {"type": "string"}, "tool_call_id": {"type": "string"},
        "reasoning_content": {"type": "string"},
        "tool_calls": {"type": "array", "items": {"type": "object"}}}}
_ANTHROPIC_MESSAGE = {
    "type": "object", "required": ["role", "content"],
    "properties": {"role": {"enum": ["user", "assistant"]},
                   "content": {"anyOf": [{"type": "string"},
                                         {"type": "array", "items": {"type": "object"}}]}}}
_STOP_STRING = {"type": "string", "minLength": 1, "maxLength": limits.MAX_STOP_CHARS}


def _openai_fields() -> dict:
    return {
        "model": {"type": "string", "description": "a served name (GET /v1/models); "
                                                   "default: the first"},
        "messages": {"type": "array", "minItems": 1, "items": _OPENAI_MESSAGE},
        "prompt": {"anyOf": [{"type": "string"},
                             {"type": "array", "minItems": 1, "maxItems": limits.MAX_PROMPTS,
                              "items": {"type": "string"}},
                             {"type": "array", "minItems": 1,
                              "items": {"type": "integer", "minimum": 0}}],
                   "description": f"at most {limits.MAX_PROMPTS} prompts, decoded as one "
                                  "batch"},
        "stream": {"type": "boolean"},
        "stop": _nullable({"anyOf": [_STOP_STRING, {
            "type": "array", "items": _STOP_STRING,
            "maxItems": getattr(openai_fields, "MAX_STOP", MAX_STOP_STRINGS)}]}),
        "max_tokens": _nullable({"type": "integer", "minimum": 1, "maximum": MAX_SEQUENCE}),
        "max_completion_tokens": _nullable({"type": "integer", "minimum": 1,
                                            "maximum": MAX_SEQUENCE}),
        "temperature": _nullable({"type": "number", "minimum": 0,
                                  "maximum": openai_fields.OPENAI_MAX_TEMPERATURE}),
        "logprobs": {"anyOf": [{"type": "boolean"}, {"type": "integer", "minimum": 0,
                                                     "maximum": 20}, {"type": "null"}]},
        "top_logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": 20}),
        "seed": _nullable({"type": "integer", "minimum": -(2 ** 63),
                           "maximum": 2 ** 64 - 1}),
        # docs/research.md
        "variants": {"type": "array", "minItems": 1, "maxItems": 16,
                     "items": {"type": "object"},
                     "description": "paired sampling variants: objects of sampling fields "
                                    "over the request's"},
        "steering": {"type": "array", "maxItems": 64, "items": {
            "type": "object", "required": ["layer"], "additionalProperties": False,
            "properties": {"layer": {"type": "integer", "minimum": 0},
                           "name": {"type": "string", "minLength": 1},
                           "vector": {"type": "array", "minItems": 1,
                                      "items": {"type": "number"}},
                           "scale": {"type": "number", "minimum": -1e4, "maximum": 1e4}}},
                     "description": "activation steering (the engine needs "
                                    "--steering-vectors)"},
    }


def _anthropic_fields() -> dict:
    return {
        "model": {"type": "string"},
        "messages": {"type": "array", "minItems": 1, "items": _ANTHROPIC_MESSAGE},
        "system": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}]},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": MAX_SEQUENCE},
        "stop_sequences": {"type": "array", "items": _STOP_STRING,
                           "maxItems": limits.MAX_STOP_SEQUENCES},
        "stream": {"type": "boolean"},
        "temperature": {"type": "number", "minimum": 0,
                        "maximum": anthropic_api.ANTHROPIC_MAX_TEMPERATURE},
        "metadata": {"type": "object"},
        "thinking": {"type": "object", "required": ["type"],
                     "properties": {"type": {"enum": ["enabled", "disabled", "adaptive"]},
                                    "budget_tokens": {
                                        "type": "integer",
                                        "minimum": anthropic_api.MIN_THINKING_BUDGET}}},
        **_research_fields(),
    }


def _research_fields() -> dict:
    """`variants` and `steering` (docs/research.md), as the OpenAI routes take them."""
    return {k: v for k, v in _openai_fields().items() if k in ("variants", "steering")}


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


def _responses_request(chat_ext: dict) -> dict:
    """/v1/responses: its own fields, the sampling ones and the chat extensions it takes."""
    from serving.http import responses_api as r
    fields = r.OWN | r.IGNORED | r.EXTENSIONS | r._sampling_fields()
    own = {"model": {"type": "string"}, "stream": {"type": "boolean"},
           "store": {"type": "boolean"}, "instructions": _nullable({"type": "string"}),
           "input": {"anyOf": [{"type": "string"}, {"type": "array", "items": {
               "type": "object"}}]},
           "previous_response_id": _nullable({"type": "string"}),
           "max_output_tokens": _nullable({"type": "integer", "minimum": 1,
                                           "maximum": MAX_SEQUENCE}),
           "top_logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": 20}),
           "temperature": _nullable({"type": "number", "minimum": 0,
                                     "maximum": openai_fields.OPENAI_MAX_TEMPERATURE}),
           **_research_fields()}
    return _request(fields, {**chat_ext, **own}, ("input",))


def _tokenize_request(chat_ext: dict) -> dict:
    """/tokenize: a prompt, or messages as the chat route takes them."""
    from serving.http import tokenize_api as t
    props = {"model": {"type": "string"}, "prompt": {"type": "string"},
             "messages": {"type": "array", "minItems": 1, "items": _OPENAI_MESSAGE},
             "add_special_tokens": {"type": "boolean"},
             "return_token_strs": {"type": "boolean"}}
    return _request(t.PROMPT_FIELDS | t.CHAT_FIELDS, {**chat_ext, **props})


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
                                     "`echo` with `logprobs` scores the prompt's tokens "
                                     "first (the first one's logprob is null)"),
            "/v1/responses": _post("OpenAI Responses API (docs/api.md)", "ResponsesRequest"),
            "/v1/responses/{response_id}": {
                "get": {"summary": "a stored response (store: true)",
                        "responses": {"200": {"description": "a response"}}},
                "delete": {"summary": "delete a stored response",
                           "responses": {"200": {"description": "deleted"}}}},
            "/v1/models/{model_id}": {"get": {"summary": "one served model",
                                              "responses": {"200": {"description": "Model"}}}},
            "/tokenize": _post("vLLM's: prompt or messages -> token ids", "TokenizeRequest"),
            "/detokenize": _post("vLLM's: token ids -> text", "DetokenizeRequest"),
            "/tokenizer_info": {"get": {"summary": "vLLM's: special tokens, chat template",
                                        "responses": {"200": {"description": "info"}}}},
            "/version": {"get": {"summary": "the server's version",
                                 "responses": {"200": {"description": "version"}}}},
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
                "ChatRequest": _request(openai_fields.CHAT_FIELDS,
                                        {**chat_ext, **_openai_fields()}, ("messages",)),
                "CompletionRequest": _request(openai_fields.COMPLETION_FIELDS,
                                              {**chat_ext, **_openai_fields()}, ("prompt",)),
                "MessagesRequest": _request(anthropic_api.MESSAGE_FIELDS, {
                    **chat_ext, **_anthropic_fields()}, ("messages", "max_tokens")),
                "CountTokensRequest": _request(anthropic_api.COUNT_FIELDS, {
                    **chat_ext, **_anthropic_fields()}, ("messages",)),
                "ResponsesRequest": _responses_request(chat_ext),
                "TokenizeRequest": _tokenize_request(chat_ext),
                "DetokenizeRequest": {
                    "type": "object", "required": ["tokens"], "additionalProperties": False,
                    "properties": {"model": {"type": "string"}, "tokens": {
                        "type": "array", "items": {"type": "integer", "minimum": 0,
                                                   "maximum": 2 ** 31 - 1}}}},
                "UsageExtensions": usage,
            }},
        "security": [{"bearer": []}, {"apiKeyHeader": []}],
    }
