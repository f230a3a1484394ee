"""Chat semantics in process: <think> and <tool_call> parsing (streamed = whole), templates
with thinking and tools, forced calls as grammars, structured-output mapping, thinking
signatures, auto_compact. The default model's real tokenizer and template; the engine's
output is played as per-token deltas through the real response builders."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from serving.http import anthropic_api, openai_shapes, thinking_signature
from serving.http.openai_chat_request import parse_chat
from serving.http.chat_output import OutputSpec, parse_whole
from serving.http.errors import APIError
from serving.http.generation import Delta, Final, ModelInfo, TokenInfo, Usage, accumulate
from serving.http.prompt import load_prompt_tokenizer
from serving.http.reasoning import ThinkSplitter
from serving.http.tool_calls import ToolCallParser
from tests.http_fixtures import validate_openai

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def info():
    return ModelInfo(["default"], load_prompt_tokenizer("checkpoints/default"),
                     max_model_len=2048, vocab_size=4096)


def chat(**kw):
    body = {"model": "default", "messages": [{"role": "user", "content": "hello"}]}
    body.update(kw)
    return body


def _chunks(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


def _events(tok, text: str, reason: str = "stop"):
    """The engine's stream for `text`: one delta per token, then usage."""
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [tok.decode(ids[:k + 1], False)[len(tok.decode(ids[:k], False)):]
              for k in range(len(ids))]
    assert "".join(pieces) == text
    for k, (t, piece) in enumerate(zip(ids, pieces)):
        yield Delta(0, piece, [TokenInfo(t, piece)], reason if k == len(ids) - 1 else None)
    yield Final(Usage(prompt_tokens=5, completion_tokens=len(ids)))


OUTPUT = ('<think>\nthe user wants weather\n</think>\n\nLet me check.\n<tool_call>\n'
          '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
          '</tool_call><|im_end|>')


# ---- parsers: the same result however the text is chunked -------------------------------------

@pytest.mark.parametrize("seed", range(20))
def test_parsers_are_chunking_invariant(seed):
    spec = OutputSpec(reasoning=True, tools=True, strip=("<|im_end|>",))
    whole = parse_whole(spec, OUTPUT)
    assert whole.reasoning == "the user wants weather"
    assert whole.content == "Let me check."
    assert whole.calls == [{"name": "get_weather", "arguments": '{"city": "Paris"}'},
                           {"name": "get_weather", "arguments": '{"city": "Oslo"}'}]
    from serving.http.chat_output import OutputParser
    p = OutputParser(spec)
    events = []
    for piece in _chunks(OUTPUT, random.Random(seed)):
        events += p.feed(piece)
    events += p.finish()
    joined = {"reasoning": "", "content": "", "args": {}}
    for ev in events:
        if ev[0] in ("reasoning", "content"):
            joined[ev[0]] += ev[1]
        elif ev[0] == "args":
            joined["args"][ev[1]] = joined["args"].get(ev[1], "") + ev[2]
    assert joined["reasoning"] == whole.reasoning and joined["content"] == whole.content
    assert [joined["args"][k] for k in sorted(joined["args"])] == [
        c["arguments"] for c in whole.calls]


def test_think_splitter_open_prompt_and_no_thinking():
    s = ThinkSplitter(inside=True)
    out = s.feed("plan a\n") + s.feed("</thi") + s.feed("nk>\n\nanswer") + s.finish()
    assert out == [("reasoning", "plan a"), ("content", "answer")]
    s = ThinkSplitter(inside=False)
    assert s.feed("just text") + s.finish() == [("content", "just text")]


def test_malformed_tool_call_is_content_and_parallel_off_keeps_one():
    p = ToolCallParser()
    out = p.feed("<tool_call>not json</tool_call> after") + p.finish()
    assert "".join(e[1] for e in out if e[0] == "content") == \
        "<tool_call>not json</tool_call> after"
    one = parse_whole(OutputSpec(tools=True, max_calls=1), OUTPUT.split("<|im_end|>")[0]
                      .split("</think>")[1])
    assert [c["arguments"] for c in one.calls] == ['{"city": "Paris"}']


# ---- templates: thinking, tools, errors -------------------------------------------------------------

def test_enable_thinking_opens_or_closes_the_block(info):
    on = parse_chat(chat(chat_template_kwargs={"enable_thinking": True}), info)
    off = parse_chat(chat(chat_template_kwargs={"enable_thinking": False}), info)
    assert on.prompt_texts[0].endswith("<|im_start|>assistant\n<think>\n")
    assert off.prompt_texts[0].endswith("<think>\n\n</think>\n\n")
    assert on.output.thinking_open and not off.output.thinking_open
    # the parser needs the markers: the engine keeps special tokens, the parser strips them
    assert on.requests[0].skip_special_tokens is False
    assert "<|im_end|>" in on.output.strip and "</think>" not in on.output.strip


def test_tools_and_history_reach_the_template(info):
    plan = parse_chat(chat(tools=[WEATHER], messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "reasoning_content": "use the tool",
         "tool_calls": [{"id": "call_1", "type": "function", "function": {
             "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]), info)
    text = plan.prompt_texts[0]
    assert '"name": "get_weather"' in text and "<tools>" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n' \
           '</tool_call>' in text
    assert "<think>\nuse the tool\n</think>" in text
    assert "<tool_response>\nsunny\n</tool_response>" in text


def test_template_errors_are_400_naming_the_template(info):
    for template, param in (("{% for x in %}", "chat_template"),
                            ("{{ raise_exception('no') }}", "messages")):
        with pytest.raises(APIError) as e:
            parse_chat(chat(chat_template=template), info)
        assert (e.value.status, e.value.param) == (400, param)


# ---- responses built from the engine's stream --------------------------------------------------------

def _stream_body(plan, events):
    """Chunks accumulated as an SDK does (strings concatenated, tool calls by index)."""
    msg = {"content": "", "reasoning_content": "", "tool_calls": {}}
    reason = None
    for c in openai_shapes.chat_stream(plan, events):
        validate_openai(c, "CreateChatCompletionStreamResponse")
        for ch in c["choices"]:
            d = ch["delta"]
            msg["content"] += d.get("content") or ""
            msg["reasoning_content"] += d.get("reasoning_content") or ""
            for tc in d.get("tool_calls") or []:
                slot = msg["tool_calls"].setdefault(tc["index"], {"name": "", "arguments": ""})
                if "id" in tc:
                    assert "name" not in slot or not slot["name"], "name sent twice"
                    slot["name"] += tc["function"]["name"]
                slot["arguments"] += tc["function"]["arguments"]
            reason = ch["finish_reason"] or reason
    return msg, reason


def test_openai_tool_calls_and_reasoning_streamed_equal_whole(info):
    tok = info.tokenizer
    plan = parse_chat(chat(tools=[WEATHER]), info)
    plan.output.thinking_open = False
    choices, final = accumulate(_events(tok, OUTPUT), 1)
    body = openai_shapes.chat_response(plan, choices, final)
    validate_openai(body, "CreateChatCompletionResponse")
    c = body["choices"][0]
    assert c["finish_reason"] == "tool_calls"
    assert c["message"]["content"] == "Let me check."
    assert c["message"]["reasoning_content"] == c["message"]["reasoning"] == \
        "the user wants weather"
    calls = c["message"]["tool_calls"]
    assert [json.loads(t["function"]["arguments"]) for t in calls] == [{"city": "Paris"},
                                                                      {"city": "Oslo"}]
    assert all(t["id"].startswith("call_") and t["type"] == "function" for t in calls)
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == len(
        tok.encode("<think>\nthe user wants weather\n</think>", add_special_tokens=False))
    streamed, reason = _stream_body(plan, _events(tok, OUTPUT))
    assert reason == "tool_calls"
    assert streamed["content"] == "Let me check."
    assert streamed["reasoning_content"] == "the user wants weather"
    assert [streamed["tool_calls"][k] for k in sorted(streamed["tool_calls"])] == [
        {"name": t["function"]["name"], "arguments": t["function"]["arguments"]}
        for t in calls]


def test_openai_length_wins_and_no_tools_is_plain_text(info):
    tok = info.tokenizer
    plan = parse_chat(chat(tools=[WEATHER], tool_choice="none"), info)
    choices, final = accumulate(_events(tok, "<tool_call>\n{\"name\"", "length"), 1)
    c = openai_shapes.chat_response(plan, choices, final)["choices"][0]
    assert c["finish_reason"] == "length" and "tool_calls" not in c["message"]


def test_anthropic_thinking_tool_use_and_signature_round_trip(info):
    tok = info.tokenizer
    secret = b"k" * 32
    body = {"model": "default", "max_tokens": 1100, "tools": [
        {"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": [{"role": "user", "content": "weather?"}]}
    plan = anthropic_api.parse_messages(body, info, secret=secret)
    assert plan.output.thinking_open and plan.request.sampling.max_thinking_tokens == 1024
    text = OUTPUT.split("<think>\n", 1)[1]            # the prompt opened <think>
    choices, final = accumulate(_events(tok, text), 1)
    msg = anthropic_api.message_response(plan, choices[0], final)
    kinds = [b["type"] for b in msg["content"]]
    assert kinds == ["thinking", "text", "tool_use", "tool_use"]
    assert msg["stop_reason"] == "tool_use"
    assert msg["content"][2]["input"] == {"city": "Paris"}
    thinking = msg["content"][0]
    assert thinking_signature.verify(secret, thinking["thinking"], thinking["signature"])
    # stream: sequential blocks, one signature_delta before the thinking block stops
    events = list(anthropic_api.message_stream(plan, _events(tok, text)))
    names = [e[0] for e in events if e is not None]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    starts = [e[1]["content_block"]["type"] for e in events
              if e and e[0] == "content_block_start"]
    assert starts == kinds
    sig = [e[1]["delta"]["signature"] for e in events if e and e[0] == "content_block_delta"
           and e[1]["delta"]["type"] == "signature_delta"]
    assert sig == [thinking["signature"]]
    args = "".join(e[1]["delta"]["partial_json"] for e in events if e and
                   e[0] == "content_block_delta" and e[1]["index"] == 2 and
                   e[1]["delta"]["type"] == "input_json_delta")
    assert json.loads(args) == {"city": "Paris"}
    assert [e for e in events if e and e[0] == "message_delta"][0][1]["delta"][
        "stop_reason"] == "tool_use"
    # the next turn sends the thinking and the tool use back with a result
    turn = {"role": "assistant", "content": [
        thinking, {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                   "input": {"city": "Paris"}}]}
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                           "content": "sunny"}]}
    nxt = dict(body, thinking={"type": "disabled"}, messages=body["messages"] + [turn, result])
    plan2 = anthropic_api.parse_messages(nxt, info, secret=secret)
    assert "<tool_response>\nsunny\n</tool_response>" in tok.decode(
        plan2.request.prompt_ids, False)
    tampered = dict(thinking, thinking=thinking["thinking"] + " (edited)")
    bad = dict(nxt, messages=body["messages"] + [dict(turn, content=[tampered]), result])
    with pytest.raises(APIError) as e:
        anthropic_api.parse_messages(bad, info, secret=secret)
    assert (e.value.status, e.value.param) == (400, "messages[1].content[0].signature")


# ---- request mapping: forced calls, structured outputs, context -------------------------------------

def test_forced_tool_call_is_a_grammar(info):
    plan = parse_chat(chat(tools=[WEATHER], tool_choice="required"), info)
    grammar = plan.requests[0].sampling.guided_grammar
    assert "<tool_call>" in grammar and '"const": "get_weather"' in grammar
    named = parse_chat(chat(tools=[WEATHER], tool_choice={
        "type": "function", "function": {"name": "get_weather"}}), info)
    assert named.named_tool and named.requests[0].sampling.guided_grammar
    a = anthropic_api.parse_messages({"model": "default", "max_tokens": 50, "tools": [
        {"name": "get_weather", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any"}, "messages": [{"role": "user", "content": "x"}]}, info)
    assert "get_weather" in a.request.sampling.guided_grammar


def test_response_formats_map_to_guided_fields(info):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    p = parse_chat(chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": schema, "strict": True}}), info)
    assert p.requests[0].sampling.guided_json == schema
    p = parse_chat(chat(response_format={"type": "json_object"}), info)
    assert p.requests[0].sampling.guided_json_object is True
    p = parse_chat(chat(guided_choice=["yes", "no"]), info)
    assert p.requests[0].sampling.guided_choice == ["yes", "no"]
    a = anthropic_api.parse_messages({"model": "default", "max_tokens": 50, "output_config": {
        "format": {"type": "json_schema", "schema": schema}},
        "messages": [{"role": "user", "content": "x"}]}, info)
    assert a.request.sampling.guided_json == schema


def test_forced_call_with_response_format_is_400(info):
    with pytest.raises(APIError) as e:
        parse_chat(chat(tools=[WEATHER], tool_choice="required",
                        response_format={"type": "json_object"}), info)
    assert e.value.param == "tool_choice"


def test_auto_compact_drops_oldest_turns(info):
    small = ModelInfo(["default"], info.tokenizer, max_model_len=120, vocab_size=4096)
    long = [{"role": "system", "content": "be brief"}]
    for k in range(6):
        long += [{"role": "user", "content": f"question {k} " + "words " * 8},
                 {"role": "assistant", "content": f"answer {k} " + "words " * 8}]
    long.append({"role": "user", "content": "last question"})
    with pytest.raises(APIError) as e:
        parse_chat(chat(messages=long, max_tokens=10), small)
    assert e.value.code == "context_length_exceeded"
    plan = parse_chat(chat(messages=long, max_tokens=10,
                           chat_template_kwargs={"auto_compact": True}), small)
    ids = plan.requests[0].prompt_ids
    assert len(ids) + 10 <= 120 and plan.compacted_tokens > 0
    full = len(info.tokenizer.encode(parse_chat(chat(messages=long), info)
                                     .prompt_texts[0], add_special_tokens=False))
    assert plan.compacted_tokens == full - len(ids)
    text = plan.prompt_texts[0]
    assert text.startswith("<|im_start|>system\nbe brief") and "last question" in text
    assert "question 0" not in text
    choices, final = accumulate(_events(info.tokenizer, "ok"), 1)
    assert openai_shapes.chat_response(plan, choices, final)["compacted_tokens"] == \
        plan.compacted_tokens
    jsonschema.validate(plan.compacted_tokens, {"type": "integer", "minimum": 1})


def test_chat_template_flag_and_shared_thinking_secret(tmp_path, monkeypatch):
    import argparse

    from serving.http import main
    parser = argparse.ArgumentParser()
    main.add_arguments(parser)
    good = tmp_path / "t.jinja"
    good.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for %}")
    monkeypatch.setenv(thinking_signature.ENV, "shared")
    settings = main.settings_from_args(parser.parse_args(
        ["--engine", "h:1", "--chat-template", str(good)]))
    assert settings.chat_template == good.read_text()
    assert settings.thinking_secret == b"shared"
    with pytest.raises(ValueError, match="--chat-template"):
        main.settings_from_args(parser.parse_args(["--engine", "h:1", "--chat-template",
                                                   str(bad)]))
    monkeypatch.delenv(thinking_signature.ENV)
    a = main.settings_from_args(parser.parse_args(["--engine", "h:1"]))
    assert len(a.thinking_secret) == 32 and a.thinking_secret != settings.thinking_secret


def test_stop_token_text_moves_to_the_token_before_it():
    """A reply ending in an incomplete character: the held bytes are flushed (U+FFFD) with
    the stop token, whose logprobs entry is left out; its text must not be lost with it."""
    from types import SimpleNamespace
    plan = SimpleNamespace(stop_ids=frozenset({2}))
    toks = [TokenInfo(5, "X"), TokenInfo(6, "Y"), TokenInfo(7, ""), TokenInfo(2, "\ufffd")]
    kept = openai_shapes._content_tokens(plan, toks, "stop")
    assert [t.id for t in kept] == [5, 6, 7] and "".join(t.text for t in kept) == "XY\ufffd"
    plain = [TokenInfo(5, "X"), TokenInfo(2, "")]
    assert [t.id for t in openai_shapes._content_tokens(plan, plain, "stop")] == [5]
    assert openai_shapes._content_tokens(plan, plain, "length") == plain
    alone = [TokenInfo(2, "\ufffd")]            # a stream chunk of the stop token alone
    assert openai_shapes._content_tokens(plan, alone, "stop") == alone
