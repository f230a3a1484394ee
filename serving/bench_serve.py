"""`flaxserve bench serve`: a load generator against the batch server (gRPC) or the HTTP API.

Like vLLM's `benchmark_serving` and JetStream's `benchmark_serving.py`: fixed-length random
token prompts, a fixed number of output tokens (EOS ignored), arrivals either at a fixed
concurrency (each of C clients sends its next request when the last one ends) or Poisson
at a given rate. Each request is streamed and every token's arrival time recorded, which
gives time to first token (TTFT), time per output token after the first
(TPOT = (latency - TTFT) / (tokens - 1)) and inter-token latency (ITL, the gaps between
arrivals). Several concurrencies run against the same server in one run, so their ratio is
measured under the same machine load.

With neither `--grpc` nor `--http`, an engine is started in this process on `--model` or
`--config` (random weights) and driven over a loopback gRPC port; `--kv-layout dense,paged`
starts one engine per layout in turn and runs the same loads on each (docs/kv-cache.md).
`--shared-prefix N` runs every load twice, with unique prompts of N + prompt-len tokens and
with prompts that share their first N tokens (a system prompt), to show the prefix cache.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from serving.flags import counts_per_level, int_list, positive_int


def add_arguments(parser) -> None:
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--grpc", metavar="HOST:PORT", help="a running `flaxserve engine`")
    target.add_argument("--http", metavar="URL",
                        help="a running HTTP front end, e.g. http://127.0.0.1:8000")
    target.add_argument("--model", help="start an engine here on this model (PATH or 'default')")
    target.add_argument("--config", help="start an engine here on a named config with random "
                                         "weights, e.g. qwen3-100m")
    parser.add_argument("--api-key", default=None, help="for --http")
    parser.add_argument("--no-stream", action="store_true",
                        help="for --http: plain JSON responses (TTFT is then the latency)")
    parser.add_argument("--served-model", default=None,
                        help="model name for --http requests (default: the first listed)")
    parser.add_argument("--concurrency", default="1,32",
                        help="comma-separated fixed concurrencies, run one after the other")
    parser.add_argument("--rate", type=float, default=None,
                        help="Poisson arrivals at this many requests/s instead of fixed "
                             "concurrency (unbounded in-flight requests)")
    parser.add_argument("--num-requests", default=None,
                        help="requests per run (comma-separated, one per concurrency; "
                             "default 2 x concurrency, at least 8)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="prompts and sampling seeds")
    parser.add_argument("--sampling", default=None, metavar="JSON",
                        help="more sampling parameters for every request, a JSON object, e.g. "
                             "'{\"repetition_penalty\": 1.1}' (over --temperature)")
    parser.add_argument("--max-slots", type=int, default=None,
                        help="in-process engine: slots (default: the largest concurrency)")
    parser.add_argument("--dtype", default=None, help="in-process engine: float32 | bfloat16")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="in-process engine: context length (default: prompt + output + 1)")
    parser.add_argument("--kv-layout", default="paged",
                        help="in-process engine: paged, dense, or both in turn: dense,paged "
                             "(default paged)")
    parser.add_argument("--block-size", type=int, default=16, help="paged: tokens per block")
    parser.add_argument("--prefill-batch", type=int, default=16, metavar="N",
                        help="in-process engine: fresh prompts prefilled in one program "
                             "(1: one at a time, the unbatched path)")
    parser.add_argument("--decode-steps", type=positive_int, default=1, metavar="K",
                        help="in-process engine: decode steps per dispatch while no request "
                             "waits (multi-step decode)")
    from serving.flags import add_cpu_matmul_argument, add_quantize_argument
    add_cpu_matmul_argument(parser, default="auto")
    add_quantize_argument(parser)       # the in-process engine's weights
    parser.add_argument("--prefill-budget", type=positive_int, default=None, metavar="TOKENS",
                        help="in-process engine: prompt tokens prefilled per scheduler "
                             "iteration, as on `engine` and `serve` (default: theirs)")
    parser.add_argument("--kv-cache-memory", default=None, metavar="SIZE",
                        help="paged: pool size, e.g. 1GiB (default: what dense would take)")
    parser.add_argument("--paged-attention", choices=("auto", "gather", "pallas"), default=None,
                        help="paged: decode attention (docs/kv-cache.md; default auto)")
    parser.add_argument("--shared-prefix", type=int, default=0, metavar="N",
                        help="also run with prompts sharing their first N tokens (and the "
                             "same load with unique prompts of the same length)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


# -- one request, as a client sees it ---------------------------------------------------------

@dataclass
class Trace:
    """Arrival times of one request's tokens (seconds since it was sent)."""
    start: float
    token_times: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None
    cached_tokens: int | None = None      # gRPC: prompt tokens from the prefix cache
    engine_ttft: float | None = None      # gRPC: the engine's own arrival -> first token (s)
    queue_time: float | None = None       # gRPC: the engine's arrival -> admission (s)

    def add(self, count: int) -> None:
        now = time.perf_counter() - self.start
        self.token_times.extend([now] * count)
        self.tokens += count


class GrpcTarget:
    def __init__(self, address: str):
        from serving.client import EngineClient
        self.client = EngineClient(address)
        (card,) = self.client.list_models()[:1]
        self.vocab_size = card.vocab_size
        self.max_slots = card.max_slots

    def send(self, prompt: list[int], sampling: dict, trace: Trace) -> None:
        for r in self.client.stream(prompt, sampling, timeout=3600):
            if r.HasField("delta") and r.delta.token_ids:
                trace.add(len(r.delta.token_ids))
            if r.HasField("usage"):
                trace.cached_tokens = r.usage.cached_tokens
                trace.engine_ttft, trace.queue_time = r.usage.ttft, r.usage.queue_time

    def close(self) -> None:
        self.client.close()


class HttpTarget:
    """Streams `/v1/completions` with token-id prompts (no tokenizer in the loop)."""

    def __init__(self, url: str, api_key: str | None, model: str | None, stream: bool = True):
        import requests
        self.url = url.rstrip("/")
        self.stream = stream
        self.session = requests.Session
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        models = requests.get(self.url + "/v1/models", headers=self.headers, timeout=30)
        if models.status_code != 200:
            raise ValueError(f"--http: GET /v1/models answered {models.status_code}: "
                             f"{models.text[:200]}")
        data = models.json()["data"]
        self.model = model or data[0]["id"]
        self.vocab_size = data[0].get("vocab_size")
        self.max_slots = None
        self._local = threading.local()

    def send(self, prompt: list[int], sampling: dict, trace: Trace) -> None:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = self.session()
        # the token ids in each chunk count its tokens: a chunk carries every token that
        # was ready when the front end wrote it (several when it fell behind)
        body = {"model": self.model, "prompt": prompt, "stream": self.stream,
                **({"return_token_ids": True} if self.stream else {}), **sampling}
        with session.post(self.url + "/v1/completions", json=body, headers=self.headers,
                          stream=self.stream, timeout=3600) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            if not self.stream:
                trace.add(r.json()["usage"]["completion_tokens"])
                return
            for line in r.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                for choice in json.loads(line[6:]).get("choices", []):
                    count = len(choice.get("token_ids") or ())
                    if count or choice.get("text"):
                        trace.add(count or 1)

    def close(self) -> None:
        pass


# -- a run --------------------------------------------------------------------------------------

def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    a = np.asarray(values, np.float64) * 1000.0
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p99": float(np.percentile(a, 99))}


def run_clients(count: int, concurrency: int, one) -> float:
    """Fixed concurrency: `concurrency` clients call one(i) for i in range(count), each
    taking the next i when its last call ends; the wall seconds. one() must not raise."""
    cursor, lock = iter(range(count)), threading.Lock()

    def client():
        while True:
            with lock:
                i = next(cursor, None)
            if i is None:
                return
            one(i)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def run_load(target, prompts: list[list[int]], sampling: dict, *, concurrency: int | None,
             rate: float | None, seed: int) -> dict:
    """Send every prompt (fixed concurrency or Poisson arrivals); figures of the run."""
    traces: list[Trace | None] = [None] * len(prompts)

    def one(i: int) -> None:
        trace = Trace(start=time.perf_counter())
        traces[i] = trace
        try:
            target.send(prompts[i], {**sampling, "seed": seed + i}, trace)
        except Exception as e:  # counted and reported, never silently dropped
            trace.error = f"{type(e).__name__}: {e}"

    if rate is None:
        wall = run_clients(len(prompts), concurrency, one)
    else:
        t0 = time.perf_counter()
        rng = np.random.default_rng(seed)
        threads = []
        for i in range(len(prompts)):
            t = threading.Thread(target=one, args=(i,))
            t.start()
            threads.append(t)
            time.sleep(rng.exponential(1.0 / rate))
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0

    done = [t for t in traces if t is not None and t.error is None and t.tokens > 0]
    errors = [t.error for t in traces if t is not None and t.error is not None]
    ttft = [t.token_times[0] for t in done]
    tpot = [(t.token_times[-1] - t.token_times[0]) / (t.tokens - 1) for t in done if t.tokens > 1]
    itl = [b - a for t in done for a, b in zip(t.token_times, t.token_times[1:]) if b > a]
    tokens = sum(t.tokens for t in done)
    cached = [t.cached_tokens for t in done if t.cached_tokens is not None]
    # gRPC: the engine's share of TTFT (queue, admission, prefill, first draw); the rest
    # of the client's TTFT is the way back (detokenize thread, gRPC)
    engine_ttft = [t.engine_ttft for t in done if t.engine_ttft is not None]
    queue = [t.queue_time for t in done if t.queue_time is not None]
    return {"cached_tokens_min_after_first": min(sorted(cached)[1:], default=None),
            "cached_tokens_mean": float(np.mean(cached)) if cached else None,
            "concurrency": concurrency, "rate": rate, "requests": len(prompts),
            "completed": len(done), "errors": len(errors), "first_error": errors[0] if errors
            else None, "wall_s": wall, "requests_per_s": len(done) / wall,
            "output_tokens": tokens, "output_tokens_per_s": tokens / wall,
            "ttft_ms": _percentiles(ttft), "tpot_ms": _percentiles(tpot),
            "itl_ms": _percentiles(itl),
            **({"engine_ttft_ms": _percentiles(engine_ttft), "queue_ms": _percentiles(queue)}
               if engine_ttft else {})}


# -- the command --------------------------------------------------------------------------------

def _start_engine(args, max_slots: int, max_len: int, layout: str = "dense"):
    from checkpoints.loader import load_model
    from model.config import named_config
    from model.decoder import init_params
    from serving.engine.server import start_in_process

    if args.config:
        config = named_config(args.config, dtype=args.dtype)
        params, name = init_params(config, seed=0), args.config
        if getattr(args, "quantize", None):
            from model.quantize import quantize_params
            params = quantize_params(config, params)
    else:
        config, params, _ = load_model(args.model, dtype=args.dtype,
                                       quantize=getattr(args, "quantize", None))
        name = args.model
    from serving.engine.main import kv_engine_args
    args.kv_layout = layout
    kv = kv_engine_args(args, config, max_slots, max_len)
    print(f"bench serve: starting an engine on {name}"
          + (f" ({args.quantize} weights)" if getattr(args, "quantize", None) else "")
          + f" ({max_slots} slots, {layout} KV"
          + (f", {kv['num_blocks']} blocks of {kv['block_size']}" if "num_blocks" in kv else "")
          + "), compiling ...", flush=True)
    from serving.engine.cpu_matmul import kept_path, label, resolve
    from serving.warmup import default_cache_dir
    matmul = resolve(getattr(args, "cpu_matmul", None) or "default", config, params, max_slots,
                     say=lambda m: print(f"bench serve: {m}", flush=True),
                     cache_path=kept_path(default_cache_dir()))
    server = start_in_process(config, params, max_slots=max_slots, max_len=max_len,
                              model_name=name, max_queue=4096,
                              prefix_cache=bool(args.shared_prefix), kv=kv,
                              prefill_batch=args.prefill_batch,
                              decode_steps=getattr(args, "decode_steps", 1),
                              cpu_matmul=matmul)
    print(f"bench serve: decode matmuls: {label(matmul)}", flush=True)
    if getattr(args, "prefill_budget", None):      # read by the scheduler every iteration
        server.scheduler.prefill_budget = args.prefill_budget
    return server, name


def run(args) -> int:
    concurrencies = int_list(args.concurrency, "--concurrency")
    if args.rate is not None:
        if not args.rate > 0:
            raise ValueError(f"--rate must be > 0, got {args.rate}")
        concurrencies = [None]
    counts = counts_per_level(args.num_requests, concurrencies, lambda c: max(8, 2 * (c or 8)))
    for flag in ("prompt_len", "output_len"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")

    if args.shared_prefix < 0:
        raise ValueError("--shared-prefix must be >= 0")
    sampling_option(args)        # a bad --sampling fails before any engine starts
    layouts = [x.strip() for x in args.kv_layout.split(",") if x.strip()]
    if not layouts or any(x not in ("dense", "paged") for x in layouts):
        raise ValueError(f"--kv-layout: expected dense, paged or dense,paged, got "
                         f"{args.kv_layout!r}")
    if (args.grpc or args.http) and len(layouts) > 1:
        raise ValueError("--kv-layout with two layouts needs an in-process engine")
    results, labels = [], []
    for layout in layouts:
        results += _run_target(args, concurrencies, counts, layout, labels)
    label = labels[0] if len(labels) == 1 else "; ".join(labels)

    report = {"target": label, "prompt_len": args.prompt_len, "output_len": args.output_len,
              "sampling": sampling_option(args),
              "shared_prefix": args.shared_prefix, "runs": results}
    if len(layouts) > 1:
        per = {x: sum(r["output_tokens_per_s"] for r in results if r["kv_layout"] == x)
               for x in layouts}
        if per["dense"] > 0:
            report["tokens_per_s_paged_vs_dense"] = per["paged"] / per["dense"]
    if len(results) > 1 and results[0]["output_tokens_per_s"] > 0 and len(layouts) == 1 \
            and not args.shared_prefix:
        report["throughput_ratio_last_vs_first"] = (results[-1]["output_tokens_per_s"]
                                                    / results[0]["output_tokens_per_s"])
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
    return 1 if any(r["errors"] for r in results) else 0


def sampling_option(args) -> dict:
    """--sampling's JSON object ({} without it); a ValueError naming the flag otherwise."""
    text = getattr(args, "sampling", None)
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--sampling must be a JSON object: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--sampling must be a JSON object, got {text!r}")
    return value


def _run_target(args, concurrencies, counts, layout: str, labels: list) -> list[dict]:
    """Every load against one target (for an in-process engine: one per layout)."""
    server = None
    if args.grpc:
        target, label = GrpcTarget(args.grpc), f"gRPC {args.grpc}"
    elif args.http:
        target = HttpTarget(args.http, args.api_key, args.served_model, not args.no_stream)
        label = f"HTTP {args.http}" + (" (not streamed)" if args.no_stream else "")
    else:
        if not (args.model or args.config):
            args.model = "default"
        slots = args.max_slots or max(c or 32 for c in concurrencies)
        max_len = args.max_model_len or (args.shared_prefix + args.prompt_len
                                         + args.output_len + 1)
        server, name = _start_engine(args, slots, max_len, layout)
        target, label = (GrpcTarget(f"127.0.0.1:{server.port}"),
                         f"gRPC in-process, {name}, {layout} KV")
    labels.append(label)
    results = []
    try:
        vocab = target.vocab_size or 1000
        rng = np.random.default_rng(args.seed)
        sampling = {"max_tokens": args.output_len, "ignore_eos": True,
                    "temperature": args.temperature, **sampling_option(args)}
        n = args.shared_prefix
        # one request first: connections and any lazy path warm, not counted
        run_load(target, [rng.integers(1, vocab, n + args.prompt_len).tolist()], sampling,
                 concurrency=1, rate=None, seed=args.seed)
        for conc, count in zip(concurrencies, counts):
            for shared in ([False, True] if n else [False]):
                prefix = rng.integers(1, vocab, n).tolist()
                prompts = [(prefix if shared else rng.integers(1, vocab, n).tolist())
                           + rng.integers(1, vocab, args.prompt_len).tolist()
                           for _ in range(count)]
                r = run_load(target, prompts, sampling, concurrency=conc, rate=args.rate,
                             seed=args.seed)
                r.update(kv_layout=layout, shared_prefix=n if shared else 0)
                results.append(r)
        if server is not None:
            stats = dict(server.scheduler.stats(),
                         batched_prefills=server.scheduler.engine.batched_prefills,
                         batched_prefill_prompts=server.scheduler.engine.batched_prompts)
            for r in results:
                r["engine_stats"] = stats
    finally:
        target.close()
        if server is not None:
            server.stop(grace_s=5)
    return results


def format_report(report: dict) -> str:
    def ms(d):
        return ("     -" if d["mean"] is None else
                f"{d['mean']:8.1f} {d['p50']:8.1f} {d['p99']:8.1f}")

    shared = report.get("shared_prefix") or 0
    lines = [f"bench serve: {report['target']}, prompt {report['prompt_len']} tokens"
             + (f" after a {shared}-token prefix (shared or unique)" if shared else "")
             + f", output {report['output_len']} tokens",
             f"{'kv':>6} {'prefix':>7} {'load':>12} {'reqs':>5} {'req/s':>7} {'tok/s':>8} | {'TTFT ms mean/p50/p99':>26}"
             f" | {'TPOT ms mean/p50/p99':>26} | {'ITL ms mean/p50/p99':>26}"]
    for r in report["runs"]:
        load = f"conc {r['concurrency']}" if r["rate"] is None else f"rate {r['rate']:g}/s"
        prefix = "shared" if r.get("shared_prefix") else "unique" if shared else "-"
        lines.append(f"{r.get('kv_layout', '-'):>6} {prefix:>7} {load:>12} {r['completed']:>5} {r['requests_per_s']:7.2f} "
                     f"{r['output_tokens_per_s']:8.1f} | {ms(r['ttft_ms'])} | "
                     f"{ms(r['tpot_ms'])} | {ms(r['itl_ms'])}")
        if r["errors"]:
            lines.append(f"{'':>12} {r['errors']} errors, first: {r['first_error']}")
        if r.get("engine_ttft_ms", {}).get("p50") is not None:
            lines.append(f"{'':>12} in the engine: TTFT ms mean/p50/p99 "
                         f"{ms(r['engine_ttft_ms'])}, of which queued {ms(r['queue_ms'])}")
    if "tokens_per_s_paged_vs_dense" in report:
        lines.append(f"token throughput, paged vs dense: "
                     f"{report['tokens_per_s_paged_vs_dense']:.2f}x")
    for r in report["runs"]:
        st = r.get("engine_stats") or {}
        if "kv_blocks_total" in st:
            lines.append(f"paged KV after the run: {st['kv_blocks_total']} blocks of "
                         f"{st['kv_block_size']}, prefix hit rate "
                         f"{st['prefix_cache_hit_rate']:.2f}, {st['kv_preemptions']} "
                         f"preemptions, {st['kv_block_evictions']} evictions")
            break
    if "throughput_ratio_last_vs_first" in report:
        lines.append(f"token throughput, last load vs first: "
                     f"{report['throughput_ratio_last_vs_first']:.2f}x")
    return "\n".join(lines)
