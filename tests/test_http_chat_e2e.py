"""Chat semantics end to end: the default model behind `flaxserve engine` + gunicorn, driven
by the official openai and anthropic SDKs. Tool calls (streamed = non-streamed, forced calls
that validate), structured outputs (`.parse()` with pydantic, json_schema on 20 seeds),
thinking on and off, thinking signatures, and the finish / stop reasons of each case.
Forced calls, structured outputs and the thinking budget need the engine's guided decoding
(llguidance) and `thinking_end_ids` / `max_thinking_tokens`."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import anthropic
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.http_fixtures import API_KEY, Servers

CITY = {"type": "object", "properties": {
    "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather",
                                           "description": "the weather in a city",
                                           "parameters": CITY}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    with Servers(tmp_path_factory.mktemp("chat"), [API_KEY],
                 ["--max-slots", "4", "--max-model-len", "2048"], model="default",
                 served_names=("default",)) as s:
        yield s


@pytest.fixture(scope="module")
def client(servers):
    return openai.OpenAI(base_url=servers.base_url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def claude(servers):
    return anthropic.Anthropic(base_url=servers.base_url, api_key=API_KEY, max_retries=0)


def _reasoning(message):
    return (message.model_extra or {}).get("reasoning_content")


# ---- thinking ------------------------------------------------------------------------------------

def test_thinking_on_and_off(client):
    on = client.chat.completions.create(
        model="default", messages=ASK, max_tokens=24, seed=1,
        extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    off = client.chat.completions.create(
        model="default", messages=ASK, max_tokens=24, seed=1,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert isinstance(_reasoning(on.choices[0].message), str)
    assert _reasoning(off.choices[0].message) is None
    assert off.choices[0].message.content
    assert on.usage.completion_tokens_details.reasoning_tokens > 0
    assert off.usage.completion_tokens_details.reasoning_tokens == 0
    for c in (on.choices[0], off.choices[0]):
        assert c.finish_reason in ("stop", "length")
    # streamed: the same split
    chunks = list(client.chat.completions.create(
        model="default", messages=ASK, max_tokens=24, seed=1, stream=True,
        extra_body={"chat_template_kwargs": {"enable_thinking": True}}))
    streamed = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                       for c in chunks if c.choices)
    assert streamed == _reasoning(on.choices[0].message)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        on.choices[0].message.content
    assert "<think>" not in on.choices[0].message.content


def test_tampered_thinking_signature_is_400(claude):
    turn = {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "I made this up", "signature": "AAAA"},
        {"type": "text", "text": "hi"}]}
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model="default", max_tokens=8, messages=[
            {"role": "user", "content": "hello"}, turn, {"role": "user", "content": "more"}])
    assert "signature" in e.value.body["error"]["message"]


def test_anthropic_thinking_budget_and_signature_round_trip(claude):
    kw = dict(model="default", max_tokens=1100,
              thinking={"type": "enabled", "budget_tokens": 1024})
    first = claude.messages.create(messages=[{"role": "user", "content": "hello"}], **kw)
    block = first.content[0]
    assert block.type == "thinking" and block.signature
    assert first.stop_reason in ("end_turn", "max_tokens")
    assert first.usage.output_tokens <= 1100
    history = [{"role": "user", "content": "hello"},
               {"role": "assistant", "content": [b.model_dump() for b in first.content
                                                 if b.type != "text" or b.text]},
               {"role": "user", "content": "and then?"}]
    again = claude.messages.create(messages=history, model="default", max_tokens=8)
    assert again.stop_reason in ("end_turn", "max_tokens")
    history[1]["content"][0]["thinking"] += " (edited)"
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(messages=history, model="default", max_tokens=8)


# ---- tool calls --------------------------------------------------------------------------------------

def test_required_tool_call_validates(client):
    for seed in range(3):
        r = client.chat.completions.create(model="default", messages=ASK, tools=TOOLS,
                                           tool_choice="required", parallel_tool_calls=False,
                                           max_tokens=80, seed=seed)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls", c.message
        (call,) = c.message.tool_calls
        assert call.id.startswith("call_") and call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), CITY)


def test_named_tool_choice_finishes_with_stop(client):
    r = client.chat.completions.create(
        model="default", messages=ASK, tools=TOOLS, max_tokens=80, seed=5,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.tool_calls[0].function.arguments),
                        CITY)


def test_streamed_tool_call_equals_non_streamed(client):
    kw = dict(model="default", messages=ASK, tools=TOOLS, tool_choice="required",
              max_tokens=120, seed=11, temperature=1.0)
    whole = client.chat.completions.create(**kw)
    with client.chat.completions.stream(**kw) as stream:
        final = stream.get_final_completion()
    a, b = whole.choices[0], final.choices[0]
    assert a.finish_reason == b.finish_reason == "tool_calls"
    assert [(t.function.name, t.function.arguments) for t in a.message.tool_calls] == \
        [(t.function.name, t.function.arguments) for t in b.message.tool_calls]
    assert len({t.id for t in b.message.tool_calls}) == len(b.message.tool_calls)


def test_anthropic_tool_use_round_trip(claude):
    tools = [{"name": "get_weather", "description": "the weather in a city",
              "input_schema": CITY}]
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = claude.messages.create(model="default", max_tokens=80, tools=tools, messages=msgs,
                               tool_choice={"type": "any", "disable_parallel_tool_use": True})
    assert r.stop_reason == "tool_use"
    (use,) = [b for b in r.content if b.type == "tool_use"]
    assert use.id.startswith("toolu_") and use.name == "get_weather"
    jsonschema.validate(use.input, CITY)
    with claude.messages.stream(model="default", max_tokens=80, tools=tools, messages=msgs,
                                tool_choice={"type": "tool", "name": "get_weather",
                                             "disable_parallel_tool_use": True}) as s:
        streamed = s.get_final_message()
    assert streamed.stop_reason == "tool_use"
    jsonschema.validate([b for b in streamed.content if b.type == "tool_use"][0].input, CITY)
    msgs += [{"role": "assistant", "content": [b.model_dump() for b in r.content
                                               if b.type != "text" or b.text]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                           "content": "sunny, 21 C"}]}]
    after = claude.messages.create(model="default", max_tokens=16, tools=tools,
                                   messages=msgs, tool_choice={"type": "none"})
    assert after.stop_reason in ("end_turn", "max_tokens")
    assert after.content[0].type == "text"
    n = claude.messages.count_tokens(model="default", tools=tools, messages=msgs)
    assert n.input_tokens == after.usage.input_tokens + after.usage.cache_read_input_tokens


# ---- structured outputs ------------------------------------------------------------------------------

class Verdict(BaseModel):
    mood: Literal["happy", "sad", "calm"]
    score: int = Field(ge=0, le=9)
    sure: bool


def test_parse_with_a_pydantic_model(client):
    r = client.chat.completions.parse(model="default", messages=ASK, response_format=Verdict,
                                      max_tokens=60, seed=2)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(r.choices[0].message.parsed, Verdict)


def test_json_schema_output_validates_on_20_seeds(client):
    schema = Verdict.model_json_schema()

    def run(seed):
        return client.chat.completions.create(
            model="default", messages=ASK, max_tokens=60, seed=seed, temperature=1.0,
            response_format={"type": "json_schema", "json_schema": {
                "name": "verdict", "schema": schema, "strict": True}})

    with ThreadPoolExecutor(4) as pool:       # the engine batches them (4 slots)
        results = list(pool.map(run, range(20)))
    for r in results:
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_anthropic_output_format_and_guided_choice(claude, client):
    r = claude.messages.create(model="default", max_tokens=60, messages=[
        {"role": "user", "content": "mood?"}], extra_body={"output_config": {"format": {
            "type": "json_schema", "schema": Verdict.model_json_schema()}}})
    assert r.stop_reason == "end_turn"
    Verdict.model_validate_json(r.content[0].text)
    c = client.chat.completions.create(model="default", messages=ASK, max_tokens=10,
                                       extra_body={"guided_choice": ["yes", "no"]})
    assert c.choices[0].message.content in ("yes", "no")
    assert c.choices[0].finish_reason == "stop"
