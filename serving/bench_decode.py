"""`flaxserve bench decode`: decode throughput against the memory roofline and transformers.

Decode at small batch is memory bound: every step reads every weight once. So the honest
figure is tokens/s as a fraction of (measured bandwidth / parameter bytes per token), with
the bandwidth measured in the same run on random data (pages of identical values can be
merged by the host and read faster than memory allows), before and after the runs, the
higher reading taken (one reading on a shared machine can catch a busy moment). Hugging
Face transformers' `generate()` on the same weights is the second yardstick. Both are timed as decode only:
(time for N new tokens - time for 1) / (N - 1), so prompt processing is excluded.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig, named_config
from serving.flags import int_list, positive_int


def add_arguments(parser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model reference: default (bundled), smollm2, a Hugging "
                     "Face or orbax dir, a .gguf file, or a Hub id org/name[@revision]")
    src.add_argument("--config", help="a named config with random weights, e.g. qwen3-100m")
    parser.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: per platform)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    parser.add_argument("--hf-batch", default="1", help="batch sizes to run transformers at")
    parser.add_argument("--decode-steps", type=positive_int, default=1, metavar="K",
                        help="also time K decode steps per dispatch (multi-step decode, "
                             "serving/engine/multi_step.py) next to one at a time")
    from serving.flags import add_cpu_matmul_argument, add_quantize_argument
    add_quantize_argument(parser)
    add_cpu_matmul_argument(parser, default="auto")
    parser.add_argument("--bandwidth-mib", type=positive_int, default=1024, metavar="MIB",
                        help="buffer read to measure the memory bandwidth (default 1024: far "
                             "larger than the caches; smaller only for quick checks)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


# -- bandwidth -----------------------------------------------------------------------------

def measure_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s reading a random float32 buffer far larger than the caches.

    Two readers, the faster wins: a reduction, and a matrix-vector product (the shape of
    decode, which XLA spreads over all cores)."""
    rows = nbytes // 4 // 4096
    # filled by numpy (a read's speed does not depend on the values; XLA's random bits
    # over 1 GiB cost ~20 s at the test suite's low optimisation level, numpy's normals ~8 s)
    buf = jax.device_put(np.full((rows, 4096), 0.5, np.float32))
    vec = jnp.ones((4096,), jnp.float32)
    readers = [jax.jit(lambda b: jnp.sum(b)), jax.jit(lambda b: b @ vec)]
    best = math.inf
    for read in readers:
        read(buf).block_until_ready()
        for _ in range(repeats):
            t = time.perf_counter()
            read(buf).block_until_ready()
            best = min(best, time.perf_counter() - t)
    size = buf.size * 4
    del buf
    return size / best


def param_bytes_per_token(config: ModelConfig, params) -> int:
    """Bytes of weights one decode step reads: all of them, except that an untied
    embedding table is only gathered (one row), not read."""
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    if not config.tie_word_embeddings:
        embed = params["embed"]
        total -= embed.size * embed.dtype.itemsize
    return total


def step_flops(config: ModelConfig, context: int) -> float:
    """FLOPs of one token's decode step (matmuls + attention over `context` keys)."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    qkv = d * (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
    o = config.num_heads * config.head_dim * d
    per_layer = 2 * (qkv + o + 3 * d * f) + 4 * context * config.num_heads * config.head_dim
    return config.num_layers * per_layer + 2 * d * v


# -- our engine ------------------------------------------------------------------------------

def bench_ours(config, params, batch: int, prompt_len: int, new_tokens: int,
               decode_steps: int = 1, host: dict | None = None,
               cpu_matmul: str = "default") -> float | tuple[float, float]:
    """Aggregate decode tokens/s at `batch` through the serving engine's fused step; with
    decode_steps K > 1, (one step per dispatch, K steps per dispatch) on one engine.

    `host` (optional) gets, per K, the CPU seconds the calling (host) thread spent per
    decode step: dispatching, reading the tokens, Python. On a CPU device that time is
    taken from the cores the step runs on, and it is measured as CPU time, so a shared
    machine inflates it far less than the wall times."""
    from sampling.params import SamplingParams
    from serving.engine.device import DeviceEngine

    max_len = prompt_len + new_tokens + 2
    engine = DeviceEngine(config, params, max_slots=batch, max_len=max_len,
                          prefill_buckets=(prompt_len,), num_top_logprobs=0,
                          decode_steps=decode_steps, cpu_matmul=cpu_matmul)
    if host is not None:
        host["cpu_matmul"] = engine.cpu_matmul
    rng = np.random.default_rng(0)
    greedy = SamplingParams(temperature=0.0)

    def run(calls: int, k: int) -> float:
        for slot in range(batch):
            prompt = rng.integers(0, config.vocab_size, prompt_len)
            engine.insert(slot, prompt, 0, greedy, seed=slot).result()
        dispatch = engine.step if k == 1 else lambda: engine.multi_step(k)
        t, cpu = time.perf_counter(), time.thread_time()
        pending = dispatch()
        for _ in range(calls - 1):
            nxt = dispatch()
            pending.result()
            pending = nxt
        pending.result()
        return time.perf_counter() - t, time.thread_time() - cpu

    def rate(k: int) -> float:
        calls = max(new_tokens // k, 2)
        run(2, k)
        t1, cpu1 = run(1, k)
        tn, cpun = run(calls, k)
        if host is not None:
            host[k] = max(cpun - cpu1, 0.0) / ((calls - 1) * k)
        return batch * (calls - 1) * k / max(tn - t1, 1e-9)

    engine.warmup()  # every attend bucket the run will cross (and the K-step programs)
    if decode_steps == 1:
        return rate(1)
    return rate(1), rate(decode_steps)


# -- transformers ------------------------------------------------------------------------------

def hf_config_for(config: ModelConfig):
    """A transformers config describing the same architecture as ours."""
    import transformers

    rope = {"rope_type": config.rope_scaling[0], "rope_theta": config.rope_theta}
    if config.rope_scaling[0] == "linear":
        rope["factor"] = config.rope_scaling[1]
    elif config.rope_scaling[0] == "llama3":
        rope.update(zip(("factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings"), config.rope_scaling[1:]))
    common = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                  intermediate_size=config.intermediate_size,
                  num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                  num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
                  max_position_embeddings=config.max_position_embeddings,
                  rms_norm_eps=config.rms_norm_eps, rope_parameters=rope,
                  tie_word_embeddings=config.tie_word_embeddings)
    family = config.family
    if family == "qwen3":
        return transformers.Qwen3Config(**common, attention_bias=config.qkv_bias)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=config.sliding_window)
    return transformers.LlamaConfig(**common, attention_bias=config.qkv_bias)


def params_from_torch(config: ModelConfig, model) -> dict:
    """Our parameter tree from a transformers model's state dict (same weights)."""
    from checkpoints.hf_layout import Source, param_sources

    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])

    def build(node):
        if isinstance(node, Source):
            arr = node.build(*[state[n] for n in node.names])
            return jnp.asarray(arr, dtype=config.dtype)
        return {k: build(v) for k, v in node.items()}

    return build(param_sources(config))


def bench_hf(model, vocab_size: int, batch: int, prompt_len: int, new_tokens: int) -> float:
    import torch

    ids = torch.randint(0, vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))

    def run(n: int) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t

    run(2)
    t1 = run(1)
    tn = run(new_tokens)
    return batch * (new_tokens - 1) / max(tn - t1, 1e-9)


# -- command ------------------------------------------------------------------------------------

def _load(args):
    hf_model = None
    if args.config:
        config = named_config(args.config, dtype=args.dtype)
        if not args.no_hf:
            import torch
            import transformers

            torch.manual_seed(0)
            hf_model = transformers.AutoModelForCausalLM.from_config(
                hf_config_for(config), dtype=torch.float32).eval()
            params = params_from_torch(config, hf_model)
        else:
            from model.decoder import init_params
            params = init_params(config)
        if args.quantize:
            from model.quantize import quantize_params
            params = quantize_params(config, params)
        return config, params, hf_model, args.config
    from checkpoints.loader import load_model

    config, params, model_dir = load_model(args.model, dtype=args.dtype, quantize=args.quantize)
    if not args.no_hf:
        import os

        from checkpoints.gguf_read import is_gguf
        from checkpoints.resolve import resolve
        source = resolve(args.model)
        if os.path.isfile(source) and is_gguf(source):     # transformers' own GGUF loader
            import torch
            import transformers
            hf_model = transformers.AutoModelForCausalLM.from_pretrained(
                os.path.dirname(source), gguf_file=os.path.basename(source),
                dtype=torch.float32).eval()
        elif os.path.exists(os.path.join(model_dir, "config.json")):
            import torch
            import transformers
            hf_model = transformers.AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=torch.float32).eval()
    return config, params, hf_model, args.model


def run(args) -> int:
    batches = int_list(args.batch, "--batch")
    hf_batches = int_list(args.hf_batch, "--hf-batch")
    if args.prompt_len < 1 or args.new_tokens < 2:
        raise ValueError("--prompt-len must be >= 1 and --new-tokens >= 2")
    config, params, hf_model, name = _load(args)
    # the bandwidth is measured before and after the runs and the higher one is the
    # roofline: on a shared machine one reading can catch a busy moment and make the
    # fraction look better than it is (the load average is reported next to it)
    load = [os.getloadavg()[0]]
    buffer_bytes = args.bandwidth_mib << 20
    bandwidths = [measure_bandwidth(buffer_bytes)]
    nbytes = param_bytes_per_token(config, params)
    context = args.prompt_len + args.new_tokens // 2
    flops_per_token = step_flops(config, context)
    result = {
        "model": name, "params": int(sum(x.size for x in jax.tree.leaves(params))),
        "dtype": config.dtype, "quantize": args.quantize, "backend": jax.default_backend(),
        "devices": jax.device_count(), "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "param_bytes_per_token": nbytes, "runs": [],
    }
    k = args.decode_steps
    if k < 1:
        raise ValueError(f"--decode-steps must be >= 1, got {k}")
    for b in batches:
        host = {}
        tps = bench_ours(config, params, b, args.prompt_len, args.new_tokens, k, host,
                         cpu_matmul=args.cpu_matmul or "default")
        multi = None
        if k > 1:
            tps, multi = tps
        entry = {"batch": b, "tokens_s": tps, "gflop_s": tps * flops_per_token / 1e9,
                 "host_cpu_ms_per_step": 1e3 * host[1], "cpu_matmul": host["cpu_matmul"]}
        if multi is not None:
            entry.update(decode_steps=k, multi_tokens_s=multi, multi_vs_single=multi / tps)
        if hf_model is not None and b in hf_batches:
            hf = bench_hf(hf_model, config.vocab_size, b, args.prompt_len, args.new_tokens)
            entry["hf_tokens_s"] = hf
            entry["speedup_vs_hf"] = tps / hf
        result["runs"].append(entry)
        if not args.json:
            line = (f"batch {b:>3}: {tps:9.1f} tokens/s  {entry['gflop_s']:7.1f} GFLOP/s  "
                    f"host thread {entry['host_cpu_ms_per_step']:.2f} ms CPU a step "
                    f"({100 * host[1] * tps / b:.0f}% of it), decode matmuls "
                    f"{entry['cpu_matmul']}")
            if "hf_tokens_s" in entry:
                line += f"  transformers {entry['hf_tokens_s']:8.1f} tokens/s ({entry['speedup_vs_hf']:.2f}x)"
            print(line, flush=True)
            if multi is not None:
                line = (f"batch {b:>3}, {k} steps per dispatch: {multi:9.1f} tokens/s "
                        f"({entry['multi_vs_single']:.2f}x one step per dispatch)")
                print(line, flush=True)
    bandwidths.append(measure_bandwidth(buffer_bytes))
    load.append(os.getloadavg()[0])
    bandwidth = max(bandwidths)
    roofline = bandwidth / nbytes
    result.update(bandwidth_gb_s=bandwidth / 1e9,
                  bandwidths_gb_s=[x / 1e9 for x in bandwidths],
                  roofline_tokens_s=roofline, load_average=load)
    for r in result["runs"]:
        if r["batch"] == 1:
            r["roofline_fraction"] = r["tokens_s"] / roofline
            if "multi_tokens_s" in r:
                r["multi_roofline_fraction"] = r["multi_tokens_s"] / roofline
    one = next((r for r in result["runs"] if r["batch"] == 1), None)
    if one is not None:
        for r in result["runs"]:
            r["vs_batch1"] = r["tokens_s"] / one["tokens_s"]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"model {name}: {result['params'] / 1e6:.1f}M params, {config.dtype}"
              + (f" ({args.quantize} weights)" if args.quantize else "") + ", "
              f"{jax.default_backend()} x{jax.device_count()}")
        print(f"bandwidth {bandwidth / 1e9:.1f} GB/s (before / after the runs: "
              f"{bandwidths[0] / 1e9:.1f} / {bandwidths[1] / 1e9:.1f}; load average "
              f"{load[0]:.1f} / {load[1]:.1f}), {nbytes / 1e6:.0f} MB read per token, "
              f"roofline {roofline:.1f} tokens/s at batch 1")
        if one is not None:
            line = f"batch   1: {100 * one['roofline_fraction']:5.1f}% of roofline"
            if "multi_roofline_fraction" in one:
                line += (f", {k} steps per dispatch "
                         f"{100 * one['multi_roofline_fraction']:5.1f}%")
            print(line)
        for r in result["runs"]:
            if "vs_batch1" in r:
                print(f"batch {r['batch']:>3} aggregate = {r['vs_batch1']:.2f}x batch 1")
    return 0
