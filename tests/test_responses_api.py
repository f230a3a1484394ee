"""The Responses API (`/v1/responses`) with the official openai SDK on the default model:
`responses.create` / `.stream` / `.parse`, text and message input, `instructions`, tools
and tool outputs, reasoning items, `max_output_tokens`, our sampling extensions, per-token
logprobs, and `store` / `previous_response_id` / retrieve / delete across a restart of the
front end (the SQLite store is a file)."""

from __future__ import annotations

import subprocess
import sys
from typing import Literal

import openai
import pytest
import requests
from pydantic import BaseModel, Field

from tests import http_fixtures
from tests.http_fixtures import API_KEY, Servers

WEATHER = [{"type": "function", "name": "get_weather", "description": "the weather in a city",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "enum": ["Paris", "Oslo"]}},
                "required": ["city"], "additionalProperties": False}, "strict": True}]


class Trip(BaseModel):
    city: Literal["Paris", "Oslo", "Lima"]
    days: int = Field(ge=1, le=7)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("responses")
    store = str(root / "store" / "responses.sqlite")
    with Servers(root, [API_KEY], ["--max-slots", "4", "--max-model-len", "1024"],
                 model="default", served_names=("default",),
                 http_args=["--response-store", store]) as s:
        s.store_path = store
        yield s


@pytest.fixture(scope="module")
def client(servers):
    return openai.OpenAI(base_url=servers.base_url + "/v1", api_key=API_KEY, max_retries=0)


def _restart_front_end(servers) -> None:
    """Stop gunicorn and start a fresh one on the same port and store (the engine stays)."""
    http_fixtures._stop(servers.http)
    cmd = [sys.executable, "-m", "serving.http.main", "--engine",
           f"127.0.0.1:{servers.grpc_port}", "--port", str(servers.port), "--workers", "1",
           "--served-model-name", "default", "--api-key", API_KEY,
           "--response-store", servers.store_path]
    servers.http = subprocess.Popen(cmd, cwd=http_fixtures.ROOT, env=http_fixtures._env(),
                                    stdout=servers.log, stderr=subprocess.STDOUT)
    http_fixtures._wait(servers._http_up, servers.http, "flaxserve http", 60)


def test_create_text_input_and_instructions(client):
    r = client.responses.create(model="default", input="Tell me about food.",
                                instructions="Be brief.", max_output_tokens=16,
                                temperature=0)
    assert r.object == "response" and r.status in ("completed", "incomplete")
    assert r.output_text and r.output[-1].type == "message"
    assert r.output[-1].content[0].type == "output_text"
    assert r.usage.output_tokens >= 1 and r.usage.input_tokens > 5
    assert r.instructions == "Be brief." and r.store is False
    # message input, typed content parts, gives the same prompt
    m = client.responses.create(model="default", max_output_tokens=16, temperature=0,
                                instructions="Be brief.", input=[
                                    {"role": "user", "content": [
                                        {"type": "input_text", "text": "Tell me about food."}]}])
    assert m.output_text == r.output_text and m.usage.input_tokens == r.usage.input_tokens


def test_stream_events_and_final_equal_create(client):
    kw = dict(model="default", input="Tell me about food.", instructions="Be brief.",
              max_output_tokens=12, temperature=0)
    whole = client.responses.create(**kw)
    with client.responses.stream(**kw) as stream:
        events = list(stream)
    final = events[-1].response         # the SDK's final response needs response.completed
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done",
                          "response.completed" if whole.status == "completed"
                          else "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text == final.output_text


def test_parse_structured_output(client):
    for seed in (1, 2):
        r = client.responses.parse(model="default", input="Plan a trip.", text_format=Trip,
                                   max_output_tokens=40, extra_body={"seed": seed})
        assert isinstance(r.output_parsed, Trip)


def test_tools_and_tool_outputs(client):
    r = client.responses.create(model="default", input="Weather in Paris?", tools=WEATHER,
                                tool_choice="required", max_output_tokens=40,
                                parallel_tool_calls=False)
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and call.call_id and call.status == "completed"
    assert call.arguments in ('{"city": "Paris"}', '{"city": "Oslo"}')
    # stateless continuation: the whole history as items
    follow = client.responses.create(model="default", tools=WEATHER, max_output_tokens=8,
                                     input=[{"role": "user", "content": "Weather in Paris?"},
                                            {"type": "function_call", "call_id": call.call_id,
                                             "name": call.name, "arguments": call.arguments},
                                            {"type": "function_call_output",
                                             "call_id": call.call_id, "output": "sunny"}])
    assert follow.usage.input_tokens > r.usage.input_tokens
    # streamed: the call's arguments arrive as deltas that add up
    with client.responses.stream(model="default", input="Weather in Paris?", tools=WEATHER,
                                 tool_choice="required", max_output_tokens=40,
                                 parallel_tool_calls=False) as s:
        events = list(s)
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done and done[0].arguments == args


def test_reasoning_items(client):
    r = client.responses.create(model="default", input="Why is the sky blue?",
                                reasoning={"effort": "high"}, max_output_tokens=24,
                                extra_body={"seed": 1})
    assert r.output[0].type == "reasoning"
    assert r.output[0].content[0].type == "reasoning_text" and r.output[0].content[0].text
    assert r.usage.output_tokens_details.reasoning_tokens > 0
    with client.responses.stream(model="default", input="Why is the sky blue?",
                                 reasoning={"effort": "high"}, max_output_tokens=24,
                                 extra_body={"seed": 1}) as s:
        events = list(s)
    text = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert text == r.output[0].content[0].text


def test_max_output_tokens_and_sampling_extensions(client):
    r = client.responses.create(model="default", input="Tell me a long story.",
                                max_output_tokens=3, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3
    greedy = client.responses.create(model="default", input="Tell me a story.",
                                     max_output_tokens=10, temperature=0)
    top1 = client.responses.create(model="default", input="Tell me a story.",
                                   max_output_tokens=10, temperature=1.0,
                                   extra_body={"top_k": 1, "seed": 5})
    assert top1.output_text == greedy.output_text
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="default", input="x", extra_body={"top_k": -5})
    assert e.value.body["param"] == "top_k"


def test_logprobs(client):
    r = client.responses.create(model="default", input="Tell me about food.",
                                max_output_tokens=10, temperature=0, top_logprobs=2,
                                include=["message.output_text.logprobs"])
    part = r.output[-1].content[0]
    assert part.logprobs and all(len(t.top_logprobs) == 2 for t in part.logprobs)
    assert all(t.logprob <= 0 for t in part.logprobs)
    assert "".join(t.token for t in part.logprobs) == part.text
    with client.responses.stream(model="default", input="Tell me about food.",
                                 max_output_tokens=10, temperature=0, top_logprobs=2,
                                 include=["message.output_text.logprobs"]) as s:
        events = list(s)
    streamed = [t.logprob for e in events if e.type == "response.output_text.delta"
                for t in e.logprobs]
    assert streamed == pytest.approx([t.logprob for t in part.logprobs], abs=1e-4)


def test_stateless_by_default(client):
    r = client.responses.create(model="default", input="Hi", max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="default", input="Hi", previous_response_id=r.id)


def test_store_previous_response_id_across_restart(client, servers):
    first = client.responses.create(model="default", input="My name is Ada.",
                                    max_output_tokens=6, temperature=0, store=True)
    assert first.store is True
    _restart_front_end(servers)
    got = client.responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == first.output_text
    (item,) = client.responses.input_items.list(first.id).data
    assert item.type == "message" and item.content[0].text == "My name is Ada."
    second = client.responses.create(model="default", input="What is my name?",
                                     previous_response_id=first.id, max_output_tokens=6,
                                     temperature=0, store=True)
    assert second.previous_response_id == first.id
    alone = client.responses.create(model="default", input="What is my name?",
                                    max_output_tokens=6, temperature=0)
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
    deleted = client.responses.delete(second.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)


@pytest.mark.parametrize("patch,param", [
    ({"bogus": 1}, "bogus"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"include": ["file_search_call.results"]}, "include"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"background": True}, "background"),
])
def test_bad_requests(servers, patch, param):
    r = requests.post(servers.base_url + "/v1/responses", timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": "default", "input": "x", **patch})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_input_items_become_chat_messages():
    from serving.http.responses_api import input_messages
    msgs = input_messages([
        {"role": "user", "content": "q"},
        {"type": "reasoning", "id": "rs_1", "summary": [],
         "content": [{"type": "reasoning_text", "text": "think"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "a", "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}",
         "id": "fc_1", "status": "completed"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call_output", "call_id": "c2", "output": "two"}])
    assert msgs == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "reasoning_content": "think", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"}]
    from serving.http.errors import APIError
    with pytest.raises(APIError) as e:
        input_messages([{"type": "item_reference", "id": "x"}])
    assert e.value.param == "input[0].type"


def test_bodies_and_events_validate_against_the_sdk_types(servers):
    """Strict pydantic validation with the SDK's own types (the SDK itself parses leniently)."""
    import pydantic
    from openai.types.responses import Response, ResponseStreamEvent
    from tests.http_fixtures import sse_events
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for extra in ({}, {"tools": WEATHER, "tool_choice": "required"},
                  {"reasoning": {"effort": "high"}},
                  {"include": ["message.output_text.logprobs"], "top_logprobs": 1}):
        body = {"model": "default", "input": "Weather in Paris?", "max_output_tokens": 30,
                **extra}
        r = requests.post(servers.base_url + "/v1/responses", json=body, headers=headers,
                          timeout=120)
        assert r.status_code == 200, r.text
        Response.model_validate(r.json())
        s = requests.post(servers.base_url + "/v1/responses", json={**body, "stream": True},
                          headers=headers, timeout=120)
        events = sse_events(s.content)
        adapter = pydantic.TypeAdapter(ResponseStreamEvent)
        for name, data in events:
            ev = adapter.validate_json(data)
            assert ev.type == name


def test_builder_marks_only_unfinished_items_incomplete():
    from serving.http.responses_api import ResponseBuilder, ResponsesPlan
    plan = ResponsesPlan(chat=None, request={}, history=[], stream=False, store=False,
                         logprobs=False)
    for args, status in (('{"city": "Paris"}', "completed"), ('{"city": "Pa', "incomplete")):
        b = ResponseBuilder(plan)
        b.start()
        b.feed({"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": ""}}]}}]})
        b.feed({"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": args}}]}}]})
        b.feed({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        kinds = [k for k, _ in b.end()]
        body = b.response()
        assert kinds[-1] == "response.incomplete" and body["status"] == "incomplete"
        assert body["output"][0]["status"] == status
        assert body["output"][0]["arguments"] == args
