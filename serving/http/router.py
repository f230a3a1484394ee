"""Several engines behind one front end: which engine gets each request.

`flaxserve http --engine A --engine B ...` builds an `EngineSet`, which the app uses exactly
like one `EngineLink`. The rule, in pure functions below:

1. Only engines that passed their last health check (grpc.health.v1) are candidates.
2. Prefix affinity: the worker remembers, per engine, hashes of the prompts' block-aligned
   prefixes it routed there (an LRU). The engine holding the longest such prefix, when it
   holds more of it than every other engine, is not overloaded, and its load is within
   SLACK of the least loaded one's, gets the request: its prefix cache already has that
   conversation's KV. A system prompt every engine has seen is no reason to prefer one.
3. Otherwise the least loaded: (running + waiting) / slots, from the engine's own Stats,
   with this worker's requests opened since the last poll counted at once (a burst of 32
   must not all go to the engine that looked idle 0.25 s ago). Ties go by a rendezvous hash
   of the prompt's first block, so idle engines split conversations consistently.

A background thread per worker checks every engine's health and stats every 0.25 s. A
failed check takes the engine out; a passed one puts it back. A request whose engine turns
out to be unreachable before it started is sent to another one; one already running on an
engine that dies ends with the engine's 503 / error event (nothing is replayed).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from serving.http.errors import APIError

CHUNK = 16                 # tokens per prefix hash (the paged KV block size by default)
MAX_CHUNKS = 256           # prefixes hashed per prompt (the first 4096 tokens)
TABLE_SIZE = 65536         # prefix hashes remembered per engine
KV_HIGH = 0.90             # KV block usage at which an engine counts as overloaded
SLACK = 0.25               # affinity while the holder's load is within this of the lowest
CHECK_INTERVAL_S = 0.25
UNAVAILABLE = "the engine is unavailable"   # engine_link.map_rpc_error's UNAVAILABLE text


# ---- pure policy ---------------------------------------------------------------------------------

@dataclass
class EngineState:
    address: str
    up: bool = False
    inflight: int = 0          # this worker's open requests on it
    polled_inflight: int = 0   # `inflight` when its stats were read
    queue_depth: int = 0
    slots_in_use: int = 0
    max_slots: int = 1
    kv_block_usage: float = 0.0
    routed: int = 0            # requests this worker sent to it
    failures: int = 0          # failed health checks in a row


def prefix_hashes(ids, chunk: int = CHUNK, max_chunks: int = MAX_CHUNKS) -> list[bytes]:
    """Digest of ids[:chunk], ids[:2*chunk], ...: whole blocks only, as a KV cache holds."""
    h = hashlib.blake2b(digest_size=16)
    out = []
    for k in range(min(len(ids) // chunk, max_chunks)):
        h.update(b",".join(str(t).encode() for t in ids[k * chunk:(k + 1) * chunk]) + b";")
        out.append(h.copy().digest())
    return out


class PrefixTable:
    """The prefixes routed to one engine, most recent last (an LRU of digests)."""

    def __init__(self, size: int = TABLE_SIZE):
        self.size = size
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def record(self, hashes: list[bytes]) -> None:
        for h in hashes:
            self._seen[h] = None
            self._seen.move_to_end(h)
        while len(self._seen) > self.size:
            self._seen.popitem(last=False)

    def match(self, hashes: list[bytes]) -> int:
        """How many leading blocks of the prompt this engine was sent before."""
        n = 0
        for h in hashes:
            if h not in self._seen:
                break
            n += 1
        return n


def load(s: EngineState) -> float:
    """Running + waiting per slot; this worker's requests since the last poll count now."""
    running = s.slots_in_use + max(0, s.inflight - s.polled_inflight)
    return max(running + s.queue_depth, s.inflight) / max(1, s.max_slots)


def overloaded(s: EngineState) -> bool:
    return s.queue_depth > 0 or load(s) >= 1.0 or s.kv_block_usage >= KV_HIGH


def rendezvous(key: bytes, address: str) -> bytes:
    return hashlib.blake2b(key + b"@" + address.encode(), digest_size=8).digest()


def choose(states: list[EngineState], matches: list[int], key: bytes,
           exclude: frozenset = frozenset()) -> tuple[int | None, str]:
    """(index of the engine for this request, why: "prefix" | "load"), (None, "down") when
    no engine is up. `matches[i]`: blocks of the prompt engine i holds (PrefixTable.match)."""
    up = [i for i, s in enumerate(states) if s.up and i not in exclude]
    if not up:
        return None, "down"
    best = max(matches[i] for i in up)
    holders = [i for i in up if matches[i] == best]
    lowest = min(load(states[i]) for i in up)
    if best > 0 and len(holders) < len(up):
        ready = [i for i in holders if not overloaded(states[i])
                 and load(states[i]) <= lowest + SLACK]
        if ready:
            return min(ready, key=lambda i: load(states[i])), "prefix"
    tied = [i for i in up if load(states[i]) == lowest]
    return max(tied, key=lambda i: rendezvous(key, states[i].address)), "load"


# ---- the engine set ------------------------------------------------------------------------------

class _Routed:
    """A `GenStream` that gives its engine's place back when it ends or is cancelled."""

    def __init__(self, stream, done, lost):
        self._stream = stream
        self._done = done
        self._lost = lost        # called when the engine became unreachable mid-stream
        self._ended = False

    def __iter__(self):
        try:
            yield from self._stream
        except APIError as e:
            if e.status == 503 and e.message.startswith(UNAVAILABLE):
                self._lost()
            raise
        finally:
            self._end()

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._done()

    def cancel(self) -> None:
        self._stream.cancel()
        self._end()

    def abort(self, err) -> None:
        self._stream.abort(err)
        self._end()


class EngineSet:
    """Several `EngineLink`s behind the interface of one: the app cannot tell them apart."""

    def __init__(self, addresses: list[str], interval_s: float = CHECK_INTERVAL_S):
        from serving.http.engine_link import EngineLink
        if len(set(addresses)) != len(addresses):
            raise ValueError(f"--engine: an address is given twice: {addresses}")
        self.addresses = list(addresses)
        self.links = [EngineLink(a) for a in addresses]
        self.states = [EngineState(a) for a in addresses]
        self.tables = [PrefixTable() for _ in addresses]
        self._lock = threading.Lock()
        self._interval_s = interval_s
        self._closed = False
        self._token_bytes = None
        self._start_lock = threading.Lock()
        self._ready = threading.Event()     # the first check of every engine is done

    # -- health and stats: one thread per worker, started on first use (after the fork)

    def _ensure_checker(self) -> None:
        if self._ready.is_set():
            return
        with self._start_lock:          # the first requests wait for the first check
            if not self._ready.is_set():
                self.check_all()
                threading.Thread(target=self._watch, daemon=True,
                                 name="flaxserve-engine-check").start()
                self._ready.set()

    def check_all(self) -> None:
        for i in range(len(self.links)):
            self._check(i)

    def _check(self, i: int) -> None:
        link, s = self.links[i], self.states[i]
        if self._closed:
            return
        try:
            ok = link.healthy(timeout_s=1.0)
        except Exception:   # noqa: BLE001 - e.g. the channel closed under us: down
            ok = False
        stats = None
        if ok:
            try:
                stats = link.stats()
            except Exception:   # noqa: BLE001 - a failed stats read is a failed check
                ok = False
        with self._lock:
            s.up = ok
            s.failures = 0 if ok else s.failures + 1
            if stats is not None:
                s.queue_depth = stats.get("queue_depth", 0)
                s.slots_in_use = stats.get("slots_in_use", 0)
                s.max_slots = stats.get("max_slots", 0) or s.max_slots
                s.kv_block_usage = stats.get("kv_block_usage", 0.0)
                s.polled_inflight = s.inflight

    def _watch(self) -> None:
        from concurrent.futures import ThreadPoolExecutor
        # engines are checked side by side: a hung one must not delay the others' checks
        with ThreadPoolExecutor(max_workers=len(self.links),
                                thread_name_prefix="engine-check") as pool:
            while not self._closed:
                time.sleep(self._interval_s)
                list(pool.map(self._check, range(len(self.links))))

    def _mark_down(self, i: int) -> None:
        with self._lock:
            self.states[i].up = False

    # -- the EngineLink interface

    @property
    def token_bytes(self):
        return self._token_bytes

    @token_bytes.setter
    def token_bytes(self, fn) -> None:
        self._token_bytes = fn
        for link in self.links:
            link.token_bytes = fn

    def close(self) -> None:
        self._closed = True
        for link in self.links:
            link.close()

    def healthy(self, timeout_s: float = 2.0) -> bool:
        return any(link.healthy(timeout_s) for link in self.links)

    def healthy_cached(self) -> bool:
        """Up while any engine is (the health thread's last answers)."""
        self._ensure_checker()
        return any(s.up for s in self.states)

    def model_info(self):
        self._ensure_checker()
        order = sorted(range(len(self.links)), key=lambda i: not self.states[i].up)
        err = None
        for i in order:
            try:
                return self.links[i].model_info()
            except APIError as e:
                err = e
        raise err

    def engine_stats(self) -> list[dict]:
        """Each engine's state for /metrics: address, up, in-flight, routed."""
        self._ensure_checker()
        with self._lock:
            return [{"engine": s.address, "up": int(s.up), "inflight": s.inflight,
                     "routed": s.routed, "queue_depth": s.queue_depth,
                     "slots_in_use": s.slots_in_use} for s in self.states]

    def stats(self) -> dict:
        """The engines' stats summed (the single-engine gauges), and each one's state."""
        total: dict = {}
        for i, link in enumerate(self.links):
            if not self.states[i].up:
                continue
            try:
                one = link.stats()
            except Exception:   # noqa: BLE001 - a down engine just adds nothing
                continue
            for k, v in one.items():
                if k not in ("kv_block_usage", "prefix_cache_hit_rate", "spec_acceptance_rate"):
                    total[k] = total.get(k, 0) + v
        if total.get("kv_blocks_total"):
            total["kv_block_usage"] = total["kv_blocks_in_use"] / total["kv_blocks_total"]
        if total.get("prefix_cache_queried_tokens"):
            total["prefix_cache_hit_rate"] = (total["prefix_cache_hit_tokens"]
                                              / total["prefix_cache_queried_tokens"])
        if total.get("spec_draft_tokens"):
            total["spec_acceptance_rate"] = (total["spec_accepted_tokens"]
                                             / total["spec_draft_tokens"])
        total["engines"] = self.engine_stats()
        return total

    def route(self, prompt_ids, exclude: frozenset = frozenset()) -> tuple[int | None, str]:
        """Pick an engine and count the request on it (the caller must `_release` it)."""
        hashes = prefix_hashes(prompt_ids)
        key = hashes[0] if hashes else repr(list(prompt_ids)).encode()
        with self._lock:
            i, why = choose(self.states, [t.match(hashes) for t in self.tables], key, exclude)
            if i is not None:
                self.states[i].inflight += 1
                self.states[i].routed += 1
                self.tables[i].record(hashes)
        if i is not None:
            from serving.http import metrics
            metrics.ENGINE_ROUTED.labels(self.addresses[i], why).inc()
        return i, why

    def _release(self, i: int) -> None:
        with self._lock:
            self.states[i].inflight -= 1

    def generate(self, request, keepalive_s: float | None = None):
        self._ensure_checker()
        tried: set[int] = set()
        while True:
            i, _ = self.route(request.prompt_ids, frozenset(tried))
            if i is None:
                raise APIError(503, "no engine is available (every --engine failed its "
                                    "health check)", retry_after=1.0)
            try:
                stream = self.links[i].generate(request, keepalive_s=keepalive_s)
            except APIError as e:
                self._release(i)
                if e.status == 503 and e.message.startswith(UNAVAILABLE):
                    self._mark_down(i)       # nothing ran there: another engine may take it
                    tried.add(i)
                    continue
                raise
            except BaseException:
                self._release(i)
                raise
            return _Routed(stream, lambda i=i: self._release(i),
                           lambda i=i: self._mark_down(i))
