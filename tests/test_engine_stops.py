"""Stop strings: held back while they may still match, cut (or kept) on a match; and the
same through a real gRPC engine with a tiny byte-level tokenizer and a random model."""

import dataclasses

import pytest

from serving.engine.stops import StopStrings


def feed_all(stops, pieces, include=False):
    s = StopStrings(stops, include)
    emitted = [s.feed(p) for p in pieces]
    return emitted, s.flush(), s.matched


def test_stop_straddling_pieces_is_held_then_cut():
    emitted, rest, matched = feed_all(["END"], ["abc E", "N", "D tail"])
    assert emitted == ["abc ", "", ""] and rest == "" and matched == "END"


def test_include_stop_str_in_output():
    emitted, _, matched = feed_all(["END"], ["abc E", "ND", "more"], include=True)
    assert "".join(emitted) == "abc END" and matched == "END"


def test_false_start_is_released():
    emitted, rest, matched = feed_all(["END"], ["x E", "Nx", " y"])
    assert emitted == ["x ", "ENx", " y"] and matched is None and rest == ""


def test_held_text_comes_out_at_flush():
    emitted, rest, matched = feed_all(["stop!"], ["hello st", "o"])
    assert "".join(emitted) + rest == "hello sto" and matched is None


def test_earliest_match_wins_and_nothing_after_it():
    emitted, _, matched = feed_all(["bc", "a"], ["xxabcd"])
    assert emitted == ["xx"] and matched == "a"
    s = StopStrings(["b"])
    s.feed("abc")
    assert s.feed("more b") == "" and s.flush() == ""


def test_no_stops_passes_everything():
    assert feed_all([], ["a", "b"])[0] == ["a", "b"]


# ---- through the engine -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from checkpoints.tokenizer import load_tokenizer
    from model.config import named_config
    from model.decoder import init_params
    from serving.client import EngineClient
    from serving.engine.server import start_in_process
    from tests.tokenizer_fixtures import build_bytelevel_dir

    tok = load_tokenizer(str(build_bytelevel_dir(tmp_path_factory.mktemp("tok"))))
    cfg = dataclasses.replace(named_config("tiny", dtype="float32"), vocab_size=tok.vocab_size)
    srv = start_in_process(cfg, init_params(cfg, seed=2), max_slots=4, max_len=128,
                           prefill_buckets=(16, 32), tokenizer=tok, model_name="tiny-tok",
                           warmup=False)
    client = EngineClient(f"127.0.0.1:{srv.port}")
    yield client, tok
    client.close()
    srv.stop(grace_s=5)


GREEDY = {"temperature": 0.0, "max_tokens": 40, "ignore_eos": True}


def test_text_joins_to_the_decoded_tokens(engine):
    client, tok = engine
    ids = tok.encode("Hello world, the quick brown fox")
    g = client.generate(ids, GREEDY)
    c = g.choices[0]
    assert c.text == tok.decode(ids + c.token_ids)[len(tok.decode(ids)):]
    assert len(c.token_ids) == 40 and c.finish_reason == "length"


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_cuts_the_output(engine, include):
    client, tok = engine
    ids = tok.encode("Numbers 0123 and text")
    full = client.generate(ids, GREEDY).choices[0].text
    assert len(full) > 12
    stop = full[8:11]
    cut_at = full.find(stop)
    g = client.generate(ids, dict(GREEDY, stop=[stop], include_stop_str_in_output=include))
    c = g.choices[0]
    assert c.finish_reason == "stop" and c.stop_sequence == stop
    assert c.text == (full[:cut_at + len(stop)] if include else full[:cut_at])
    assert g.usage.completion_tokens == len(c.token_ids) < 40


def test_stream_never_shows_a_stop_prefix_that_later_matches(engine):
    client, tok = engine
    ids = tok.encode("Hello there")
    full = client.generate(ids, GREEDY).choices[0].text
    stop = full[5:9]
    seen = ""
    for r in client.stream(ids, dict(GREEDY, stop=[stop])):
        if r.HasField("delta"):
            seen += r.delta.text
            assert stop not in seen
    assert seen == full[:full.find(stop)]


def test_text_prompt_and_count_tokens(engine):
    client, tok = engine
    text = "The quick brown fox"
    assert client.count_tokens(prompt_text=text) == len(tok.encode(text, add_special_tokens=False))
    by_text = client.generate(prompt_text=text, sampling=GREEDY)
    by_ids = client.generate(tok.encode(text, add_special_tokens=False), GREEDY)
    assert by_text.choices[0].token_ids == by_ids.choices[0].token_ids


def test_stop_token_ids_and_eos(engine):
    client, tok = engine
    ids = tok.encode("Hello world")
    free = {"temperature": 0.0, "max_tokens": 12, "ignore_eos": True}
    t = client.generate(ids, free).choices[0].token_ids
    k = next(i for i in range(1, len(t)) if t[i] not in t[:i])
    c = client.generate(ids, dict(free, stop_token_ids=[t[k]])).choices[0]
    assert (c.token_ids, c.finish_reason, c.stop_token_id) == (t[:k + 1], "stop", t[k])
    c = client.generate(ids, dict(free, stop_token_ids=[t[k]], min_tokens=12)).choices[0]
    assert len(c.token_ids) == 12 and c.finish_reason == "length"
    # EOS (the tokenizer's stop ids) ends the sample unless ignore_eos
    c = client.generate(ids, dict(free, ignore_eos=False)).choices[0]
    eos = [i for i, x in enumerate(t) if x in tok.stop_ids]
    if eos:
        assert (c.token_ids, c.finish_reason) == (t[:eos[0] + 1], "stop")
        assert c.stop_token_id in tok.stop_ids
    else:
        assert (c.token_ids, c.finish_reason) == (t, "length")
