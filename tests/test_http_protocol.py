"""The protocol layers as pure functions: validation (400s naming `param`), sampling
mapping, chat template, response and chunk shapes against the OpenAI schema subset,
Anthropic event order, error shapes, auth, SSE framing. No server here (see
test_http_e2e.py for the real processes)."""

from __future__ import annotations

import pytest

from serving.http import anthropic_api, openai_shapes, sse
from serving.http.openai_chat_request import parse_chat
from serving.http.openai_completion_request import parse_completion
from serving.http.auth import KeyChecker, load_keys, presented_key
from serving.http.errors import APIError, anthropic_body, from_value_error, openai_body
from serving.http.generation import (Delta, Final, ModelInfo, TokenInfo, TopEntry, Usage,
                                     accumulate)
from serving.http.prompt import ChatOptions, load_prompt_tokenizer, render_chat
from tests.http_fixtures import build_tokenizer
from tests.http_fixtures import validate_openai as validate


@pytest.fixture(scope="module")
def hf_tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def info(hf_tok, tmp_path_factory):
    """The model info a worker builds: our tokenizer loader over the saved files."""
    folder = tmp_path_factory.mktemp("tok")
    hf_tok.save_pretrained(folder)
    return ModelInfo(["tiny"], load_prompt_tokenizer(str(folder)), max_model_len=256)


def chat(**kw):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello world"}]}
    body.update(kw)
    return body


# ---- OpenAI request validation ----------------------------------------------------------------

def test_chat_prompt_is_the_rendered_template(hf_tok, info):
    plan = parse_chat(chat(messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hello"},
                          {"type": "text", "text": "world"}]}]), info)
    expected = hf_tok.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello\nworld"}],
        add_generation_prompt=True, tokenize=False)
    assert plan.prompt_texts == [expected]
    assert plan.requests[0].prompt_ids == hf_tok.encode(expected, add_special_tokens=False)


def test_chat_maps_every_sampling_extension(info):
    plan = parse_chat(chat(
        temperature=0.7, top_p=0.9, top_k=5, min_p=0.05, repetition_penalty=1.1,
        presence_penalty=0.5, frequency_penalty=-0.5, min_tokens=2, max_completion_tokens=9,
        max_tokens=100, stop="world", stop_token_ids=[1], include_stop_str_in_output=True,
        ignore_eos=True, seed=7, n=2, logprobs=True, top_logprobs=3, logit_bias={"5": -100},
        typical_p=0.9, xtc_probability=0.5, dry_multiplier=0.8, mirostat_mode=2,
        skip_special_tokens=False, truncate_prompt_tokens=3,
        store=True, metadata={"a": "b"}, service_tier="auto", user="u", prompt_cache_key="k",
        stream=True, stream_options={"include_usage": True}), info)
    s = plan.requests[0].sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.repetition_penalty) == (
        0.7, 0.9, 5, 0.05, 1.1)
    assert (s.presence_penalty, s.frequency_penalty, s.min_tokens) == (0.5, -0.5, 2)
    assert s.max_tokens == 9  # max_completion_tokens wins over max_tokens
    assert s.stop == ["world"] and s.stop_token_ids == [1]
    assert s.include_stop_str_in_output and s.ignore_eos
    assert (s.seed, s.n, s.logprobs, s.top_logprobs) == (7, 2, True, 3)
    assert s.logit_bias == {5: -100}
    assert (s.typical_p, s.xtc_probability, s.dry_multiplier, s.mirostat_mode) == (
        0.9, 0.5, 0.8, 2)
    assert plan.requests[0].skip_special_tokens is False
    assert len(plan.requests[0].prompt_ids) == 3
    assert plan.stream and plan.include_usage


@pytest.mark.parametrize("patch,param", [
    ({"temperature": 4.5}, "temperature"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": 1.5}, "top_k"),
    ({"min_p": 2}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"n": 0}, "n"),
    ({"seed": "x"}, "seed"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"stop": [f"s{i}" for i in range(33)]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"logit_bias": {"3": 101}}, "logit_bias"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"logits_processors": [{"name": "no_such_processor"}]}, "logits_processors"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://x"}}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    # tools and structured outputs are served; genuinely bad values are still a 400
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]},
     "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "nonsense"}}}]}, "tools[0].function.parameters"),
    ({"tool_choice": "required"}, "tool_choice"),   # no tools to call
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": 5}}}}, "response_format.json_schema.schema"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"model": 3}, "model"),
    ({"chat_template": "{% for %}"}, "chat_template"),
    ({"continue_final_message": True}, "continue_final_message"),
    ({"chat_template_kwargs": [1]}, "chat_template_kwargs"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    # prompt + max_tokens over the context is clamped now (tests/test_hosted_parity.py);
    # a prompt that does not fit is still a 400
    ({"messages": [{"role": "user", "content": "x " * 300}]}, "messages"),
])
def test_chat_bad_field_is_400_naming_param(info, patch, param):
    with pytest.raises(APIError) as e:
        parse_chat(chat(**patch), info)
    assert e.value.status == 400
    assert e.value.param == param, e.value.message
    body = openai_body(e.value)["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["type"] == "invalid_request_error" and body["param"] == param


def test_accepted_harmless_values(info):
    parse_chat(chat(tools=[], tool_choice="none", response_format={"type": "text"},
                    parallel_tool_calls=True), info)
    plan = parse_chat(chat(messages=[
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        {"role": "assistant", "content": "the answer", "reasoning_content": "think"}]), info)
    assert plan.requests[0].prompt_ids


def test_unknown_model_is_404(info):
    with pytest.raises(APIError) as e:
        parse_chat(chat(model="gpt-4"), info)
    assert e.value.status == 404 and e.value.param == "model"
    assert openai_body(e.value)["error"]["code"] == "model_not_found"
    assert anthropic_body(e.value)["error"]["type"] == "not_found_error"


def test_continue_final_message_continues_the_text(info):
    plan = parse_chat(chat(
        messages=[{"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello wor"}],
        add_generation_prompt=False, continue_final_message=True, echo=True), info)
    assert plan.prompt_texts[0].endswith("<|assistant|>hello wor")
    assert plan.echo_text == "hello wor"


def test_template_is_sandboxed(info):
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(APIError) as e:
        parse_chat(chat(chat_template=evil), info)
    assert e.value.status == 400 and e.value.param == "chat_template"


def test_completion_prompt_forms(hf_tok, info):
    ids = hf_tok.encode("hello world", add_special_tokens=False)
    for prompt, count in (("hello world", 1), (["hello", "world"], 2), (ids, 1),
                          ([ids, ids[:2]], 2)):
        plan = parse_completion({"model": "tiny", "prompt": prompt}, info)
        assert len(plan.requests) == count
        assert plan.requests[0].sampling.max_tokens == 16
    plan = parse_completion({"model": "tiny", "prompt": ids, "logprobs": 2}, info)
    assert plan.requests[0].prompt_ids == ids and plan.requests[0].sampling.top_logprobs == 2


@pytest.mark.parametrize("patch,param", [
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1, 2], "x", 3]}, "prompt"),
    ({"prompt": [100000]}, "prompt"),
    ({"suffix": "x"}, "suffix"),
    ({"logprobs": 30}, "logprobs"),
    ({"echo": True, "logprobs": 1, "stream": True}, "echo"),  # scoring is not streamed
    ({"max_tokens": 0}, "max_tokens"),
    ({"best_of": 3, "n": 2, "stream": True}, "best_of"),
])
def test_completion_bad_field(info, patch, param):
    with pytest.raises(APIError) as e:
        parse_completion({"model": "tiny", "prompt": "hi", **patch}, info)
    assert (e.value.status, e.value.param) == (400, param)


# ---- OpenAI responses --------------------------------------------------------------------------

def _tokens(hf_tok, text: str) -> list[TokenInfo]:
    ids = hf_tok.encode(text, add_special_tokens=False)
    out, prev = [], ""
    for k in range(len(ids)):
        full = hf_tok.decode(ids[:k + 1])
        piece = full[len(prev):] if not full.endswith("\ufffd") else ""
        prev += piece
        raw = bytes(hf_tok.convert_tokens_to_string([hf_tok.convert_ids_to_tokens(ids[k])]),
                    "utf-8", "replace")
        out.append(TokenInfo(ids[k], piece, -0.5 * (k + 1), list(raw),
                             [TopEntry("a", -0.1, [97]), TopEntry("b", float("-inf"), [98])]))
    return out


def _events(hf_tok, texts: list[str], reasons: list[str]):
    """Per-token deltas for each sample, interleaved, then a Final."""
    per = [_tokens(hf_tok, t) for t in texts]
    for k in range(max(len(p) for p in per)):
        for i, p in enumerate(per):
            if k < len(p):
                done = k == len(p) - 1
                yield Delta(i, p[k].text, [p[k]], reasons[i] if done else None,
                            "wor" if done and reasons[i] == "stop" else None)
    yield Final(Usage(prompt_tokens=7, completion_tokens=sum(len(p) for p in per),
                      cached_tokens=3, gpu_seconds=0.25))


def test_chat_response_shape_and_logprobs(hf_tok, info):
    plan = parse_chat(chat(n=2, logprobs=True, top_logprobs=2), info)
    texts = ["hello 日本語 world", "the fox"]
    choices, final = accumulate(_events(hf_tok, texts, ["length", "stop"]), 2)
    body = openai_shapes.chat_response(plan, choices, final)
    validate(body, "CreateChatCompletionResponse")
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    for c, text in zip(body["choices"], texts):
        assert c["message"]["content"] == text and c["message"]["refusal"] is None
        assert "".join(t["token"] for t in c["logprobs"]["content"]) == text
        assert all(t["logprob"] >= -9999.0 for t in c["logprobs"]["content"])
        assert all(len(t["top_logprobs"]) == 2 for t in c["logprobs"]["content"])
        assert c["logprobs"]["content"][0]["top_logprobs"][1]["logprob"] == -9999.0
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "stop"]
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert u["prompt_tokens_details"]["cached_tokens"] == 3
    assert u["completion_tokens_details"]["reasoning_tokens"] == 0
    assert u["gpu_seconds"] == 0.25


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream_chunk_order(hf_tok, info, include_usage):
    kw = {"stream_options": {"include_usage": True}} if include_usage else {}
    plan = parse_chat(chat(n=2, stream=True, logprobs=True, **kw), info)
    texts = ["hello world", "the quick brown fox"]
    chunks = list(openai_shapes.chat_stream(plan, _events(hf_tok, texts, ["stop", "length"])))
    for c in chunks:
        validate(c, "CreateChatCompletionStreamResponse")
    assert len({c["id"] for c in chunks}) == 1
    for i, text in enumerate(texts):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert sum("role" in m["delta"] for m in mine) == 1
        assert "".join(m["delta"].get("content", "") for m in mine) == text
        finishes = [m for m in mine if m["finish_reason"] is not None]
        assert len(finishes) == 1 and finishes[0] is mine[-1] and finishes[0]["delta"] == {}
    empty = [c for c in chunks if not c["choices"]]
    if include_usage:
        assert len(empty) == 1 and empty[0] is chunks[-1]
        assert all(c["usage"] is None for c in chunks[:-1])
        assert chunks[-1]["usage"]["completion_tokens"] > 0
    else:
        assert not empty and all("usage" not in c for c in chunks)


def test_completion_response_and_stream(hf_tok, info):
    plan = parse_completion({"model": "tiny", "prompt": "hi", "echo": True,
                             "logprobs": 1, "n": 1} | {"echo": False}, info)
    result = accumulate(_events(hf_tok, ["hello world"], ["length"]), 1)
    body = openai_shapes.completion_response(plan, [result])
    validate(body, "CreateCompletionResponse")
    lp = body["choices"][0]["logprobs"]
    assert "".join(lp["tokens"]) == "hello world"
    assert lp["text_offset"][0] == 0 and len(lp["top_logprobs"][0]) >= 1
    echo = parse_completion({"model": "tiny", "prompt": "hi", "echo": True}, info)
    body = openai_shapes.completion_response(echo, [accumulate(
        _events(hf_tok, ["the fox"], ["stop"]), 1)])
    assert body["choices"][0]["text"] == "hithe fox"
    usages = []
    chunks = list(openai_shapes.completion_stream(echo, 0, _events(hf_tok, ["the fox"], ["stop"]),
                                                  1, usages))
    assert "".join(c["choices"][0]["text"] for c in chunks) == "hithe fox"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and len(usages) == 1


def test_models_body(info):
    validate(openai_shapes.models_body(info), "ListModelsResponse")


# ---- Anthropic ------------------------------------------------------------------------------------

def msg(**kw):
    body = {"model": "tiny", "max_tokens": 8,
            "messages": [{"role": "user", "content": "hello"}]}
    body.update(kw)
    return body


def test_anthropic_merges_turns_and_prefills(hf_tok, info):
    body = msg(system=[{"type": "text", "text": "be brief"}], messages=[
        {"role": "user", "content": "hello"},
        {"role": "user", "content": [{"type": "text", "text": "world"}]},
        {"role": "assistant", "content": "the fox "}])
    messages, prefill = anthropic_api.normalize(body)
    assert prefill and [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[1]["content"] == "hello\n\nworld" and messages[2]["content"] == "the fox"
    plan = anthropic_api.parse_messages(body, info)
    text = hf_tok.decode(plan.request.prompt_ids)
    assert text.endswith("<|assistant|>the fox")
    assert anthropic_api.parse_count_tokens({k: v for k, v in body.items()
                                             if k != "max_tokens"}, info) == plan.prompt_tokens


@pytest.mark.parametrize("patch,param", [
    ({"max_tokens": None}, "max_tokens"),
    ({"temperature": 1.5}, "temperature"),
    ({"top_k": -5}, "top_k"),
    ({"stop_sequences": "x"}, "stop_sequences"),
    ({"stop": ["x"]}, "stop"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
     "messages[0].content[0].type"),
    ({"tools": [{"name": "f"}]}, "tools[0].input_schema"),
    ({"tools": [{"name": "f", "input_schema": {"type": "nonsense"}}]},
     "tools[0].input_schema"),
    ({"tools": [{"name": "f", "input_schema": {}}], "tool_choice": {"type": "tool",
                                                                   "name": "g"}},
     "tool_choice.name"),
    ({"thinking": {"type": "enabled", "budget_tokens": 100}}, "thinking.budget_tokens"),
    ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, "thinking.budget_tokens"),
    ({"metadata": "x"}, "metadata"),
    ({"bogus": 1}, "bogus"),
])
def test_anthropic_bad_field(info, patch, param):
    with pytest.raises(APIError) as e:
        anthropic_api.parse_messages(msg(**patch), info)
    assert (e.value.status, e.value.param) == (400, param)
    body = anthropic_body(e.value)
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert param in body["error"]["message"]


def test_anthropic_response_and_stream_order(hf_tok, info):
    plan = anthropic_api.parse_messages(msg(stop_sequences=["wor"]), info)
    choices, final = accumulate(_events(hf_tok, ["hello"], ["stop"]), 1)
    body = anthropic_api.message_response(plan, choices[0], final)
    assert body["id"].startswith("msg_") and body["content"][0]["text"] == "hello"
    assert (body["stop_reason"], body["stop_sequence"]) == ("stop_sequence", "wor")
    u = body["usage"]
    assert u["input_tokens"] + u["cache_read_input_tokens"] == 7
    events = list(anthropic_api.message_stream(plan, _events(hf_tok, ["hello world"], ["length"])))
    names = [e[0] for e in events]
    assert all(name == data["type"] for name, data in events)
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta") == \
        "hello world"
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"
    assert events[0][1]["message"]["content"] == []


# ---- errors, auth, SSE ------------------------------------------------------------------------------

def test_error_shapes_per_status():
    for status, oa_type, an_type in ((401, "invalid_request_error", "authentication_error"),
                                     (429, "rate_limit_exceeded", "rate_limit_error"),
                                     (500, "server_error", "api_error"),
                                     (413, "invalid_request_error", "request_too_large")):
        e = APIError(status, "m")
        assert openai_body(e)["error"]["type"] == oa_type
        assert anthropic_body(e) == {"type": "error", "error": {"type": an_type, "message": "m"}}
    assert openai_body(APIError(401, "m"))["error"]["code"] == "invalid_api_key"
    assert openai_body(APIError(429, "m"))["error"]["code"] == "rate_limit_exceeded"
    e = from_value_error(ValueError("top_p must be in (0, 1], got 0"))
    assert (e.status, e.param) == (400, "top_p")


def test_auth_header_forms(tmp_path):
    assert presented_key("Bearer k1", None) == "k1"
    assert presented_key("Api-Key k1", None) == "k1"
    assert presented_key(None, "k1") == "k1"
    assert presented_key("Basic abc", None) is None
    f = tmp_path / "keys"
    f.write_text("# comment\nk3\n\n")
    keys = load_keys(["k1"], str(f), {"FLAXSERVE_API_KEYS": "k2, k4"})
    assert sorted(keys) == ["k1", "k2", "k3", "k4"]
    checker = KeyChecker(keys)
    assert checker.allows("k3") and not checker.allows("k5") and not checker.allows(None)
    assert KeyChecker([]).allows(None)
    with pytest.raises(ValueError, match="api-key-file"):
        load_keys([], str(tmp_path / "missing"), {})


def test_sse_framing():
    assert sse.data({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    assert sse.event("ping", {"type": "ping"}) == b'event: ping\ndata: {"type":"ping"}\n\n'
    assert sse.comment() == b": ping\n\n" and sse.DONE == b"data: [DONE]\n\n"


def test_render_chat_kwargs_reach_the_template():
    out = render_chat("{{ greeting }} {{ messages[0]['content'] }}",
                      [{"role": "user", "content": "x"}],
                      ChatOptions(chat_template_kwargs={"greeting": "hi"}))
    assert out == "hi x"


# ---- the engine stream reader (a stand-in for grpc's call object) --------------------------------

class _Call:
    """Yields responses when released; cancel() ends it like a cancelled gRPC call."""

    def __init__(self, items, gate):
        import threading
        self.items, self.gate, self.cancelled = items, gate, threading.Event()

    def __iter__(self):
        for k, item in enumerate(self.items):
            if k == 1:
                while not (self.gate.is_set() or self.cancelled.is_set()):
                    self.gate.wait(0.01)
            if self.cancelled.is_set():
                return
            yield item

    def cancel(self):
        self.cancelled.set()


def test_gen_stream_gaps_and_cancel():
    import threading
    from serving.http.engine_link import GenStream
    gate = threading.Event()
    call = _Call(["a", "b"], gate)
    stream = GenStream(call, lambda r: [r], keepalive_s=0.05)
    it = iter(stream)
    assert next(it) == "a"
    assert next(it) is None          # a gap: the caller writes a keep-alive
    gate.set()
    rest = [x for x in it if x is not None]
    assert rest == ["b"]
    stream.cancel()
    stream.cancel()                  # twice is fine
    assert call.cancelled.is_set()


def test_sse_data_stays_on_one_line_for_any_text():
    """Generated text may hold U+2028, U+2029 or U+0085, which Python's str.splitlines()
    (and naive clients) treat as line ends: they are escaped, and the JSON is unchanged."""
    import json

    text = "a\u2028b\u2029c\x85d\n\r\te \u00e8"
    frame = sse.data({"t": text}).decode()
    assert frame.endswith("\n\n") and len(frame[:-2].splitlines()) == 1
    assert json.loads(frame[len("data: "):-2]) == {"t": text}
    name, body = sse.event("x", {"t": text}).decode()[:-2].splitlines()
    assert name == "event: x" and json.loads(body[len("data: "):]) == {"t": text}
