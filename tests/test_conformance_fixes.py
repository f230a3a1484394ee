"""Issue 13's conformance fixes, each as a peer's client hit it, with the official SDKs on
the default model behind `flaxserve engine` + gunicorn: forced tool calls with `$ref`
schemas (nested pydantic models), thinking + a forced call, a forced call cut by
max_tokens, prompt_logprobs on both endpoints, `"arguments": ""` in the history, echo of
special tokens, GET /v1/models/{id}, a missing `model`, the stricter 400s, GBNF grammars."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest
import requests
from pydantic import BaseModel, Field

from tests.http_fixtures import API_KEY, Servers

ASK = [{"role": "user", "content": "Fill in the form, please."}]


class Inner(BaseModel):
    x: int = Field(ge=0, le=99)
    label: str = Field(max_length=12)


class Outer(BaseModel):          # two references to $defs/Inner (bounded: calls stay short)
    inner: Inner
    items: list[Inner] = Field(max_length=2)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    with Servers(tmp_path_factory.mktemp("conf"), [API_KEY],
                 ["--max-slots", "4", "--max-model-len", "1024"], model="default",
                 served_names=("default",)) as s:
        yield s


@pytest.fixture(scope="module")
def client(servers):
    return openai.OpenAI(base_url=servers.base_url + "/v1", api_key=API_KEY, max_retries=0)


def _post(servers, path, body):
    return requests.post(servers.base_url + path, json=body, timeout=120,
                         headers={"Authorization": f"Bearer {API_KEY}"})


def _reasoning(message) -> str:
    return (message.model_extra or {}).get("reasoning_content") or ""


# ---- 1. forced tool calls whose parameters use $ref / $defs ------------------------------

def test_grammar_hoists_defs_and_rebases_refs():
    from serving.http.tools import ToolSpec, call_object_schema
    schema = openai.pydantic_function_tool(Outer)["function"]["parameters"]
    assert "$defs" in schema
    body = call_object_schema(ToolSpec("Outer", None, {**schema, "properties": {
        **schema["properties"], "again": {"$ref": "#/properties/inner"}}}))
    assert body["$defs"] == schema["$defs"]
    args = body["properties"]["arguments"]
    assert "$defs" not in args and args["properties"]["inner"] == {"$ref": "#/$defs/Inner"}
    assert args["properties"]["again"] == {"$ref": "#/properties/arguments/properties/inner"}


@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "Outer"}}])
def test_nested_pydantic_tool_forced(client, choice):
    r = client.chat.completions.create(
        model="default", messages=ASK, tools=[openai.pydantic_function_tool(Outer)],
        tool_choice=choice, max_tokens=200, seed=1, parallel_tool_calls=False)
    c = r.choices[0]
    assert c.finish_reason == ("tool_calls" if choice == "required" else "stop")
    (call,) = c.message.tool_calls
    assert call.function.name == "Outer"
    Outer.model_validate_json(call.function.arguments)
    # the call's JSON has json.dumps' layout: no free whitespace inside the wrapper
    assert call.function.arguments == json.dumps(json.loads(call.function.arguments))


def test_nested_pydantic_tool_forced_anthropic(servers):
    claude = anthropic.Anthropic(base_url=servers.base_url, api_key=API_KEY, max_retries=0)
    m = claude.messages.create(
        model="default", max_tokens=200, messages=ASK,
        tools=[{"name": "Outer", "input_schema":
                openai.pydantic_function_tool(Outer)["function"]["parameters"]}],
        tool_choice={"type": "tool", "name": "Outer", "disable_parallel_tool_use": True})
    assert m.stop_reason == "tool_use"
    (block,) = [b for b in m.content if b.type == "tool_use"]
    Outer.model_validate(block.input)


# ---- 2. thinking + a forced call ends in the call --------------------------------------------

@pytest.mark.parametrize("seed", [1, 2, 3])
def test_thinking_then_forced_call(client, seed):
    r = client.chat.completions.create(
        model="default", messages=ASK, tools=[openai.pydantic_function_tool(Outer)],
        tool_choice="required", max_tokens=200, seed=seed, reasoning_effort="high",
        parallel_tool_calls=False)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    assert _reasoning(c.message)
    Outer.model_validate_json(c.message.tool_calls[0].function.arguments)


# ---- 3. a forced call cut by max_tokens -----------------------------------------------------

@pytest.mark.parametrize("max_tokens", [2, 6])
def test_truncated_forced_call_has_no_markup(client, max_tokens):
    kw = dict(model="default", messages=ASK, tools=[openai.pydantic_function_tool(Outer)],
              tool_choice="required", max_tokens=max_tokens, seed=1)
    r = client.chat.completions.create(**kw)
    c = r.choices[0]
    assert c.finish_reason == "length"
    assert not c.message.content
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == ""
    for ch in chunks:
        for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            assert "<tool_call>" not in (tc.function.arguments or "")


# ---- 4. prompt_logprobs on both endpoints (vLLM's shape) ------------------------------------

def test_prompt_logprobs_chat_and_completions_agree(client):
    chat = client.chat.completions.create(model="default", messages=ASK, max_tokens=2,
                                          extra_body={"prompt_logprobs": 2,
                                                      "return_token_ids": True})
    plp, ids = chat.model_extra["prompt_logprobs"], chat.model_extra["prompt_token_ids"]
    assert plp[0] is None and len(plp) == len(ids) == chat.usage.prompt_tokens
    for t, entry in zip(ids[1:], plp[1:]):
        assert str(t) in entry and 1 <= len(entry) <= 3
        assert all(v["logprob"] <= 0 and v["rank"] >= 1 for v in entry.values())
    comp = client.completions.create(model="default", prompt=ids, max_tokens=1,
                                     extra_body={"prompt_logprobs": 2})
    cplp = comp.choices[0].model_extra["prompt_logprobs"]
    assert [e and {k: round(v["logprob"], 5) for k, v in e.items()} for e in cplp] == \
        [e and {k: round(v["logprob"], 5) for k, v in e.items()} for e in plp]
    # the legacy scoring path (echo + logprobs) gives the same numbers
    echo = client.completions.create(model="default", prompt=ids, max_tokens=1, echo=True,
                                     logprobs=1)
    own = [plp[i][str(t)]["logprob"] for i, t in enumerate(ids) if i > 0]
    assert echo.choices[0].logprobs.token_logprobs[1:len(ids)] == pytest.approx(own, abs=1e-6)


# ---- 7. "arguments": "" in the history ------------------------------------------------------

def test_empty_arguments_in_history(client):
    tools = [{"type": "function", "function": {"name": "now", "parameters": {
        "type": "object", "properties": {}}}}]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "now", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "noon"}]
    r = client.chat.completions.create(model="default", messages=history, tools=tools,
                                       max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


# ---- 8. echo of special tokens ----------------------------------------------------------------

def test_echo_special_tokens_consistent(client, servers):
    ids = _post(servers, "/tokenize", {"messages": ASK})
    ids = ids.json()["tokens"]
    r = client.completions.create(model="default", prompt=ids, max_tokens=1, echo=True,
                                  logprobs=1)
    c = r.choices[0]
    lp = c.logprobs
    assert c.text.startswith("<|im_start|>")
    assert "".join(lp.tokens) == c.text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]


# ---- 9. the smaller ones ------------------------------------------------------------------------

def test_model_by_id_and_missing_model(client, servers):
    m = client.models.retrieve("default")
    assert m.id == "default" and m.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    r = _post(servers, "/v1/chat/completions", {"messages": ASK, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == "default"


@pytest.mark.parametrize("patch,param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"stream": True, "stream_options": {"include_usage": True, "bogus": 1}},
     "stream_options.bogus"),
    ({"response_format": {"type": "json_object", "extra": 1}}, "response_format.extra"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object"}, "shema": {}}}},
     "response_format.json_schema.shema"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),
])
def test_stricter_400s(servers, patch, param):
    r = _post(servers, "/v1/chat/completions",
              {"model": "default", "messages": ASK, "max_tokens": 2, **patch})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param
    if "logit_bias" in patch:
        assert next(iter(patch["logit_bias"])) in err["message"]


def test_tool_choice_none_without_tools_is_fine(client):
    r = client.chat.completions.create(model="default", messages=ASK, max_tokens=2,
                                       tool_choice="none")
    assert r.choices[0].message.content is not None


def test_gbnf_grammar(client):
    grammar = 'root ::= answer "!"\nanswer ::= "yes" | "no"\n'
    for seed in (1, 2):
        r = client.chat.completions.create(model="default", messages=ASK, max_tokens=8,
                                           seed=seed, extra_body={"guided_grammar": grammar})
        assert r.choices[0].message.content in ("yes!", "no!")
    r = client.completions.create(model="default", prompt="Say:", max_tokens=8,
                                  extra_body={"structured_outputs": {"grammar": grammar}})
    assert r.choices[0].text in ("yes!", "no!")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="default", messages=ASK, max_tokens=2,
                                       extra_body={"guided_grammar": "root ::= ("})
    assert e.value.body["param"] == "guided_grammar"


# ---- 11. the docs ship with the project; --help shows the defaults --------------------------

def test_docs_cover_every_flag_and_readme_links_them():
    import argparse

    from serving import cli
    from tests.http_fixtures import ROOT
    docs = (ROOT / "docs" / "cli.md").read_text()
    seen = 0

    def walk(parser):
        nonlocal seen
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    walk(sub)
            elif a.option_strings and a.dest != "help":
                assert f"`{a.option_strings[0]}" in docs, a.option_strings[0]
                seen += 1
    walk(cli.build_parser())
    assert seen > 50
    readme = (ROOT / "README.md").read_text()
    assert "../shared" not in readme
    for page in ("design", "sampling", "api", "cli", "fields"):
        assert f"docs/{page}.md" in readme and (ROOT / "docs" / f"{page}.md").exists()


def test_help_shows_defaults(capsys):
    from serving import cli
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "(default: 8000)" in out and "(default: 50051)" in out
    assert "~/.cache/flaxserve/responses.sqlite" in out
