"""`flaxserve bench compare`: the same prompts through flaxserve and its peers, in one run.

A figure means little alone on a shared machine; a ratio measured minutes apart on the
same prompts means more. So this command sends one set of prompts, at each concurrency,
through us and through each peer that is installed, and prints tokens/s, TTFT and TPOT
percentiles, the weight bytes each reads per token, and the ratios us/peer:

- `hf`: Hugging Face transformers `generate()` in this process, float32, the same weights
  (a concurrency of C is a static batch of C prompts);
- `hf-serve`: `transformers serve --continuous-batching` over HTTP (needs fastapi and
  uvicorn; a GGUF is first dequantised into a float32 safetensors dir it can load);
- `llama`: llama.cpp's server on the GGUF itself (`llama-server` on PATH or `--llama-server`,
  else `python -m llama_cpp.server` from `--llama-python` or this interpreter).

Us: `flaxserve serve` over HTTP (`--us http`, the default when the model has a tokenizer)
or an engine in this process over gRPC (`--us grpc`, token-id prompts). Every request is
greedy, `--output-len` tokens (EOS ignored where the server allows it), streamed, and timed
per token as `bench serve` does. A peer that is missing is skipped with a message.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from serving.bench_serve import Trace
from serving.flags import counts_per_level, int_list

PEERS = ("hf", "hf-serve", "llama")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the river ran past an old mill where children learned to count stones and "
         "traders argued about the price of salt while the weather changed slowly over "
         "hills that nobody had mapped since the war of the seven bridges").split()


def add_arguments(parser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--model", help="model reference (default: smollm2): a .gguf file, a "
                     "Hugging Face dir, smollm2, a Hub id")
    src.add_argument("--config", help="a named config with random weights (e.g. tiny, "
                     "qwen3-100m): no tokenizer, so only us over gRPC and `hf` run")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"comma-separated peers to try, of {', '.join(PEERS)}")
    parser.add_argument("--us", choices=("http", "grpc"), default=None,
                        help="how to drive flaxserve (default: http with a tokenizer, "
                             "else grpc)")
    parser.add_argument("--concurrency", default="1,32", help="comma-separated concurrencies")
    parser.add_argument("--num-requests", default=None,
                        help="requests per concurrency (one, or one per concurrency; "
                             "default max(4, concurrency))")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--quantize", choices=("int8",), default=None,
                        help="our weights as int8 (model/quantize.py); peers unchanged")
    parser.add_argument("--llama-server", default=None, metavar="PATH",
                        help="llama.cpp's `llama-server` binary (default: on PATH)")
    parser.add_argument("--llama-python", default=None, metavar="PATH",
                        help="a python with llama_cpp[server] (default: this one, if it "
                             "has it)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="CPU threads for the llama.cpp server")
    parser.add_argument("--server-timeout", type=float, default=900.0,
                        help="seconds to wait for a server to start")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


# -- figures -------------------------------------------------------------------------------------

def percentiles(values: list[float]) -> dict:
    """p50 and p90 in ms (None when there are no values)."""
    if not values:
        return {"p50": None, "p90": None}
    a = np.asarray(values, np.float64) * 1000.0
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90))}


def summarise(traces: list[Trace], wall: float, concurrency: int) -> dict:
    done = [t for t in traces if t.error is None and t.tokens > 0]
    errors = [t.error for t in traces if t.error is not None]
    tokens = sum(t.tokens for t in done)
    ttft = [t.token_times[0] for t in done]
    tpot = [(t.token_times[-1] - t.token_times[0]) / (t.tokens - 1) for t in done if t.tokens > 1]
    return {"concurrency": concurrency, "requests": len(traces), "completed": len(done),
            "errors": len(errors), "first_error": errors[0] if errors else None,
            "output_tokens": tokens, "wall_s": wall, "tokens_s": tokens / wall,
            "ttft_ms": percentiles(ttft), "tpot_ms": percentiles(tpot)}


def weight_bytes_ours(config, quantize: str | None) -> int:
    """Weight bytes one decode step reads (bench decode's rule), from shapes alone."""
    import flax.linen as nn
    import jax

    from model.decoder import abstract_params
    shapes = nn.meta.unbox(abstract_params(config))
    if quantize:
        from model.quantize import quantized_bytes
        return quantized_bytes(config, shapes)
    total = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes))
    if not config.tie_word_embeddings:
        e = shapes["embed"]
        total -= int(np.prod(e.shape)) * np.dtype(e.dtype).itemsize
    return total


def weight_bytes_torch(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    if not model.config.tie_word_embeddings:
        e = model.get_input_embeddings().weight
        total -= e.numel() * e.element_size()
    return total


def weight_bytes_gguf(path: str) -> int:
    from checkpoints.gguf_read import GGUFFile
    tensors = GGUFFile(path).tensors
    total = sum(int(t.n_bytes) for t in tensors.values())
    if "output.weight" in tensors:          # untied: the embedding is only gathered
        total -= int(tensors["token_embd.weight"].n_bytes)
    return total


# -- prompts -------------------------------------------------------------------------------------

def make_prompts(count: int, length: int, seed: int, tokenizer=None, vocab: int = 1000):
    """(token-id prompts, texts or None): random words made into exactly `length` tokens."""
    rng = np.random.default_rng(seed)
    if tokenizer is None:
        return [rng.integers(1, vocab, length).tolist() for _ in range(count)], None
    ids, texts = [], []
    for _ in range(count):
        words = " ".join(rng.choice(WORDS, size=length + 8))
        toks = tokenizer.encode(words, add_special_tokens=False)[:length]
        ids.append(list(toks))
        texts.append(tokenizer.decode(toks))
    return ids, texts


# -- targets (each: send(prompt, trace)) ---------------------------------------------------------

class TextHttpTarget:
    """Streams OpenAI `/v1/completions` with text prompts (any OpenAI-style server)."""

    def __init__(self, url: str, output_len: int):
        import requests
        self.url, self.output_len = url.rstrip("/"), output_len
        self.model = requests.get(self.url + "/v1/models", timeout=30).json()["data"][0]["id"]
        self.extra = {"ignore_eos": True}
        self._local = threading.local()

    def send(self, prompt: str, trace: Trace) -> None:
        import requests
        session = getattr(self._local, "s", None) or requests.Session()
        self._local.s = session
        body = {"model": self.model, "prompt": prompt, "max_tokens": self.output_len,
                "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
                **self.extra}
        with session.post(self.url + "/v1/completions", json=body, stream=True,
                          timeout=3600) as r:
            if r.status_code in (400, 422) and "ignore_eos" in r.text and self.extra:
                self.extra = {}                 # this server has no ignore_eos: plain greedy
                return self.send(prompt, trace)
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            usage = None
            for line in r.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                if any(c.get("text") for c in chunk.get("choices") or []):
                    trace.add(1)
            if usage and usage.get("completion_tokens") and trace.tokens:
                trace.tokens = int(usage["completion_tokens"])   # chunks may hold several


# -- servers ---------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(cmd: list[str], port: int, timeout: float, log_name: str, env=None):
    """A server subprocess (own process group), up when GET /v1/models answers 200."""
    import requests
    log = tempfile.NamedTemporaryFile("w+", prefix=f"bench-compare-{log_name}-",
                                      suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env=env or os.environ.copy(), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"{log_name} exited with {proc.returncode}: "
                                   f"{log.read()[-800:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(url + "/v1/models", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{log_name} did not answer within {timeout:.0f} s "
                                   f"(log {log.name})")
            time.sleep(1.0)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        os.unlink(log.name)


# -- the runners ---------------------------------------------------------------------------------

def timed_batches(generate_batch, prompts, concurrency: int, count: int) -> dict:
    """Static batches of `concurrency` prompts; generate_batch(prompts, traces) fills traces."""
    traces = []
    t0 = time.perf_counter()
    for i in range(0, count, concurrency):
        batch = prompts[i:min(i + concurrency, count)]
        start = time.perf_counter()
        ts = [Trace(start=start) for _ in batch]
        try:
            generate_batch(batch, ts)
        except Exception as e:  # reported, never silently dropped
            for t in ts:
                t.error = f"{type(e).__name__}: {e}"
        traces += ts
    return summarise(traces, time.perf_counter() - t0, concurrency)


def hf_generate_runner(model, output_len: int):
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self, traces):
            self.traces, self.first = traces, True

        def put(self, value):
            if self.first:              # generate() puts the prompt first
                self.first = False
                return
            for t in self.traces:
                t.add(1)

        def end(self):
            pass

    def generate_batch(batch, traces):
        ids = torch.tensor(batch, dtype=torch.long)
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                           min_new_tokens=output_len, do_sample=False, pad_token_id=0,
                           streamer=Clock(traces))
    return generate_batch


def grpc_runner(server_port: int, output_len: int):
    from serving.bench_serve import GrpcTarget
    target = GrpcTarget(f"127.0.0.1:{server_port}")
    sampling = {"max_tokens": output_len, "ignore_eos": True, "temperature": 0.0}
    return target, sampling


def _run_traced(send, prompts, concurrencies, counts) -> list[dict]:
    """Fixed-concurrency clients (bench serve's loop), summarised with p50/p90."""
    def load(ps, conc):
        traces = [Trace(start=0.0) for _ in ps]
        cursor, lock = iter(range(len(ps))), threading.Lock()

        def client():
            while True:
                with lock:
                    i = next(cursor, None)
                if i is None:
                    return
                traces[i].start = time.perf_counter()
                try:
                    send(ps[i], traces[i])
                except Exception as e:
                    traces[i].error = f"{type(e).__name__}: {e}"
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(conc)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return summarise(traces, time.perf_counter() - t0, conc)

    load(prompts[:1], 1)              # warm connections and lazy paths, uncounted
    return [load(prompts[:count], conc) for conc, count in zip(concurrencies, counts)]


# -- the command ---------------------------------------------------------------------------------

def _hf_dir_for(source: str, say) -> str:
    """A float32 safetensors dir transformers serve can load (GGUF: dequantised once)."""
    if os.path.isdir(source):
        return source
    from checkpoints.resolve import cache_dir
    out = os.path.join(cache_dir(), "bench-hf", os.path.basename(source) + ".hf")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    import torch
    import transformers
    say(f"dequantising {os.path.basename(source)} into {out} for transformers serve")
    d, f = os.path.dirname(source), os.path.basename(source)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    cfg = model.config
    cfg.architectures = [type(model).__name__]
    if hasattr(cfg, "quantization_config"):     # not serialisable as a GGUF-quantised model
        del cfg.quantization_config
    fresh = type(model)(cfg)
    fresh.load_state_dict(model.state_dict())
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def _llama_command(args, gguf: str, port: int, max_conc: int, ctx: int):
    binary = args.llama_server or shutil.which("llama-server")
    if binary:
        return [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-t",
                str(args.threads), "--parallel", str(max_conc), "-c", str(ctx * max_conc)]
    python = args.llama_python or os.environ.get("FLAXSERVE_LLAMA_PYTHON") or sys.executable
    probe = subprocess.run([python, "-c", "import llama_cpp.server"], capture_output=True)
    if probe.returncode != 0:
        return None
    return [python, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1",
            "--port", str(port), "--n_threads", str(args.threads), "--n_ctx", str(ctx)]


def run(args) -> int:
    concurrencies = int_list(args.concurrency, "--concurrency")
    counts = counts_per_level(args.num_requests, concurrencies, lambda c: max(4, c))
    for flag in ("prompt_len", "output_len"):
        if getattr(args, flag) < 2:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 2")
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    bad = [p for p in peers if p not in PEERS]
    if bad:
        raise ValueError(f"--peers: unknown {bad}, expected some of {list(PEERS)}")
    say = (lambda m: print(f"bench compare: {m}", file=sys.stderr, flush=True))
    load_before = os.getloadavg()

    from model.config import named_config
    config, params, source, tokenizer, hf_model = None, None, None, None, None
    if args.config:
        config = named_config(args.config, dtype="float32")
        name = args.config
    else:
        from checkpoints.resolve import resolve
        name = args.model or "smollm2"
        source = resolve(name)
    us = args.us or ("grpc" if args.config else "http")
    if us == "http" and args.config:
        raise ValueError("--us http needs --model (a config has no tokenizer)")

    result = {"model": name, "prompt_len": args.prompt_len, "output_len": args.output_len,
              "concurrency": concurrencies, "us": us, "quantize": args.quantize,
              "runs": {}, "bytes_per_token": {}, "skipped": {}, "ratios": {}}
    max_len = args.prompt_len + args.output_len + 8
    n_prompts = max(counts)

    # the HF model: the peer `hf`, and for --config the weights we run too
    if "hf" in peers or args.config:
        import torch
        import transformers
        torch.manual_seed(0)
        if args.config:
            from serving.bench_decode import hf_config_for, params_from_torch
            hf_model = transformers.AutoModelForCausalLM.from_config(
                hf_config_for(config), dtype=torch.float32).eval()
            params = params_from_torch(config, hf_model)
        elif os.path.isfile(source):
            hf_model = transformers.AutoModelForCausalLM.from_pretrained(
                os.path.dirname(source), gguf_file=os.path.basename(source),
                dtype=torch.float32).eval()
        else:
            hf_model = transformers.AutoModelForCausalLM.from_pretrained(
                source, dtype=torch.float32).eval()
    if not args.config:
        from checkpoints.loader import load_model
        from checkpoints.tokenizer import load_tokenizer
        config, params, model_dir = load_model(name, dtype="float32")
        tokenizer = load_tokenizer(model_dir)
        if us == "http":
            params = None                   # the server loads its own
    ids, texts = make_prompts(n_prompts, args.prompt_len, 0, tokenizer, config.vocab_size)

    # -- us
    result["bytes_per_token"]["flaxserve"] = weight_bytes_ours(config, args.quantize)
    say(f"flaxserve ({us}) ...")
    if us == "grpc":
        from serving.engine.server import start_in_process
        run_params = params
        if args.quantize:
            from model.quantize import quantize_params
            run_params = quantize_params(config, params)
        srv = start_in_process(config, run_params, max_slots=max(concurrencies),
                               max_len=max_len, model_name=name, max_queue=4096,
                               prefix_cache=False)
        try:
            target, sampling = grpc_runner(srv.port, args.output_len)
            send = lambda p, t: target.send(p, sampling, t)
            result["runs"]["flaxserve"] = _run_traced(send, ids, concurrencies, counts)
            target.close()
        finally:
            srv.stop(grace_s=5)
    else:
        port = free_port()
        cmd = [sys.executable, "-m", "serving.cli", "serve", "--model", name, "--port", str(port),
               "--grpc-port", str(free_port()), "--max-slots", str(max(concurrencies)),
               "--max-model-len", str(max_len), "--dtype", "float32"]
        if args.quantize:
            cmd += ["--quantize", args.quantize]
        with server(cmd, port, args.server_timeout, "flaxserve") as url:
            target = TextHttpTarget(url, args.output_len)
            result["runs"]["flaxserve"] = _run_traced(target.send, texts, concurrencies, counts)

    _say_figures(say, "flaxserve", result["runs"]["flaxserve"])

    # -- peers
    for peer in peers:
        try:
            figures = _run_peer(peer, args, hf_model, source, ids, texts, concurrencies,
                                counts, max_len, result, say)
        except Exception as e:   # a peer failing is reported, and the others still run
            figures = None
            result["skipped"][peer] = f"failed: {type(e).__name__}: {str(e)[:300]}"
        if figures is not None:
            result["runs"][peer] = figures
            _say_figures(say, peer, figures)
        if peer in result["skipped"]:
            say(f"{peer}: skipped: {result['skipped'][peer]}")

    ours = result["runs"]["flaxserve"]
    for peer, runs in result["runs"].items():
        if peer == "flaxserve":
            continue
        result["ratios"][peer] = [_ratio(a, b) for a, b in zip(ours, runs)]
    result["load_average"] = {"before": list(load_before), "after": list(os.getloadavg())}
    if args.json:
        print(json.dumps(result))
    else:
        print(format_report(result))
    return 1 if any(r["errors"] for runs in result["runs"].values() for r in runs) else 0


def _run_peer(peer, args, hf_model, source, ids, texts, concurrencies, counts, max_len,
              result, say):
    skipped = result["skipped"]
    if peer == "hf":
        say("transformers generate ...")
        result["bytes_per_token"]["hf"] = weight_bytes_torch(hf_model)
        gen = hf_generate_runner(hf_model, args.output_len)
        timed_batches(gen, ids, 1, 1)                                   # warm, uncounted
        return [timed_batches(gen, ids, c, n) for c, n in zip(concurrencies, counts)]
    if texts is None:
        skipped[peer] = "needs --model (text prompts over HTTP)"
        return None
    if peer == "hf-serve":
        try:
            import fastapi  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError:
            skipped[peer] = "transformers serve needs fastapi and uvicorn (pip install " \
                            "'transformers[serving]')"
            return None
        exe = shutil.which("transformers") or os.path.join(os.path.dirname(sys.executable),
                                                            "transformers")
        if not os.path.exists(exe):
            skipped[peer] = "no `transformers` command"
            return None
        hf_dir = _hf_dir_for(source, say)
        port = free_port()
        block = 32
        blocks = max(concurrencies) * (-(-max_len // block)) + 8   # bounded KV memory
        cmd = [exe, "serve", "--continuous-batching", "--port", str(port), "--host",
               "127.0.0.1", "--device", "cpu", "--dtype", "float32", "--cb-block-size",
               str(block), "--cb-num-blocks", str(blocks), hf_dir]
        say("transformers serve --continuous-batching ...")
        if hf_model is not None:
            result["bytes_per_token"]["hf-serve"] = weight_bytes_torch(hf_model)
        with server(cmd, port, args.server_timeout, "hf-serve") as url:
            target = TextHttpTarget(url, args.output_len)
            return _run_traced(target.send, texts, concurrencies, counts)
    # llama
    if not (os.path.isfile(source) and source.endswith(".gguf")):
        skipped[peer] = "llama.cpp needs a .gguf model"
        return None
    port = free_port()
    cmd = _llama_command(args, source, port, max(concurrencies), max_len)
    if cmd is None:
        skipped[peer] = ("no llama.cpp: neither `llama-server` on PATH (--llama-server) nor "
                         "a python with llama_cpp.server (--llama-python)")
        return None
    result["bytes_per_token"]["llama"] = weight_bytes_gguf(source)
    say(f"llama.cpp ({os.path.basename(cmd[0])}) ...")
    with server(cmd, port, args.server_timeout, "llama") as url:
        target = TextHttpTarget(url, args.output_len)
        return _run_traced(target.send, texts, concurrencies, counts)


def _say_figures(say, who: str, runs: list[dict]) -> None:
    """Each implementation's figures as soon as it is done (a long run killed half-way
    still leaves them)."""
    for x in runs:
        say(f"{who} at concurrency {x['concurrency']}: {x['tokens_s']:.1f} tokens/s, "
            f"TTFT p50 {x['ttft_ms']['p50']} ms, TPOT p50 {x['tpot_ms']['p50']} ms, "
            f"{x['completed']}/{x['requests']} done")


def _ratio(ours: dict, peer: dict) -> dict:
    def div(a, b):
        return None if a is None or b in (None, 0) else a / b
    return {"concurrency": ours["concurrency"],
            "tokens_s": div(ours["tokens_s"], peer["tokens_s"]),
            "ttft_p50": div(ours["ttft_ms"]["p50"], peer["ttft_ms"]["p50"]),
            "tpot_p50": div(ours["tpot_ms"]["p50"], peer["tpot_ms"]["p50"])}


def format_report(r: dict) -> str:
    def f(x, spec="8.1f"):
        return f"{'-':>8}" if x is None else format(x, spec)
    lines = [f"bench compare: {r['model']}, prompt {r['prompt_len']} tokens, output "
             f"{r['output_len']} tokens, greedy; flaxserve over {r['us']}"
             + (f", {r['quantize']} weights" if r["quantize"] else ""),
             f"{'':<10} {'conc':>5} {'reqs':>5} {'tok/s':>8} | {'TTFT ms p50':>11} {'p90':>8}"
             f" | {'TPOT ms p50':>11} {'p90':>8} | {'MB/token':>8}"]
    for who, runs in r["runs"].items():
        mb = r["bytes_per_token"].get(who)
        for x in runs:
            lines.append(f"{who:<10} {x['concurrency']:>5} {x['completed']:>5} "
                         f"{x['tokens_s']:8.1f} | {f(x['ttft_ms']['p50']):>11} "
                         f"{f(x['ttft_ms']['p90'])} | {f(x['tpot_ms']['p50']):>11} "
                         f"{f(x['tpot_ms']['p90'])} | {f(mb / 1e6 if mb else None)}")
            if x["errors"]:
                lines.append(f"{'':<10} {x['errors']} errors, first: {x['first_error']}")
    ours_mb = r["bytes_per_token"].get("flaxserve")
    for peer, ratios in r["ratios"].items():
        mb = r["bytes_per_token"].get(peer)
        byte_ratio = f", bytes/token {ours_mb / mb:.2f}x" if mb and ours_mb else ""
        for x in ratios:
            lines.append(f"us/{peer} at concurrency {x['concurrency']}: tokens/s "
                         f"{f(x['tokens_s'], '.2f')}x, TTFT p50 {f(x['ttft_p50'], '.2f')}x, "
                         f"TPOT p50 {f(x['tpot_p50'], '.2f')}x{byte_ratio}")
    for peer, why in r["skipped"].items():
        lines.append(f"{peer}: skipped: {why}")
    la = r["load_average"]
    lines.append(f"load average (1 min) before {la['before'][0]:.2f}, after {la['after'][0]:.2f}")
    return "\n".join(lines)
