"""The OpenAI answers: an `OpenAIPlan` and the engine's events -> bodies, chunks, headers.

`chat_response` / `chat_stream` and `completion_response` / `completion_stream` /
`usage_chunk` turn the engine's `Delta`s and `Final`s into bodies and chunks exactly as the
SDKs parse them (CONFORMANCE.md); the pieces they share (usage, finish_reason, logprobs
entries, variant and beam fields) live next to them, as do the `/v1/models` bodies and the
effective-max_tokens header. The model's output (reasoning, tool calls) is parsed by
serving.http.chat_output, the same way for both modes. The request side is
openai_chat_request / openai_completion_request. Pure functions: no Falcon, no gRPC.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from typing import Iterable, Iterator

from serving.http.chat_output import OutputParser, delta_events, parse_whole
from serving.http.generation import (Choice, Delta, Final, ModelInfo, TokenInfo, Usage,
                                     floor_logprob)
from serving.http.openai_plan import OpenAIPlan
from serving.http import vllm_ext


MAX_TOKENS_HEADER = "x-flaxserve-max-tokens"


def set_plan_headers(resp, plan: "OpenAIPlan") -> None:
    """The effective max_tokens of each prompt (comma-separated), after clamping."""
    if plan.max_tokens and all(m is not None for m in plan.max_tokens):
        resp.set_header(MAX_TOKENS_HEADER, ",".join(str(m) for m in plan.max_tokens))


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


def finish_reason(c: Choice | Delta, tool_calls: int = 0, named_tool: bool = False) -> str:
    """One rule for streaming and non-streaming: `length` on truncation, `tool_calls` when
    the model called tools (a named tool_choice says `stop`, as OpenAI does), else `stop`."""
    if c.finish_reason == "length":
        return "length"
    return "tool_calls" if tool_calls and not named_tool else "stop"


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


def _extensions(plan: OpenAIPlan) -> dict:
    return {"compacted_tokens": plan.compacted_tokens} if plan.compacted_tokens else {}


def token_logprob(t: TokenInfo, top: int) -> dict:
    return {"token": t.text, "logprob": floor_logprob(t.logprob), "bytes": t.bytes,
            "top_logprobs": [{"token": e.token, "logprob": floor_logprob(e.logprob),
                              "bytes": e.bytes} for e in t.top[:top]],
            **(t.counterfactual or {})}


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


def _call_id() -> str:
    return "call_" + secrets.token_hex(12)


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
            parsed = delta_events(parser, ev)
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
