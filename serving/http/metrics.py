"""Prometheus metrics of the HTTP front end.

gunicorn runs several worker processes, so the metrics use prometheus_client's
multiprocess mode when `PROMETHEUS_MULTIPROC_DIR` is set (`flaxserve http` sets it to a
fresh directory): any worker answering `/metrics` reports the sum over all workers.
Without it (a single process, tests of the app in process) they are per process.
Queue depth, slots in use, the KV cache and the engine's memory are the batch server's,
read from it at scrape time; each worker reports its own resident memory.
"""

from __future__ import annotations

import os

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest)

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

REQUESTS = Counter("flaxserve_http_requests_total", "HTTP requests by route and status",
                   ["route", "status"])
TTFT = Histogram("flaxserve_time_to_first_token_seconds",
                 "time from request arrival to the first generated token", buckets=_LATENCY)
TPOT = Histogram("flaxserve_time_per_output_token_seconds",
                 "mean time between generated tokens after the first, per request",
                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))
PROMPT_TOKENS = Counter("flaxserve_prompt_tokens_total", "prompt tokens processed")
GENERATED_TOKENS = Counter("flaxserve_generation_tokens_total",
                           "tokens generated (rate() of this is tokens/s)")
TOKENS_PER_SECOND = Histogram("flaxserve_request_tokens_per_second",
                              "generated tokens per second of each request",
                              buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000))
QUEUE_DEPTH = Gauge("flaxserve_engine_queue_depth", "requests waiting in the batch server",
                    multiprocess_mode="mostrecent")
SLOTS_IN_USE = Gauge("flaxserve_engine_slots_in_use", "batch server slots generating",
                     multiprocess_mode="mostrecent")
# the paged KV cache (docs/kv-cache.md): engine stat -> gauge flaxserve_engine_<stat>
KV_STATS = {
    "kv_blocks_total": "KV blocks in the paged pool",
    "kv_blocks_in_use": "KV blocks held by running sequences",
    "kv_blocks_cached": "KV blocks named in the prefix cache",
    "kv_block_size": "tokens per KV block",
    "kv_block_usage": "fraction of KV blocks held by running sequences",
    "prefix_cache_queried_tokens": "prompt tokens looked up in the prefix cache",
    "prefix_cache_hit_tokens": "prompt tokens found in the prefix cache",
    "prefix_cache_hit_rate": "prefix cache hits / prompt tokens looked up",
    "kv_block_evictions": "cached KV blocks evicted to make room",
    "kv_preemptions": "sequences preempted because the KV pool was full",
}
KV_GAUGES = {k: Gauge(f"flaxserve_engine_{k}", doc, multiprocess_mode="mostrecent")
             for k, doc in KV_STATS.items()}
# memory (docs/cli.md, start-up): the engine's, from its Stats call (summed over several
# engines), and each front-end worker's own resident set (as of its last request or scrape)
MEMORY_STATS = {
    "rss_bytes": "resident memory of the engine process",
    "weights_bytes": "bytes of the model's weights on the device",
    "kv_cache_bytes": "bytes of the KV cache on the device",
}
MEMORY_GAUGES = {k: Gauge(f"flaxserve_engine_{k}", doc, multiprocess_mode="mostrecent")
                 for k, doc in MEMORY_STATS.items()}
# speculative decoding (serving/engine/spec_jobs.py; docs/speed.md), totals since start
SPEC_STATS = {
    "spec_requests": "requests that ran speculative decoding",
    "spec_draft_tokens": "draft tokens verified by speculative decoding",
    "spec_accepted_tokens": "draft tokens accepted by speculative decoding",
    "spec_acceptance_rate": "accepted / verified draft tokens",
    "spec_fallbacks": "speculative requests that ran batched (engine busy or job cap)",
    "spec_running": "speculative jobs running",
}
SPEC_GAUGES = {k: Gauge(f"flaxserve_engine_{k}", doc, multiprocess_mode="mostrecent")
               for k, doc in SPEC_STATS.items()}
WORKER_RSS = Gauge("flaxserve_http_worker_rss_bytes",
                   "resident memory of each front-end worker process (label: its pid)",
                   ["worker"], multiprocess_mode="livesum")
# several engines (--engine repeated, serving/http/router.py): each one's state
ENGINE_UP = Gauge("flaxserve_engine_up", "1 while the engine passes its health checks",
                  ["engine"], multiprocess_mode="mostrecent")
ENGINE_INFLIGHT = Gauge("flaxserve_engine_inflight", "requests open on the engine",
                        ["engine"], multiprocess_mode="livesum")
ENGINE_ROUTED = Counter("flaxserve_engine_routed_total",
                        "requests routed to the engine, by reason (prefix | load)",
                        ["engine", "reason"])


def observe_worker_memory() -> None:
    from serving.process import rss_mib
    WORKER_RSS.labels(str(os.getpid())).set(rss_mib() * 2 ** 20)


def observe_generation(start: float, first_token: float | None, end: float,
                       prompt_tokens: int, completion_tokens: int) -> None:
    observe_worker_memory()
    PROMPT_TOKENS.inc(prompt_tokens)
    GENERATED_TOKENS.inc(completion_tokens)
    if first_token is not None:
        TTFT.observe(first_token - start)
        if completion_tokens > 1 and end > first_token:
            TPOT.observe((end - first_token) / (completion_tokens - 1))
    if completion_tokens and end > start:
        TOKENS_PER_SECOND.observe(completion_tokens / (end - start))


def render(engine_stats: dict | None = None) -> tuple[bytes, str]:
    """The exposition text (and its content type), all workers merged when multiprocess."""
    if engine_stats:
        if "queue_depth" in engine_stats:
            QUEUE_DEPTH.set(engine_stats["queue_depth"])
        if "slots_in_use" in engine_stats:
            SLOTS_IN_USE.set(engine_stats["slots_in_use"])
        for key, gauge in (*KV_GAUGES.items(), *MEMORY_GAUGES.items(), *SPEC_GAUGES.items()):
            if key in engine_stats:
                gauge.set(engine_stats[key])
        for e in engine_stats.get("engines", ()):
            ENGINE_UP.labels(e["engine"]).set(e["up"])
            ENGINE_INFLIGHT.labels(e["engine"]).set(e["inflight"])
    observe_worker_memory()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


def mark_dead(pid: int) -> None:
    """gunicorn's child_exit hook: drop a dead worker's live gauges."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(pid)
