"""The OpenAI request fields both routes share: names, limits and checks.

`/v1/chat/completions` (openai_chat_request) and `/v1/completions`
(openai_completion_request) accept many of the same fields; each is checked here once, so a
field is validated the same way on both routes and the 400 names it (`param`). Here: the
set of fields each route knows (an unknown one is an error; GET /openapi.json lists them),
the limits (docs/fields.md), `stream` / `stream_options`, `stop`, `response_format` and the
`guided_*` extensions, the sampling fields -> `SamplingParams` (our library's names are
accepted as extensions: top_k, min_p, repetition_penalty, ... see SAMPLING.md),
`max_tokens` fitted to the context, and the research fields `variants` / `steering`.
anthropic_api reuses the primitive checks. Pure functions: no Falcon, no gRPC.
"""

from __future__ import annotations

import dataclasses
import math

from sampling.bad_words import resolve_bad_words
from sampling.params import BOUNDS, SamplingParams, check_bounds
from serving.http.errors import APIError, bad_request, from_value_error
from serving.http.generation import ModelInfo
from serving.http.prompt import check_context
from serving.http.tools import check_schema
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
# Limits: the widest of the hosted OpenAI-compatible APIs (docs/fields.md), still validated.
OPENAI_MAX_TEMPERATURE = 4.0      # Baseten / TensorRT-LLM; OpenAI itself stops at 2
MAX_STOP = 32                     # chat: Baseten's 32 sequences (OpenAI: 4)
MAX_STOP_COMPLETIONS = 128        # /v1/completions: vLLM has no cap; eval harnesses send many
MAX_LEGACY_LOGPROBS = 20


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


def _detok_options(body: dict) -> dict:
    return {"skip_special_tokens": _bool(body, "skip_special_tokens", True),
            "spaces_between_special_tokens": _bool(body, "spaces_between_special_tokens", True)}


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


def _check_streamable(stream: bool, sampling: SamplingParams) -> None:
    """What cannot be streamed: `best_of` above `n` and beam search both pick their answers
    only once every candidate is done."""
    if stream and sampling.best_of is not None and sampling.best_of != sampling.n:
        raise bad_request("`best_of` must equal `n` when streaming", "best_of")
    if stream and sampling.use_beam_search:
        raise bad_request("`use_beam_search` is answered whole, not streamed: set `stream` "
                          "to false", "use_beam_search")


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
