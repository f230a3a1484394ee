"""Constrained decoding and thinking budgets through a real gRPC server on the default
model: outputs parse and validate, bad specs are INVALID_ARGUMENT naming the field, an
unconstrained row's output does not change when a constrained row shares its batch, and
nothing compiles after warm-up."""

import json
import re
import threading

import grpc
import jsonschema
import pytest

from checkpoints.loader import load_model
from checkpoints.tokenizer import load_tokenizer
from serving.client import EngineClient
from serving.engine.device import compile_count
from serving.engine.server import start_in_process

SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["name", "age", "color"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "color": {"enum": ["red", "green", "blue"]}}}


@pytest.fixture(scope="module")
def setup():
    config, params, model_dir = load_model("default")
    tok = load_tokenizer(model_dir)
    srv = start_in_process(config, params, max_slots=4, max_len=256,
                           prefill_buckets=(16, 32, 64), tokenizer=tok, model_name="default",
                           model_dir=model_dir)
    client = EngineClient(f"127.0.0.1:{srv.port}")
    yield client, tok
    client.close()
    srv.stop(grace_s=5)


def chat(tok, text):
    return tok.encode(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n",
                      add_special_tokens=False)


def test_json_schema_validates_on_20_seeds(setup):
    client, tok = setup
    ids = chat(tok, "Describe a person as JSON.")
    results = [None] * 20

    def go(i):
        results[i] = client.generate(ids, {"temperature": 1.0, "seed": i, "max_tokens": 120,
                                           "guided_json": SCHEMA})
    threads = [threading.Thread(target=go, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    texts = set()
    for g in results:
        c = g.choices[0]
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), SCHEMA)
        texts.add(c.text)
    assert len(texts) > 1          # sampled, not forced to one answer


def test_regex_choice_and_json_object(setup):
    client, tok = setup
    ids = chat(tok, "Pick one.")
    g = client.generate(ids, {"temperature": 1.0, "seed": 1, "max_tokens": 40,
                              "guided_regex": r"[a-z]{3,6}-[0-9]{2}"})
    assert re.fullmatch(r"[a-z]{3,6}-[0-9]{2}", g.choices[0].text)
    for seed in range(4):
        g = client.generate(ids, {"temperature": 1.0, "seed": seed, "max_tokens": 20,
                                  "guided_choice": ["yes", "no", "maybe later"]})
        assert g.choices[0].text in ("yes", "no", "maybe later")
        assert g.choices[0].finish_reason == "stop"
    g = client.generate(ids, {"temperature": 0.7, "seed": 2, "max_tokens": 200,
                              "guided_json_object": True})
    if g.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(g.choices[0].text), dict)
    else:
        assert g.choices[0].text.startswith("{")


@pytest.mark.parametrize("extra", [{"ignore_eos": True}, {"min_tokens": 15}])
def test_a_finished_grammar_ends_the_sample(setup, extra):
    # ignore_eos would emit the forced stop id until max_tokens, min_tokens would mask the
    # only allowed token: the end of the grammar ends the sample instead
    client, tok = setup
    ids = chat(tok, "Pick one.")
    for seed in range(3):
        g = client.generate(ids, {"temperature": 1.0, "seed": seed, "max_tokens": 30,
                                  "guided_choice": ["yes", "no", "maybe later"], **extra})
        c = g.choices[0]
        assert (c.text, c.finish_reason) in [(t, "stop") for t in ("yes", "no", "maybe later")]
        assert tok.decode(list(c.token_ids)) == c.text      # no stop id after the choice


@pytest.mark.parametrize("sampling, field", [
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_grammar": "start: nothing_defined"}, "guided_grammar"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"max_thinking_tokens": 3}, "max_thinking_tokens"),
])
def test_bad_specs_are_invalid_argument(setup, sampling, field):
    client, tok = setup
    with pytest.raises(grpc.RpcError) as e:
        client.generate([3, 4, 5], {"max_tokens": 4, **sampling})
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details()


def test_unconstrained_rows_unchanged_beside_a_constrained_one(setup):
    client, tok = setup
    plain = [(chat(tok, f"Tell me about {w}."), {"temperature": 0.9, "seed": 7 + i,
                                                  "max_tokens": 16})
             for i, w in enumerate(["the sea", "music", "cats"])]
    alone = [client.generate(ids, s).choices[0].token_ids for ids, s in plain]
    results = [None] * 4

    def go(i, ids, s):
        results[i] = client.generate(ids, s)
    jobs = plain + [(chat(tok, "JSON please."), {"temperature": 1.0, "seed": 3,
                                                   "max_tokens": 60, "guided_json": SCHEMA})]
    threads = [threading.Thread(target=go, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.choices[0].token_ids for r in results[:3]] == alone
    jsonschema.validate(json.loads(results[3].choices[0].text), SCHEMA)


def test_thinking_budget_forces_the_end_then_the_constraint(setup):
    client, tok = setup
    end = tok.token_to_id("</think>")
    ids = chat(tok, "Think, then answer.") + [tok.token_to_id("<think>")]
    g = client.generate(ids, {"temperature": 1.0, "seed": 5, "max_tokens": 80,
                              "thinking_end_ids": [end], "max_thinking_tokens": 5,
                              "guided_json": SCHEMA}, skip_special_tokens=False)
    toks = g.choices[0].token_ids
    assert end in toks[:6]
    answer = tok.decode(toks[toks.index(end) + 1:], skip_special_tokens=True)
    jsonschema.validate(json.loads(answer), SCHEMA)


def test_no_compilation_after_warmup(setup):
    client, tok = setup
    client.generate([3, 4, 5], {"max_tokens": 2, "guided_choice": ["a", "b"]})
    before = compile_count()
    for n, spec in enumerate([{"guided_regex": "[0-9]+"}, {"guided_json": SCHEMA},
                              {"guided_choice": ["x", "y"]}]):
        client.generate(chat(tok, "go" * (n + 1)), {"max_tokens": 8, "seed": n, **spec})
    assert compile_count() == before
