"""Deltas that queue up behind a slow reader travel as one message / one chunk.

Engine side (serving/engine/server.py `coalesce`): deltas already queued when the gRPC
stream is ready to send are merged into one `Delta` unless they carry logprobs, metrics
or end their sample. Front-end side (serving/http/engine_link.py `GenStream`): events
queued behind a delta are joined to it, each token keeping its own text and logprobs.
Either way nothing is lost, reordered or invented. Pure and fast: no server.
"""

from __future__ import annotations

import threading

from serving.engine import requests as rq
from serving.engine.server import coalesce
from serving.http.engine_link import GenStream, join
from serving.http.generation import Delta, Final, TokenInfo, Usage, accumulate


def _drain_handle(handle):
    while True:
        event = handle.get(timeout=1.0)
        yield event
        if isinstance(event, (rq.Usage, rq.Failure)):
            return


def test_engine_side_merges_only_what_is_queued_and_mergeable():
    handle = rq.Handle(None)
    lp = rq.TokenLogprob(7, -0.5, 1, [], [])
    events = [rq.Delta(0, [1], "a"), rq.Delta(0, [2], "b"), rq.Delta(0, [3], ""),
              rq.Delta(0, [7], "c", [lp]),                       # logprobs: alone
              rq.Delta(1, [4], "x"),                             # another sample
              rq.Delta(1, [5], "y"),
              rq.Delta(1, [6], "z", finish_reason="length"),     # a sample's end: alone
              rq.Usage(1, 7, 0, 0.0, 0.0, 0.0, 0)]
    for e in events:
        handle.put(e)
    out = list(coalesce(_drain_handle(handle), handle))
    deltas = [e for e in out if isinstance(e, rq.Delta)]
    assert [(d.index, d.token_ids, d.text) for d in deltas] == [
        (0, [1, 2, 3], "ab"), (0, [7], "c"), (1, [4, 5], "xy"), (1, [6], "z")]
    assert deltas[1].logprobs == [lp] and deltas[3].finish_reason == "length"
    assert isinstance(out[-1], rq.Usage) and len(out) == 5


def test_engine_side_passes_single_events_through_unchanged():
    """A reader that keeps up gets one message per delta (nothing waits to be merged)."""
    handle = rq.Handle(None)
    first = rq.Delta(0, [1], "a")

    def events():
        yield first
        handle.put(rq.Usage(1, 1, 0, 0.0, 0.0, 0.0, 0))
        yield from _drain_handle(handle)

    out = list(coalesce(events(), handle))
    assert out[0] is first and isinstance(out[1], rq.Usage) and len(out) == 2


class _Call:
    def __init__(self, items):
        self.items = items
        self.cancelled = threading.Event()

    def __iter__(self):
        yield from self.items

    def cancel(self):
        self.cancelled.set()


def _tok(i, text):
    return TokenInfo(i, text, -0.1 * i, list(text.encode()))


def test_front_end_joins_queued_deltas_keeping_each_token():
    items = [Delta(0, "He", [_tok(1, "He")]), Delta(0, "", [_tok(2, "")]),
             Delta(0, "llo", [_tok(3, "llo")]), Delta(0, "!", [_tok(4, "!")], "stop"),
             Final(Usage(3, 4))]
    stream = GenStream(_Call(items), lambda r: [r], keepalive_s=5.0)
    stream._thread.join(timeout=5)          # everything is queued before we read
    out = list(stream)
    assert [type(e) for e in out] == [Delta, Delta, Final]
    assert out[0].text == "Hello" and [t.id for t in out[0].tokens] == [1, 2, 3]
    assert [t.text for t in out[0].tokens] == ["He", "", "llo"]
    assert out[1].finish_reason == "stop" and out[1].text == "!"
    (choice,), final = accumulate(iter(items), 1)
    (joined,), _ = accumulate(iter(out), 1)
    assert joined.text == choice.text == "Hello!" and joined.tokens == choice.tokens


def test_join_refuses_what_must_stay_apart():
    a = Delta(0, "a", [_tok(1, "a")])
    assert join(a, Delta(1, "b", [_tok(2, "b")])) is None
    assert join(a, Delta(0, "b", [_tok(2, "b")], "length")) is None
    assert join(a, Delta(0, "b", [_tok(2, "b")], metrics={"length": 1})) is None
    assert join(Delta(0, "a", [], "stop"), a) is None
