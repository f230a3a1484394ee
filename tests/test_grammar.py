"""Constrained decoding in process: the guided_* fields' validation, llguidance masks over the
default model's tokenizer (random walks through the allowed tokens always produce matching
text, a finished grammar allows only the stop ids, special tokens in Lark), thinking
budgets forcing a multi-token end sequence, and the packed bitmask applied in the device
engine's step and first-token programs (an unconstrained row is unaffected, nothing
compiles for a mask after warm-up)."""

import json
import re

import jsonschema
import numpy as np
import pytest

from checkpoints.loader import load_model
from checkpoints.tokenizer import load_tokenizer
from sampling.grammar import GrammarCompiler, all_ones, only, strict, words
from sampling.params import SamplingParams
from serving.engine.device import DeviceEngine, compile_count

SCHEMA = {"type": "object", "required": ["name", "age", "color"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "color": {"enum": ["red", "green", "blue"]}}}


@pytest.fixture(scope="module")
def model():
    config, params, model_dir = load_model("default")
    return config, params, load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def compiler(model):
    config, _, tok = model
    return GrammarCompiler(tok, config.vocab_size, tok.stop_ids)


def allowed(row: np.ndarray) -> np.ndarray:
    """Token ids whose bit is set in a packed [words] int32 row."""
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")
    return np.flatnonzero(bits)


def walk(compiler, tok, spec, seed, max_steps=300, end_ids=(), budget=None):
    """Sample uniformly among the allowed tokens until a stop id (taken with probability 1/2
    once the constraint allows one; never while thinking freely): the tokens, stop excluded."""
    params = SamplingParams(**spec, thinking_end_ids=list(end_ids),
                            max_thinking_tokens=budget).validate(compiler.vocab_size)
    c = compiler.constraint(compiler.check(params), params)
    rng = np.random.default_rng(seed)
    stops = set(compiler.stop_ids)
    out = []
    row = all_ones(1, compiler.vocab_size)[0]
    for _ in range(max_steps):
        row[:] = -1
        restricted = c.active
        if restricted:
            c.fill(row)
        ok = allowed(row)
        assert len(ok), "a constrained row allowed nothing"
        ends = [t for t in ok if t in stops] if restricted else []
        rest = [t for t in ok if t not in stops and t < tok.vocab_size]
        if ends and (not rest or rng.random() < 0.5):
            return out
        t = int(rng.choice(rest))
        c.consume(t)
        out.append(t)
    raise AssertionError(f"no stop after {max_steps} tokens: {tok.decode(out)!r}")


# -- SamplingParams ---------------------------------------------------------------------------

def test_params_one_guided_field_at_most():
    with pytest.raises(ValueError) as e:
        SamplingParams(guided_json={"type": "object"}, guided_regex="a").validate()
    assert "guided_json" in str(e.value) and "guided_regex" in str(e.value)


@pytest.mark.parametrize("spec, field", [
    ({"guided_json": "not a dict"}, "guided_json"),
    ({"guided_json_object": "yes"}, "guided_json_object"),
    ({"guided_regex": ""}, "guided_regex"),
    ({"guided_grammar": 3}, "guided_grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": ["a", 2]}, "guided_choice"),
    ({"thinking_end_ids": 6}, "thinking_end_ids"),
    ({"thinking_end_ids": [99999]}, "thinking_end_ids"),
    ({"max_thinking_tokens": 4}, "max_thinking_tokens"),
    ({"thinking_end_ids": [6], "max_thinking_tokens": -1}, "max_thinking_tokens"),
])
def test_params_bad_values_name_the_field(spec, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**spec).validate(4096)


def test_params_travel_as_json():
    p = SamplingParams(guided_json=SCHEMA, thinking_end_ids=[6], max_thinking_tokens=7)
    back = SamplingParams.from_dict(json.loads(json.dumps(p.to_dict())), 4096)
    assert back == p and back.guided == "guided_json"
    assert SamplingParams().guided is None


# -- llguidance over the default tokenizer -------------------------------------------------------

@pytest.mark.parametrize("spec, field", [
    ({"guided_json": {"type": "nonsense"}}, "guided_json"),
    ({"guided_json": {"$ref": "#/nowhere"}}, "guided_json"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
])
def test_bad_specs_are_value_errors_naming_the_field(compiler, spec, field):
    with pytest.raises(ValueError) as e:
        compiler.check(SamplingParams(**spec))
    assert str(e.value).startswith(field + ":")


def test_strict_closes_objects_with_properties():
    s = strict({"type": "object", "properties": {"a": {"type": "object",
                                                        "properties": {"b": {}}}}})
    assert s["additionalProperties"] is False
    assert s["properties"]["a"]["additionalProperties"] is False
    assert strict({"type": "object", "properties": {}, "additionalProperties": True})[
        "additionalProperties"] is True


def test_json_schema_walks_validate(model, compiler):
    _, _, tok = model
    texts = set()
    for seed in range(6):
        text = tok.decode(walk(compiler, tok, {"guided_json": SCHEMA}, seed))
        jsonschema.validate(json.loads(text), SCHEMA)
        assert set(json.loads(text)) == set(SCHEMA["required"])   # strict: no invented keys
        texts.add(text)
    assert len(texts) > 1


def test_regex_choice_and_object_walks_match(model, compiler):
    _, _, tok = model
    for seed in range(4):
        text = tok.decode(walk(compiler, tok, {"guided_regex": r"[a-z]{2,5}-[0-9]{1,3}"}, seed))
        assert re.fullmatch(r"[a-z]{2,5}-[0-9]{1,3}", text), text
        text = tok.decode(walk(compiler, tok, {"guided_choice": ["red", "green", "no thanks"]},
                               seed))
        assert text in ("red", "green", "no thanks")


def test_json_object_accepts_objects_only(model, compiler):
    _, _, tok = model
    params = SamplingParams(guided_json_object=True)
    c = compiler.constraint(compiler.check(params), params)
    row = all_ones(1, compiler.vocab_size)[0]
    c.fill(row)
    firsts = [tok.decode([int(t)]) for t in allowed(row)]
    assert firsts and all(f.startswith("{") for f in firsts)
    for t in tok.encode('{"a":[1,{"b":null}],"c":"d"}', add_special_tokens=False):
        row[:] = -1
        c.fill(row)
        assert t in allowed(row)
        c.consume(t)
    row[:] = -1
    c.fill(row)
    assert sorted(allowed(row)) == sorted(compiler.stop_ids)


def test_finished_grammar_allows_only_stop_ids(model, compiler):
    _, _, tok = model
    params = SamplingParams(guided_choice=["yes"])
    c = compiler.constraint(compiler.check(params), params)
    for t in tok.encode("yes", add_special_tokens=False):
        row = all_ones(1, compiler.vocab_size)[0]
        c.fill(row)
        assert t in allowed(row)
        c.consume(t)
    row = all_ones(1, compiler.vocab_size)[0]
    c.fill(row)
    assert sorted(allowed(row)) == sorted(compiler.stop_ids)


def test_lark_grammar_names_special_tokens(model, compiler):
    _, _, tok = model
    call = tok.token_to_id("<tool_call>")
    params = SamplingParams(guided_grammar='start: <tool_call> "x" <|im_end|>')
    c = compiler.constraint(compiler.check(params), params)
    row = all_ones(1, compiler.vocab_size)[0]
    c.fill(row)
    assert list(allowed(row)) == [call]
    ids = walk(compiler, tok, {"guided_grammar": 'start: <tool_call> "x" </tool_call>'}, 0)
    assert ids[0] == call and ids[-1] == tok.token_to_id("</tool_call>")
    assert tok.decode(ids[1:-1]) == "x"


# -- thinking budgets ---------------------------------------------------------------------

def test_budget_forces_a_multi_token_end_then_the_grammar(model, compiler):
    _, _, tok = model
    end = [tok.token_to_id("</think>"), tok.encode("\n", add_special_tokens=False)[-1]]
    params = SamplingParams(thinking_end_ids=end, max_thinking_tokens=3, guided_regex="[0-9]+")
    c = compiler.constraint(compiler.check(params), params)
    free = [t for t in tok.encode("hello there friend", add_special_tokens=False)][:3]
    assert len(free) == 3 and not set(free) & set(end)
    for t in free:                      # free reasoning, but it may not stop before the grammar
        assert c.active
        row = all_ones(1, compiler.vocab_size)[0]
        c.fill(row)
        assert not set(allowed(row)) & set(compiler.stop_ids)
        assert len(allowed(row)) == compiler.vocab_size - len(compiler.stop_ids)
        c.consume(t)
    for t in end:                       # forced: one allowed token per step
        assert c.active
        row = all_ones(1, compiler.vocab_size)[0]
        c.fill(row)
        assert list(allowed(row)) == [t]
        c.consume(t)
    row = all_ones(1, compiler.vocab_size)[0]
    c.fill(row)
    digits = [int(t) for t in allowed(row)]
    assert digits and all(re.fullmatch("[0-9]+", tok.decode([t])) for t in digits)


def test_end_emitted_early_or_half_way(model, compiler):
    _, _, tok = model
    a, b = tok.token_to_id("</think>"), tok.token_to_id("<tool_call>")
    # the model ends its thinking by itself: no forcing, the grammar applies at once
    params = SamplingParams(thinking_end_ids=[a, b], max_thinking_tokens=5, guided_regex="z")
    c = compiler.constraint(compiler.check(params), params)
    c.consume(a)
    c.consume(b)
    row = all_ones(1, compiler.vocab_size)[0]
    c.fill(row)
    assert "z" in {tok.decode([int(t)]) for t in allowed(row)}
    # it emits the first end token as the budget runs out: only the second is forced
    c = compiler.constraint(None, params)
    for t in [20, 21, 22, 23, a]:
        c.consume(t)
    row = all_ones(1, compiler.vocab_size)[0]
    c.fill(row)
    assert list(allowed(row)) == [b]
    # budget 0: the very first token is forced; without a grammar nothing is masked after
    c = compiler.constraint(None, SamplingParams(thinking_end_ids=[a], max_thinking_tokens=0))
    assert c.active
    c.consume(a)
    assert not c.active


def test_walk_with_budget_produces_end_then_json(model, compiler):
    _, _, tok = model
    end = tok.token_to_id("</think>")
    ids = walk(compiler, tok, {"guided_json": SCHEMA}, 3, end_ids=[end], budget=5)
    assert end in ids[:6]
    jsonschema.validate(json.loads(tok.decode(ids[ids.index(end) + 1:])), SCHEMA)


# -- the packed mask on the device ------------------------------------------------------------

def test_packed_mask_layout():
    v = 70
    assert words(v) == 3
    for t in (0, 31, 32, 63, 64, 69):
        assert list(allowed(only(t, v))) == [t]
    assert list(allowed(all_ones(1, v)[0]))[:v] == list(range(v))


def test_device_mask_in_step_and_first_token(model):
    config, params, tok = model
    eng = DeviceEngine(config, params, max_slots=4, max_len=64, prefill_buckets=(16,),
                       num_top_logprobs=0)
    eng.warmup()
    v = config.vocab_size
    prompt = np.asarray(tok.encode("The sea is", add_special_tokens=False), np.int32)
    hot = SamplingParams(temperature=1.0)

    def start(slots, first_mask=None):
        firsts = []
        for s in slots:
            m = first_mask if s == 0 else None
            firsts.append(int(eng.insert(s, prompt, 0, hot, seed=11 + s, mask=m)
                              .result().tokens[0]))
        return firsts

    # reference: slots 1 and 2 unconstrained, no masks at all
    before = compile_count()
    ref_first = start([1, 2])
    ref = [eng.step().result().tokens[1:3].tolist() for _ in range(4)]
    for s in (1, 2):
        eng.release(s)
    # slot 0 forced token by token beside them
    forced = [int(t) for t in tok.encode(" blue blue blue", add_special_tokens=False)][:5]
    firsts = start([0, 1, 2], first_mask=only(forced[0], v))
    assert firsts[0] == forced[0] and firsts[1:] == ref_first
    subset = np.array([100, 200, 300], np.int64)
    got = []
    for i in range(4):
        mask = all_ones(4, v)
        if i % 2:
            mask[0] = 0
            for t in subset:
                mask[0] |= only(int(t), v)
        else:
            mask[0] = only(forced[1 + i // 2], v)
        if i % 2:         # the scheduler's split: forward, then the sampler with the mask
            out = eng.sample_step(eng.forward_step(), mask).result()
        else:
            out = eng.step(mask).result()
        if i % 2:
            assert int(out.tokens[0]) in subset
        else:
            assert int(out.tokens[0]) == forced[1 + i // 2]
        got.append(out.tokens[1:3].tolist())
    assert got == ref                          # the other rows did not notice
    assert compile_count() == before           # masks reuse the warmed-up programs
