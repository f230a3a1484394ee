"""`flaxserve serve --model smollm2` (engine + gunicorn, real processes) with the openai SDK.

The README's first command, as a newcomer runs it: a real instruct model answers a factual
question, and constrained decoding finishes a forced tool call and a strict JSON schema
reply well within 200 tokens. One server for the module; skipped, saying why, only when
the GGUF cannot be fetched.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest

from tests.http_fixtures import ROOT, _env, _stop, _wait, free_port, health_ok


@pytest.fixture(scope="module")
def server(smollm2_gguf, tmp_path_factory):
    port, grpc_port = free_port(), free_port()
    log_path = tmp_path_factory.mktemp("smollm2") / "serve.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "serve", "--model", "smollm2", "--port", str(port), "--prefill-batch", "1",
         "--grpc-port", str(grpc_port), "--workers", "1", "--max-slots", "2",
         "--max-model-len", "512"],
        cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)

    up = lambda: health_ok(f"http://127.0.0.1:{port}")
    try:
        try:
            _wait(up, proc, "flaxserve serve --model smollm2", 600)
        except RuntimeError as e:
            log.flush()
            raise RuntimeError(f"{e}; log:\n{log_path.read_text()[-3000:]}") from None
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        _stop(proc)
        log.close()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=300)


def test_served_under_its_reference_name(client):
    assert [m.id for m in client.models.list()] == ["smollm2"]


def test_capital_of_france(client):
    reply = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=40)
    assert "Paris" in reply.choices[0].message.content


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "the city name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}


@pytest.mark.parametrize("tool_choice, finish", [
    # a named tool_choice finishes with "stop", as OpenAI's API does; "required" with
    # "tool_calls"
    ({"type": "function", "function": {"name": "get_weather"}}, "stop"),
    ("required", "tool_calls"),
])
def test_forced_tool_call_finishes(client, tool_choice, finish):
    reply = client.chat.completions.create(
        model="smollm2", temperature=0, max_tokens=200, parallel_tool_calls=False,
        messages=[{"role": "user", "content": "What's the weather like in Paris today?"}],
        tools=[WEATHER], tool_choice=tool_choice)
    choice = reply.choices[0]
    assert choice.finish_reason == finish
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    assert args["city"] == "Paris"
    assert reply.usage.completion_tokens < 200


COUNTRY = {"type": "object", "properties": {
    "country": {"type": "string"}, "capital": {"type": "string"},
    "population_millions": {"type": "number"},
    "languages": {"type": "array", "items": {"type": "string"}, "maxItems": 4}},
    "required": ["country", "capital", "population_millions", "languages"],
    "additionalProperties": False}


def test_strict_json_schema_reply_finishes(client):
    reply = client.chat.completions.create(
        model="smollm2", temperature=0, max_tokens=200,
        messages=[{"role": "user", "content": "Describe France as JSON."}],
        response_format={"type": "json_schema", "json_schema": {
            "name": "country", "strict": True, "schema": COUNTRY}})
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    data = json.loads(choice.message.content)
    jsonschema.validate(data, COUNTRY)
    assert data["capital"] == "Paris"
    assert reply.usage.completion_tokens < 200


def test_readme_first_request(server):
    """The curl line at the top of the README, as printed (only the port changes)."""
    readme = (ROOT / "README.md").read_text()
    head = readme.split("## ", 1)[0]
    assert "pip install -e . && flaxserve serve --model smollm2" in head
    (line,) = [ln.strip() for ln in head.splitlines() if ln.strip().startswith("curl ")]
    port = server.rsplit(":", 1)[1].split("/")[0]
    out = subprocess.run(["bash", "-c", line.replace(":8000", f":{port}")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Paris" in json.loads(out.stdout)["choices"][0]["message"]["content"]
