"""The OpenAI protocol: request validation -> `GenRequest`, and the response shapes.

Pure functions (no Falcon, no gRPC), so every rule here is unit-tested directly:
- `parse_chat` / `parse_completion` check each field (a 400 naming `param`), render the
  chat template, tokenize, and build `SamplingParams` (our library's names are accepted as
  extensions: top_k, min_p, repetition_penalty, ... see SAMPLING.md).
- `chat_response` / `chat_stream` / `completion_response` / `completion_stream` turn the
  engine's `Delta`s into bodies and chunks exactly as the SDKs parse them (CONFORMANCE.md).
Chat semantics (issue 7): `tools` / `tool_choice` / `parallel_tool_calls` (forced calls
are a guided grammar, serving.http.tools), `response_format` json_object / json_schema and
the `guided_*` extensions (structured outputs, decoded under a constraint by the engine),
reasoning (`<think>` parsed into `reasoning_content`, alias `reasoning`), and
`chat_template_kwargs.auto_compact` (oldest turns dropped to fit, `compacted_tokens`).
The model's output is parsed by serving.http.chat_output, the same way for both modes.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

from sampling.bad_words import resolve_bad_words
from sampling.params import BOUNDS, SamplingParams, check_bounds
from serving.http.chat_output import (OutputParser, OutputSpec, make_spec, parse_whole,
                                      thinking_fields)
from serving.http.errors import APIError, bad_request, from_value_error
from serving.http.limits import MAX_PROMPTS
from serving.http.generation import (Choice, Delta, Final, GenRequest, ModelInfo, TokenInfo,
                                     Usage, floor_logprob)
from serving.http.prompt import (ChatOptions, check_context, fit_chat, render_chat,
                                 template_kwargs, truncate)
from serving.http.tools import ToolSpec, call_grammar, check_schema, openai_tools
from serving.http import vllm_ext

SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
# Structured outputs as request fields (the engine's SamplingParams names).
GUIDED = ("guided_json", "guided_json_object", "guided_regex", "guided_choice", "guided_grammar")
# Fields of the OpenAI API that change nothing here: accepted and ignored.
IGNORED = {"store", "metadata", "service_tier", "user", "prompt_cache_key", "safety_identifier",
           "prompt_cache_retention", "prompt_cache_options", "verbosity", "moderation"}
# Ours, beyond SamplingParams' names.
CHAT_EXTENSIONS = {"echo", "add_generation_prompt", "continue_final_message",
                   "add_special_tokens", "chat_template", "chat_template_kwargs", "documents",
                   "skip_special_tokens", "spaces_between_special_tokens",
                   "truncate_prompt_tokens", "parallel_tool_calls"} | {
                   "guided_json", "guided_json_object", "guided_regex", "guided_choice",
                   "guided_grammar", "max_thinking_tokens"} | {"variants", "steering"}
CHAT_FIELDS = {"model", "messages", "stream", "stream_options", "max_completion_tokens",
               "tools", "tool_choice", "functions", "function_call", "response_format",
               "reasoning_effort", "audio", "modalities", "prediction", "web_search_options",
               } | IGNORED | CHAT_EXTENSIONS | SAMPLING_FIELDS
COMPLETION_FIELDS = {"model", "prompt", "stream", "stream_options", "suffix", "echo",
                     "add_special_tokens", "skip_special_tokens",
                     "spaces_between_special_tokens", "truncate_prompt_tokens",
                     "response_format", "variants", "steering"} | set(GUIDED) | IGNORED | \
    SAMPLING_FIELDS
ROLES = ("developer", "system", "user", "assistant", "tool")
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")
# Limits: the widest of the hosted OpenAI-compatible APIs (docs/fields.md), still validated.
OPENAI_MAX_TEMPERATURE = 4.0      # Baseten / TensorRT-LLM; OpenAI itself stops at 2
MAX_STOP = 32                     # chat: Baseten's 32 sequences (OpenAI: 4)
MAX_STOP_COMPLETIONS = 128        # /v1/completions: vLLM has no cap; eval harnesses send many
MAX_LEGACY_LOGPROBS = 20


# ---- field checks ---------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad_request(f"`{name}` must be a boolean, got {v!r}", name)
    return v


def _opt_int(body: dict, name: str, lo: int | None = None, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f" in [{lo}, {hi}]" if hi is not None else (f" >= {lo}" if lo is not None else "")
        raise bad_request(f"`{name}` must be an integer{rng}, got {v!r}", name)
    return v


def _check_known(body, known: set[str]) -> None:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    unknown = sorted(set(body) - known)
    if unknown:
        raise bad_request(f"unknown field `{unknown[0]}` (unknown fields are an error, not "
                          "silently ignored; see GET /openapi.json)", unknown[0])


def _stop(body: dict, cap: int = MAX_STOP) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        raise bad_request("`stop` must be a non-empty string or a list of them", "stop")
    if len(v) > cap:
        raise bad_request(f"`stop` takes at most {cap} sequences, got {len(v)}", "stop")
    return v


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream", False)
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not stream:
        raise bad_request("`stream_options` is only allowed with `stream: true`",
                          "stream_options")
    if not isinstance(opts, dict):
        raise bad_request("`stream_options` must be an object", "stream_options")
    vllm_ext.check_stream_options(opts)
    include = opts.get("include_usage", False)
    if not isinstance(include, bool):
        raise bad_request("`stream_options.include_usage` must be a boolean",
                          "stream_options.include_usage")
    return stream, include


def _unsupported(body: dict) -> None:
    """Fields this server does not serve: a clear 400 rather than silence."""
    if body.get("functions") not in (None, []):
        raise bad_request("`functions` is deprecated and not supported; use `tools`",
                          "functions")
    if body.get("function_call") not in (None, "none", "auto"):
        raise bad_request("`function_call` is deprecated and not supported; use "
                          "`tool_choice`", "function_call")
    for name in ("audio", "prediction", "web_search_options"):
        if body.get(name) is not None:
            raise bad_request(f"`{name}` is not supported by this server", name)
    mods = body.get("modalities")
    if mods is not None and mods != ["text"]:
        raise bad_request("only the text modality is supported", "modalities")


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


def _response_format(body: dict) -> dict:
    """`response_format` as guided_* sampling fields."""
    fmt = body.get("response_format")
    if fmt is None:
        return {}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    extra = sorted(set(fmt) - {"type", "json_schema"}) if isinstance(fmt, dict) else []
    if kind in ("text", "json_object") and "json_schema" in fmt:
        extra = ["json_schema"]
    if extra:
        raise bad_request(f"unknown field `response_format.{extra[0]}`",
                          f"response_format.{extra[0]}")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"guided_json_object": True}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request("`response_format.json_schema` must be an object with a "
                              "`schema`", "response_format.json_schema")
        extra = sorted(set(spec) - {"name", "description", "schema", "strict"})
        if extra:
            raise bad_request(f"unknown field `response_format.json_schema.{extra[0]}`",
                              f"response_format.json_schema.{extra[0]}")
        name = spec.get("name")
        if name is not None and not isinstance(name, str):
            raise bad_request("`response_format.json_schema.name` must be a string",
                              "response_format.json_schema.name")
        schema = spec.get("schema", {"type": "object"})
        return {"guided_json": check_schema(schema, "response_format.json_schema.schema")}
    raise bad_request("`response_format.type` must be 'text', 'json_object' or "
                      f"'json_schema', got {kind!r}", "response_format.type")


def _sampling(body: dict, overrides: dict, vocab_size: int | None,
              encode=None) -> SamplingParams:
    """SamplingParams from the body's sampling fields; with `encode` (the tokenizer's),
    `bad_words` strings become token sequences here (sampling/bad_words.py)."""
    d = {k: body[k] for k in SAMPLING_FIELDS & body.keys()}
    for k in BOUNDS.keys() & overrides.keys() & d.keys():   # replaced: still checked
        if d[k] is not None and d[k] != overrides[k]:
            try:
                check_bounds(k, d[k], vocab_size)
            except ValueError as e:
                raise from_value_error(e) from None
    d.update(overrides)
    d = {k: v for k, v in d.items() if v is not None or k == "speculative"}   # null: off
    t = d.get("temperature")
    if isinstance(t, (int, float)) and not isinstance(t, bool) and t > OPENAI_MAX_TEMPERATURE:
        raise bad_request(f"`temperature` must be in [0, {OPENAI_MAX_TEMPERATURE}] on the "
                          f"OpenAI API, got {t}", "temperature")
    try:
        params = SamplingParams.from_dict(d, vocab_size)
        return resolve_bad_words(params, encode) if encode is not None else params
    except ValueError as e:
        raise from_value_error(e) from None
    except TypeError as e:  # a value of the wrong JSON type deep inside
        raise bad_request(f"invalid sampling parameter: {e}") from None


def _research(body: dict, sampling: SamplingParams, vocab_size: int | None,
              stream: bool) -> dict:
    """`variants` and `steering` (docs/research.md) as GenRequest fields, checked as far as
    the front end can (the engine checks layers, vector sizes and names)."""
    out = {}
    variants = body.get("variants")
    if variants is not None:
        from sampling import variants as pv
        base = {k: v for k, v in sampling.to_dict().items() if k not in ("n", "seed")}
        try:
            pv.expand(base, variants, vocab_size or MAX_VOCAB_CHECK)
        except ValueError as e:
            raise from_value_error(e) from None
        except TypeError as e:
            raise bad_request(f"variants: {e}", "variants") from None
        out["variants"] = variants
    steering = body.get("steering")
    if steering is not None:
        out["steering"] = _steering_entries(steering)
    return out


MAX_VOCAB_CHECK = 1 << 20     # variants' token-id fields when the vocabulary is unknown


def _steering_entries(spec) -> list[dict] | None:
    """`steering: [{layer, vector | name, scale}]`: the JSON types (model/steering.py checks
    the rest on the engine)."""
    from model.steering import MAX_ENTRIES
    if not isinstance(spec, list) or len(spec) > MAX_ENTRIES:
        raise bad_request(f"`steering` must be a list of at most {MAX_ENTRIES} objects "
                          "{layer, vector | name, scale}", "steering")
    out = []
    for i, e in enumerate(spec):
        where = f"steering[{i}]"
        if not isinstance(e, dict):
            raise bad_request(f"`{where}` must be an object", where)
        unknown = sorted(set(e) - {"layer", "vector", "name", "scale"})
        if unknown:
            raise bad_request(f"`{where}.{unknown[0]}`: unknown field", f"{where}.{unknown[0]}")
        layer = e.get("layer")
        if not _is_int(layer) or not 0 <= layer < 2 ** 31:
            raise bad_request(f"`{where}.layer` must be a layer index (an integer >= 0), got "
                              f"{layer!r}", f"{where}.layer")
        if ("vector" in e) == ("name" in e):
            raise bad_request(f"`{where}`: give exactly one of vector and name", where)
        entry = {"layer": layer}
        if "name" in e:
            if not isinstance(e["name"], str) or not e["name"]:
                raise bad_request(f"`{where}.name` must be a non-empty string", f"{where}.name")
            entry["name"] = e["name"]
        else:
            vec = e["vector"]
            if not isinstance(vec, list) or not vec or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and
                    math.isfinite(x) for x in vec):
                raise bad_request(f"`{where}.vector` must be a list of finite numbers "
                                  "(hidden_size of them)", f"{where}.vector")
            entry["vector"] = [float(x) for x in vec]
        if "scale" in e:
            sc = e["scale"]
            if isinstance(sc, bool) or not isinstance(sc, (int, float)) or \
                    not math.isfinite(sc) or abs(sc) > 1e4:
                raise bad_request(f"`{where}.scale` must be a finite number in [-1e4, 1e4], "
                                  f"got {sc!r}", f"{where}.scale")
            entry["scale"] = float(sc)
        out.append(entry)
    return out


def _variant_fields(plan: "OpenAIPlan", c: Choice | Delta, metrics: bool = True) -> dict:
    """With `variants`: the choice's variant and its metrics (sampling/variants.py).
    With use_beam_search: the beam's beam_score and cumulative_logprob."""
    if c.metrics is not None and "beam_score" in c.metrics:
        return dict(c.metrics)
    if not plan.requests[0].variants:
        return {}
    out = {"variant": c.index // plan.requests[0].sampling.n}
    if metrics:           # a stream: on the chunk that finishes the choice
        out["metrics"] = c.metrics
    return out


def fit_max_tokens(sampling: SamplingParams, prompt_len: int, info: ModelInfo,
                   param: str = "messages") -> tuple[SamplingParams, int | None]:
    """`max_tokens` over what the context leaves after the prompt is clamped to it (Baseten:
    "max_tokens is truncated"; the sample ends with finish_reason "length"), or a 400 with
    --strict-max-tokens (OpenAI). Returns the params and the effective max_tokens (None
    only when the context is unknown), which the response reports in a header."""
    strict = info.strict_max_tokens
    check_context(prompt_len, sampling.max_tokens if strict else None, info.max_model_len,
                  param)
    if info.max_model_len is None:
        return sampling, sampling.max_tokens
    room = info.max_model_len - prompt_len
    if sampling.max_tokens is not None and sampling.max_tokens <= room:
        return sampling, sampling.max_tokens
    if sampling.min_tokens > room:
        raise APIError(400, f"min_tokens ({sampling.min_tokens}) exceeds the {room} tokens the "
                            f"context of {info.max_model_len} leaves after the prompt",
                       param="min_tokens", code="context_length_exceeded")
    if sampling.max_tokens is None:
        return sampling, room
    return dataclasses.replace(sampling, max_tokens=room), room


MAX_TOKENS_HEADER = "x-flaxserve-max-tokens"


def set_plan_headers(resp, plan: "OpenAIPlan") -> None:
    """The effective max_tokens of each prompt (comma-separated), after clamping."""
    if plan.max_tokens and all(m is not None for m in plan.max_tokens):
        resp.set_header(MAX_TOKENS_HEADER, ",".join(str(m) for m in plan.max_tokens))


# ---- the validated request ---------------------------------------------------------------------

@dataclass
class OpenAIPlan:
    kind: str                       # "chat" | "completion"
    request_id: str
    model: str
    requests: list[GenRequest]      # one per prompt (chat: exactly one)
    prompt_texts: list[str]
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    echo: bool
    echo_text: str = ""             # chat echo: the final assistant message, prepended
    output: OutputSpec = dataclasses.field(default_factory=OutputSpec)
    named_tool: bool = False        # tool_choice named one function: finish_reason "stop"
    compacted_tokens: int | None = None
    max_tokens: list = dataclasses.field(default_factory=list)   # effective, per prompt
    vllm: vllm_ext.VllmOptions = dataclasses.field(default_factory=vllm_ext.VllmOptions)
    stop_ids: frozenset = frozenset()   # chat: a final stop token has no logprobs entry

    @property
    def n(self) -> int:
        """Choices per prompt: n, times the number of variants when there are some."""
        r = self.requests[0]
        return r.sampling.n * (len(r.variants) if r.variants else 1)


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


def _detok_options(body: dict) -> dict:
    return {"skip_special_tokens": _bool(body, "skip_special_tokens", True),
            "spaces_between_special_tokens": _bool(body, "spaces_between_special_tokens", True)}


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
    if stream and sampling.best_of is not None and sampling.best_of != sampling.n:
        raise bad_request("`best_of` must equal `n` when streaming", "best_of")
    if stream and sampling.use_beam_search:
        raise bad_request("`use_beam_search` is answered whole, not streamed: set `stream` "
                          "to false", "use_beam_search")
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


def _prompts(prompt, tok, add_special: bool) -> tuple[list[list[int]], list[str]]:
    """Legacy `prompt`: a string, strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad_request("`prompt` must be a string, a list of strings, a list of token "
                          "ids or a list of such lists", "prompt")
    if all(_is_int(t) for t in prompt):
        prompt = [prompt]
    if len(prompt) > MAX_PROMPTS:
        raise bad_request(f"`prompt` takes at most {MAX_PROMPTS} prompts per request, got "
                          f"{len(prompt)}", "prompt")
    ids, texts = [], []
    for p in prompt:
        if isinstance(p, str):
            ids.append(tok.encode(p, add_special_tokens=add_special))
            texts.append(p)
        elif isinstance(p, list) and p and all(_is_int(t) for t in p):
            vocab = tok.vocab_size
            bad = [t for t in p if t < 0 or (vocab is not None and t >= vocab)]
            if bad:
                raise bad_request(f"token ids {bad[:5]} are outside the vocabulary", "prompt")
            ids.append(list(p))
            texts.append(tok.decode(p))
        else:
            raise bad_request("each prompt must be a string or a non-empty list of token ids",
                              "prompt")
    return ids, texts


def _echo_text(tok, ids: list[int], given: str) -> str:
    """The echoed prompt: as given, unless its tokens hold special tokens (a BOS the
    tokenizer added, `<|im_start|>` in token ids), whose text is then shown too, so that
    `text`, `tokens` and `text_offset` agree."""
    full = tok.decode(ids, skip_special_tokens=False)
    return given if full == tok.decode(ids, skip_special_tokens=True) else full


def parse_completion(body, info: ModelInfo, request_id: str | None = None) -> OpenAIPlan:
    body, ext = vllm_ext.translate(body)
    _check_known(body, COMPLETION_FIELDS)
    model = info.resolve(body.get("model"))
    _unsupported(body)
    guided = {**{g: body[g] for g in GUIDED if body.get(g) is not None},
              **_response_format(body)}
    if body.get("suffix") not in (None, ""):
        raise bad_request("`suffix` (insertion) is not supported", "suffix")
    stream, include_usage = _stream_flags(body)
    k = _opt_int(body, "logprobs", 0, MAX_LEGACY_LOGPROBS)
    echo = _bool(body, "echo", False)
    max_tokens = body.get("max_tokens", 16)
    if max_tokens is None:
        max_tokens = 16
    if not _is_int(max_tokens) or max_tokens < 1:
        raise bad_request(f"`max_tokens` must be an integer >= 1, got {max_tokens!r}",
                          "max_tokens")
    if echo and k is not None and stream:
        raise bad_request("`echo` with `logprobs` (prompt-token logprobs, the scoring path) "
                          "is answered without streaming; set stream to false", "echo")
    tok = info.tokenizer
    ids, texts = _prompts(body.get("prompt"), tok, _bool(body, "add_special_tokens", True))
    keep = _opt_int(body, "truncate_prompt_tokens", 1)
    ids = [truncate(p, keep) for p in ids]
    sampling = _sampling(body, {"max_tokens": max_tokens,
                                "stop": _stop(body, MAX_STOP_COMPLETIONS),
                                "logprobs": k is not None, "top_logprobs": k or 0,
                                **({"prompt_logprobs": k} if echo and k is not None else {}),
                                **guided},
                         tok.vocab_size, tok.encode)
    if stream and sampling.best_of is not None and sampling.best_of != sampling.n:
        raise bad_request("`best_of` must equal `n` when streaming", "best_of")
    if stream and sampling.use_beam_search:
        raise bad_request("`use_beam_search` is answered whole, not streamed: set `stream` "
                          "to false", "use_beam_search")
    fitted = [fit_max_tokens(sampling, len(p), info, "prompt") for p in ids]
    rid = request_id or "cmpl-" + secrets.token_hex(12)
    detok = _detok_options(body)
    research = _research(body, sampling, tok.vocab_size, stream)
    reqs = [GenRequest(f"{rid}-{i}" if len(ids) > 1 else rid, model, p, fitted[i][0], **detok,
                       **research) for i, p in enumerate(ids)]
    if echo:   # the echoed prompt is its tokens' text, special tokens included, so that
        texts = [_echo_text(tok, p, t) for p, t in zip(ids, texts)]  # text_offset agrees
    return OpenAIPlan("completion", rid, model, reqs, texts, stream, include_usage,
                      k is not None, k or 0, echo, max_tokens=[m for _, m in fitted], vllm=ext)


# ---- responses ------------------------------------------------------------------------------------

def usage_body(usages: Iterable[Usage], reasoning_tokens: int = 0) -> dict:
    usages = list(usages)
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(u.cached_tokens for u in usages)},
            "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "gpu_seconds": round(sum(u.gpu_seconds for u in usages), 6),
            **speculative_usage(usages)}


def speculative_usage(usages) -> dict:
    """`usage.speculative` when a prompt ran speculative decoding (docs/speed.md): the
    draft tokens verified and accepted, summed over the prompts that ran it."""
    ran = [u.speculative for u in usages if getattr(u, "speculative", None)]
    if not ran:
        return {}
    drafted = sum(s["draft_tokens"] for s in ran)
    accepted = sum(s["accepted_tokens"] for s in ran)
    return {"speculative": {"method": ran[0]["method"], "num_tokens": ran[0]["num_tokens"],
                            "draft_tokens": drafted, "accepted_tokens": accepted,
                            "acceptance_rate": round(accepted / drafted, 6) if drafted else 0.0,
                            "verify_steps": sum(s["verify_steps"] for s in ran)}}


def _content_tokens(plan: OpenAIPlan, tokens: list, finish: str | None) -> list:
    """Chat logprobs leave out the stop token that ended the reply (as OpenAI does).

    The stop token can carry text: the bytes of an incomplete last character, flushed
    (as U+FFFD) when the reply ends. That text moves to the token before it, so the entries
    still join to the content; a stop token alone in a stream chunk keeps its entry then."""
    if finish != "stop" or not tokens or tokens[-1].id not in plan.stop_ids:
        return tokens
    last = tokens[-1]
    if not last.text:
        return tokens[:-1]
    if len(tokens) == 1:
        return tokens
    before = tokens[-2]
    return tokens[:-2] + [dataclasses.replace(before, text=before.text + last.text)]


def token_logprob(t: TokenInfo, top: int) -> dict:
    return {"token": t.text, "logprob": floor_logprob(t.logprob), "bytes": t.bytes,
            "top_logprobs": [{"token": e.token, "logprob": floor_logprob(e.logprob),
                              "bytes": e.bytes} for e in t.top[:top]],
            **(t.counterfactual or {})}


def finish_reason(c: Choice | Delta, tool_calls: int = 0, named_tool: bool = False) -> str:
    """One rule for streaming and non-streaming: `length` on truncation, `tool_calls` when
    the model called tools (a named tool_choice says `stop`, as OpenAI does), else `stop`."""
    if c.finish_reason == "length":
        return "length"
    return "tool_calls" if tool_calls and not named_tool else "stop"


def _call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _extensions(plan: OpenAIPlan) -> dict:
    return {"compacted_tokens": plan.compacted_tokens} if plan.compacted_tokens else {}


def chat_response(plan: OpenAIPlan, choices: list[Choice], final: Final,
                  created: int | None = None) -> dict:
    out = []
    reasoning_tokens = 0
    for c in choices:
        logprobs = None
        if plan.logprobs:
            logprobs = {"content": [token_logprob(t, plan.top_logprobs)
                                    for t in _content_tokens(plan, c.tokens, c.finish_reason)],
                        "refusal": None}
        message = {"role": "assistant", "content": plan.echo_text + c.text, "refusal": None}
        calls = []
        if plan.output.active:
            parsed = parse_whole(plan.output, c.text, [t.id for t in c.tokens])
            reasoning_tokens += parsed.reasoning_tokens
            message["content"] = plan.echo_text + parsed.content
            if parsed.reasoning or plan.output.thinking_open:
                message["reasoning_content"] = message["reasoning"] = parsed.reasoning
            calls = [{"id": _call_id(), "type": "function", "function": call}
                     for call in parsed.calls]
            if calls:
                message["tool_calls"] = calls
                if not message["content"]:
                    message["content"] = None
        out.append({"index": c.index, "message": message, "logprobs": logprobs,
                    "finish_reason": finish_reason(c, len(calls), plan.named_tool),
                    **_variant_fields(plan, c)})
    return vllm_ext.chat_extras(plan.vllm, {
        "id": plan.request_id, "object": "chat.completion",
        "created": created or int(time.time()), "model": plan.model,
        "choices": out, "usage": usage_body([final.usage], reasoning_tokens),
        **_extensions(plan)}, plan.requests[0].prompt_ids, choices, final)


def _delta_of(ev: tuple, ids: dict) -> dict:
    """One parser event as an OpenAI chunk delta."""
    if ev[0] == "content":
        return {"content": ev[1]}
    if ev[0] == "reasoning":
        return {"reasoning_content": ev[1], "reasoning": ev[1]}
    if ev[0] == "tool":
        ids[ev[1]] = _call_id()
        return {"tool_calls": [{"index": ev[1], "id": ids[ev[1]], "type": "function",
                                "function": {"name": ev[2], "arguments": ""}}]}
    return {"tool_calls": [{"index": ev[1], "function": {"arguments": ev[2]}}]}


def chat_stream(plan: OpenAIPlan, events: Iterable[Delta | Final | None],
                created: int | None = None) -> Iterator[dict | None]:
    """Chunks (dicts) in the order of CONFORMANCE.md; a `None` event (a long gap) passes
    through as `None` so the caller can send a keep-alive comment."""
    created = created or int(time.time())
    parsers = [OutputParser(plan.output) if plan.output.active else None
               for _ in range(plan.n)]
    call_ids: list[dict] = [{} for _ in range(plan.n)]
    ext = vllm_ext.StreamExtras(plan.vllm, len(plan.requests[0].prompt_ids))

    def chunk(choices, **extra):
        c = {"id": plan.request_id, "object": "chat.completion.chunk", "created": created,
             "model": plan.model, "choices": choices}
        if plan.include_usage:
            c["usage"] = None
        c.update(extra)
        return ext.decorate(c, plan.include_usage)

    for i in range(plan.n):
        first = {"prompt_token_ids": list(plan.requests[0].prompt_ids)} \
            if plan.vllm.return_token_ids and i == 0 else {}
        tag = _variant_fields(plan, Choice(i), metrics=False)
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None, **tag}], **first)
        if plan.echo_text:
            yield chunk([{"index": i, "delta": {"content": plan.echo_text},
                          "logprobs": None, "finish_reason": None, **tag}])
    for ev in events:
        if ev is None:
            yield None
        elif isinstance(ev, Final):
            if ext.final_fields(ev):
                yield chunk([], **ext.final_fields(ev))
            if plan.include_usage:
                reasoning = sum(p.reasoning_tokens for p in parsers if p is not None)
                yield chunk([], usage=usage_body([ev.usage], reasoning), **_extensions(plan))
        else:
            ext.count(ev)
            parser = parsers[ev.index]
            if parser is None:
                parsed = [("content", ev.text)] if ev.text else []
            else:
                parsed = parser.feed(ev.text, [t.id for t in ev.tokens])
                if ev.finish_reason is not None:
                    parsed += parser.finish()
            logprobs = None
            if plan.logprobs and ev.tokens:
                logprobs = {"content": [token_logprob(t, plan.top_logprobs) for t in
                                        _content_tokens(plan, ev.tokens, ev.finish_reason)],
                            "refusal": None}
                if not parsed:
                    parsed = [("content", "")]
            if not parsed and plan.vllm.return_token_ids and ev.tokens:
                parsed = [("content", "")]      # the token ids still go out
            for k, item in enumerate(parsed):
                choice = {"index": ev.index, "delta": _delta_of(item, call_ids[ev.index]),
                          "logprobs": logprobs if k == 0 else None, "finish_reason": None,
                          **_variant_fields(plan, ev, metrics=False)}
                if k == 0:
                    ext.token_ids(choice, ev)
                yield chunk([choice])
            if ev.finish_reason is not None:
                calls = parser.calls if parser is not None else 0
                yield chunk([{"index": ev.index, "delta": {}, "logprobs": None,
                              "finish_reason": finish_reason(ev, calls, plan.named_tool),
                              **_variant_fields(plan, ev)}],
                            **(_extensions(plan) if not plan.include_usage else {}))


def legacy_logprobs(tokens: list[TokenInfo], top: int, offset: int) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        out["tokens"].append(t.text)
        out["token_logprobs"].append(floor_logprob(t.logprob))
        entries = {e.token: floor_logprob(e.logprob) for e in t.top[:top]}
        entries.setdefault(t.text, floor_logprob(t.logprob))
        out["top_logprobs"].append(entries)
        if t.counterfactual is not None:     # logprobs_mode "unconstrained" / "all"
            out.setdefault("counterfactual", []).append(t.counterfactual)
        out["text_offset"].append(offset)
        offset += len(t.text)
    return out


def completion_response(plan: OpenAIPlan, results: list[tuple[list[Choice], Final]],
                        created: int | None = None) -> dict:
    out = []
    for p, (choices, final) in enumerate(results):
        prefix = plan.prompt_texts[p] if plan.echo else ""
        for c in choices:
            logprobs = None
            if plan.logprobs and plan.echo and final.prompt_logprobs:
                # the scoring path: the prompt's tokens first (the first has no logprob)
                logprobs = legacy_logprobs(final.prompt_logprobs + c.tokens,
                                           plan.top_logprobs, 0)
                logprobs["token_logprobs"][0] = None
                logprobs["top_logprobs"][0] = None
            elif plan.logprobs:
                logprobs = legacy_logprobs(c.tokens, plan.top_logprobs, len(prefix))
            out.append({"index": p * plan.n + c.index, "text": prefix + c.text,
                        "logprobs": logprobs, "finish_reason": finish_reason(c),
                        **_variant_fields(plan, c)})
    return vllm_ext.completion_extras(plan.vllm, {
        "id": plan.request_id, "object": "text_completion",
        "created": created or int(time.time()), "model": plan.model, "choices": out,
        "usage": usage_body(f.usage for _, f in results)},
        [r.prompt_ids for r in plan.requests], results, plan.n)


def completion_stream(plan: OpenAIPlan, prompt_index: int,
                      events: Iterable[Delta | Final | None], created: int,
                      usages: list[Usage]) -> Iterator[dict | None]:
    """Chunks of one prompt's generation; its usage is appended to `usages` (the caller
    sends the usage chunk once every prompt is done)."""
    offsets = [0] * plan.n
    ext = vllm_ext.StreamExtras(plan.vllm, len(plan.requests[prompt_index].prompt_ids))
    sent_prompt_ids = [False] * plan.n

    def chunk(index, text, logprobs, reason, ev=None):
        choice = {"index": prompt_index * plan.n + index, "text": text, "logprobs": logprobs,
                  "finish_reason": reason, **_variant_fields(plan, Choice(index), metrics=False)}
        if plan.vllm.return_token_ids and not sent_prompt_ids[index]:
            sent_prompt_ids[index] = True
            choice["prompt_token_ids"] = list(plan.requests[prompt_index].prompt_ids)
        if ev is not None:
            ext.token_ids(choice, ev)
        c = {"id": plan.request_id, "object": "text_completion", "created": created,
             "model": plan.model, "choices": [choice]}
        if plan.include_usage:
            c["usage"] = None
        return ext.decorate(c, plan.include_usage)

    if plan.echo:
        for i in range(plan.n):
            text = plan.prompt_texts[prompt_index]
            offsets[i] = len(text)
            yield chunk(i, text, None, None)
    for ev in events:
        if ev is None:
            yield None
        elif isinstance(ev, Final):
            usages.append(ev.usage)
            if ext.final_fields(ev):
                yield {"id": plan.request_id, "object": "text_completion", "created": created,
                       "model": plan.model, "choices": [], **ext.final_fields(ev)}
        else:
            ext.count(ev)
            if ev.text or (ev.tokens and (plan.logprobs or plan.vllm.return_token_ids)):
                lp = (legacy_logprobs(ev.tokens, plan.top_logprobs, offsets[ev.index])
                      if plan.logprobs else None)
                offsets[ev.index] += len(ev.text)
                yield chunk(ev.index, ev.text, lp, None, ev)
            if ev.finish_reason is not None:
                last = chunk(ev.index, "", None, finish_reason(ev))
                if plan.requests[prompt_index].variants:
                    last["choices"][0]["metrics"] = ev.metrics
                yield last


def usage_chunk(plan: OpenAIPlan, usages: list[Usage], created: int) -> dict:
    return {"id": plan.request_id, "object": "text_completion", "created": created,
            "model": plan.model, "choices": [], "usage": usage_body(usages)}


def model_card(info: ModelInfo, name: str) -> dict:
    return {"id": name, "object": "model", "created": info.created, "owned_by": "flaxserve",
            "max_model_len": info.max_model_len, "vocab_size": info.vocab_size}


def models_body(info: ModelInfo) -> dict:
    return {"object": "list", "data": [model_card(info, name) for name in info.served_names]}
