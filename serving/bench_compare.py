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
How each peer runs, and the server/client pieces both sides use, are in bench_peers.py.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

import numpy as np

from serving.bench_peers import (LLAMA_PRECISIONS, TextHttpTarget, free_port, llama_label,
                                 run_peer, run_traced, server)
from serving.flags import counts_per_level, int_list

PEERS = ("hf", "hf-serve", "llama")
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
    parser.add_argument("--llama-gguf", default=None, metavar="own|f32|f16|PATH,...",
                        help="the GGUFs llama.cpp runs, one server each (default: own, "
                             "the model's): f32/f16 are the float32 weights we run, "
                             "converted once by llama.cpp's convert_hf_to_gguf.py (equal "
                             "bytes per token); a path is any GGUF")
    parser.add_argument("--llama-src", default=None, metavar="DIR",
                        help="llama.cpp's source tree, for --llama-gguf f32/f16 (default: "
                             "$FLAXSERVE_LLAMA_SRC, else a folder above llama-server)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="CPU threads for the llama.cpp server")
    parser.add_argument("--server-timeout", type=float, default=900.0,
                        help="seconds to wait for a server to start")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


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


# -- us over gRPC --------------------------------------------------------------------------------

def grpc_runner(server_port: int, output_len: int):
    from serving.bench_serve import GrpcTarget
    target = GrpcTarget(f"127.0.0.1:{server_port}")
    sampling = {"max_tokens": output_len, "ignore_eos": True, "temperature": 0.0}
    return target, sampling


def run(args) -> int:
    """The command; a SIGTERM (e.g. `timeout`) exits through the finally blocks, so the
    servers it started stop too."""
    if threading.current_thread() is not threading.main_thread():
        return _run(args)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _run(args) -> int:
    concurrencies = int_list(args.concurrency, "--concurrency")
    counts = counts_per_level(args.num_requests, concurrencies, lambda c: max(4, c))
    for flag in ("prompt_len", "output_len"):
        if getattr(args, flag) < 2:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 2")
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    bad = [p for p in peers if p not in PEERS]
    if bad:
        raise ValueError(f"--peers: unknown {bad}, expected some of {list(PEERS)}")
    llama_choices = [c.strip() or "own" for c in (args.llama_gguf or "own").split(",")]
    for g in llama_choices:
        if g != "own" and g not in LLAMA_PRECISIONS and not os.path.isfile(g):
            raise ValueError(f"--llama-gguf: no such file {g!r} (or one of own, "
                             f"{', '.join(LLAMA_PRECISIONS)})")
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

    if (set(llama_choices) & set(LLAMA_PRECISIONS) and "llama" in peers
            and not (source or "").endswith(".gguf")):
        raise ValueError("--llama-gguf f32/f16 converts a .gguf model's weights: give a path")
    result = {"model": name, "llama_gguf": {},
              "prompt_len": args.prompt_len, "output_len": args.output_len,
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
            result["runs"]["flaxserve"] = run_traced(send, ids, concurrencies, counts)
            target.close()
        finally:
            srv.stop(grace_s=5)
    else:
        port = free_port()
        # --full-warmup: measured once every program is compiled, not while a background
        # compile shares the cores with the requests (and makes some of them wait)
        cmd = [sys.executable, "-m", "serving.cli", "serve", "--model", name, "--port", str(port),
               "--grpc-port", str(free_port()), "--max-slots", str(max(concurrencies)),
               "--max-model-len", str(max_len), "--dtype", "float32", "--full-warmup"]
        if args.quantize:
            cmd += ["--quantize", args.quantize]
        # /health: the engine answers ListModels while its programs compile, and serves
        # (health SERVING) only after
        with server(cmd, port, args.server_timeout, "flaxserve",
                    ready=("/v1/models", "/health")) as url:
            target = TextHttpTarget(url, args.output_len)
            result["runs"]["flaxserve"] = run_traced(target.send, texts, concurrencies, counts)

    _say_figures(say, "flaxserve", result["runs"]["flaxserve"])

    # -- peers
    todo = [(p, args) for p in peers if p != "llama"]
    if "llama" in peers:                # one llama.cpp server per --llama-gguf choice
        todo += [(llama_label(c), argparse.Namespace(**{**vars(args), "llama_gguf": c}))
                 for c in llama_choices]
    for peer, peer_args in todo:
        try:
            figures = run_peer(peer, peer_args, hf_model, source, ids, texts, concurrencies,
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
    for peer, gguf in r["llama_gguf"].items():
        lines.append(f"{peer}: llama.cpp on {gguf}")
    for peer, why in r["skipped"].items():
        lines.append(f"{peer}: skipped: {why}")
    la = r["load_average"]
    lines.append(f"load average (1 min) before {la['before'][0]:.2f}, after {la['after'][0]:.2f}")
    return "\n".join(lines)
