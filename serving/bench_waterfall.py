"""`flaxserve bench waterfall`: where a batch-1 decode token's time goes, piece by piece.

A token of `bench decode` at batch 1 is slower than its matmuls alone. To find where the
rest goes, this builds the step up from a program of only its matmuls (same weights, same
order), one piece at a time (norms and residuals, RoPE and q/k norms, the cache write,
attention: the model's own forward), then the engine's forward program, the sampler, a
synchronous step (dispatch, wait, read the token) and the engine loop `bench decode`
times (step n+1 dispatched before token n is read). Every piece is timed interleaved with
the others in one process, round after round, and the minimum per call is kept, so the
differences between neighbours are the pieces' costs even on a shared machine.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from model import cpu_attention
from model.decoder import _linear, apply_rope, cpu_decode_attention, forward, \
    one_query_attention, rms_norm, rope_inv_freq, rope_tables
from model.quantize import Int8Weight, int8_linear, int8_rows


def add_arguments(parser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model reference (as bench decode)")
    src.add_argument("--config", help="a named config with random weights, e.g. qwen3-100m")
    parser.add_argument("--prompt-len", type=int, default=32,
                        help="prompt tokens, as bench decode's")
    parser.add_argument("--new-tokens", type=int, default=64, help="as bench decode's: "
                        "a step is timed at prompt-len + new-tokens / 2 cached positions")
    parser.add_argument("--rounds", type=int, default=8,
                        help="interleaved rounds over every piece (the minimum is kept)")
    parser.add_argument("--calls", type=int, default=4, help="calls of each piece per round")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: per platform)")
    parser.add_argument("--against", metavar="DIR", help="also time the model forward of "
                        "DIR/model/decoder.py (another checkout), interleaved: an A/B")
    from serving.flags import add_quantize_argument
    add_quantize_argument(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _layer(config, p, x, pos, rope, cache, level: int):
    """One decoder layer over x [1, D] with the pieces up to `level`:
    0 matmuls, 1 + norms / residuals / silu * up, 2 + q/k norms and RoPE,
    3 + the cache write, 4 + attention over the cache (the model's layer)."""
    c = config
    kvh, g, hd, d = c.num_kv_heads, c.q_per_kv, c.head_dim, c.hidden_size
    a = p["attn"]
    h = rms_norm(x, p["attn_norm"]["scale"], c.rms_norm_eps) if level >= 1 else x
    qkv = _linear(h, a["qkv"], d).reshape(1, 1, kvh, g + 2, hd)
    if c.qkv_bias:
        qkv = qkv + a["qkv_bias"]
    q, k, v = qkv[..., :g, :], qkv[..., g, :], qkv[..., g + 1, :]
    if level >= 2:
        if c.qk_norm:
            q = rms_norm(q, a["q_norm"]["scale"], c.rms_norm_eps)
            k = rms_norm(k, a["k_norm"]["scale"], c.rms_norm_eps)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
    kc, vc = cache
    if level >= 3:
        kc = kc.at[jnp.zeros((1, 1), jnp.int32), pos].set(k, mode="drop")
        vc = vc.at[jnp.zeros((1, 1), jnp.int32), pos].set(v, mode="drop")
    if level >= 4 and cpu_attention.available(kc.dtype):     # as the model's layer does
        out = cpu_decode_attention(q, kc, vc, jnp.zeros((1, 1), jnp.int32), pos,
                                   kc.shape[1], kc.shape[1])
    elif level >= 4:
        s = kc.shape[1]
        mask = jnp.arange(s)[None, :] <= pos[:, :1]
        flat = lambda t: t.reshape(t.shape[:2] + (kvh * hd,))
        out = one_query_attention(q, flat(kc), flat(vc), mask)
    else:
        out = q
    y = _linear(out.reshape(1, -1), a["o"], kvh * g * hd)
    if c.o_bias:
        y = y + a["o_bias"]
    x = x + y if level >= 1 else y
    m = p["mlp"]
    h = rms_norm(x, p["mlp_norm"]["scale"], c.rms_norm_eps) if level >= 1 else x
    gu = _linear(h, m["gate_up"], d).reshape(1, 2, -1)
    act = jax.nn.silu(gu[:, 0]) * gu[:, 1] if level >= 1 else gu[:, 0]
    y = _linear(act, m["down"], c.intermediate_size)
    return (x + y if level >= 1 else y), (kc, vc)


def _piece(config, level: int):
    """A jitted program of the pieces up to `level` (see `_layer`), then the LM head."""
    inv = rope_inv_freq(config)

    def run(params, cache, token, pos):
        embed = params["embed"]
        x = (int8_rows(embed, token[:, 0], config.dtype) if isinstance(embed, Int8Weight)
             else embed[token[:, 0]])
        rope = rope_tables(pos, inv)
        new = []
        for i in range(config.num_layers):
            x, kv = _layer(config, params[f"layer_{i}"], x, pos, rope, cache[i], level)
            new.append(kv)
        if level >= 1:
            x = rms_norm(x, params["final_norm"]["scale"], config.rms_norm_eps)
        head = embed if config.tie_word_embeddings else params["lm_head"]
        if isinstance(head, Int8Weight):
            return int8_linear(x, head, jnp.float32), tuple(new)
        head = head if config.tie_word_embeddings else head.T
        return jnp.einsum("bd,vd->bv", x, head, preferred_element_type=jnp.float32), tuple(new)

    return jax.jit(run, donate_argnums=(1,))


def _decoder_from(tree: str):
    """model/decoder.py of another checkout, imported under a name of its own."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("other_decoder",
                                                  os.path.join(tree, "model", "decoder.py"))
    module = importlib.util.module_from_spec(spec)
    import sys
    sys.modules[spec.name] = module          # flax's dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def waterfall(config, params, prompt_len: int = 32, new_tokens: int = 64, rounds: int = 8,
              calls: int = 4, against: str | None = None) -> dict:
    """Per-call minimum seconds of each piece (module docstring), interleaved."""
    from sampling.params import SamplingParams
    from serving.engine.device import DeviceEngine

    max_len = prompt_len + new_tokens + 2
    engine = DeviceEngine(config, params, max_slots=1, max_len=max_len,
                          prefill_buckets=(prompt_len,), num_top_logprobs=0)
    engine.warmup()
    rng = np.random.default_rng(0)
    greedy = SamplingParams(temperature=0.0)

    def fresh():
        engine.release(0)
        engine.insert(0, rng.integers(0, config.vocab_size, prompt_len), 0, greedy,
                      seed=0).result()

    fresh()
    names = ["matmuls only", "+ norms, residuals, silu", "+ q/k norm, RoPE",
             "+ cache write", "+ attention (our layer)"]
    progs = [_piece(config, lvl) for lvl in range(5)]
    cache = tuple((jnp.zeros((1, max_len, config.num_kv_heads, config.head_dim),
                             config.dtype),) * 2 for _ in range(config.num_layers))
    cache = jax.tree.map(jnp.copy, cache)
    token = jnp.zeros((1, 1), jnp.int32)
    pos = jnp.full((1, 1), prompt_len + new_tokens // 2, jnp.int32)
    model = jax.jit(lambda p, c, t, q: forward(config, p, c, t, q, attend_len=max_len),
                    donate_argnums=(1,))
    box = {"cache": cache}

    def piece(prog):
        def call():
            logits, box["cache"] = prog(params, box["cache"], token, pos)
            logits.block_until_ready()
        return call

    def model_call():
        logits, box["cache"] = model(params, box["cache"], token, pos)
        logits.block_until_ready()

    def sampler_only():
        if engine.position(0) >= max_len - 2:
            fresh()
        fwd = engine.forward_step()
        fwd.logits.block_until_ready()
        t = time.perf_counter()
        engine.sample_step(fwd).result()
        return time.perf_counter() - t

    def sync_step():
        if engine.position(0) >= max_len - 2:
            fresh()
        engine.step().result()

    def loop(n: int = 8):
        if engine.position(0) >= max_len - n - 2:
            fresh()
        t = time.perf_counter()
        pending = engine.step()
        for _ in range(n - 1):
            nxt = engine.step()
            pending.result()
            pending = nxt
        pending.result()
        return (time.perf_counter() - t) / n

    def fwd_only():
        # the forward program alone, from a blocked start (its sampler run untimed)
        if engine.position(0) >= max_len - 2:
            fresh()
        t = time.perf_counter()
        fwd = engine.forward_step()
        fwd.logits.block_until_ready()
        dt = time.perf_counter() - t
        engine.sample_step(fwd).result()
        return dt

    # forward + lean sampler as one program (what one dispatch per token would cost)
    def fused_fn(params, state, tables, mask_bits):
        state, logits = engine._forward_step_fn(params, state, tables, max_len, 1)
        return engine._sample_step_fn(state, logits, mask_bits, False, 1, lean=True)

    fused = jax.jit(fused_fn, donate_argnums=(1,))

    def fused_dispatch():
        if engine.position(0) >= max_len - 2:
            fresh()
        engine.state, out = fused(params, engine.state, engine._tables_arg(),
                                  engine._mask_bits(1, None))
        engine._host_pos[0] += 1
        return out

    def fused_sync():
        np.asarray(fused_dispatch().tokens)

    def fused_loop(n: int = 8):
        if engine.position(0) >= max_len - n - 2:
            fresh()
        t = time.perf_counter()
        pending = fused_dispatch()
        for _ in range(n - 1):
            nxt = fused_dispatch()
            np.asarray(pending.tokens)
            pending = nxt
        np.asarray(pending.tokens)
        return (time.perf_counter() - t) / n

    timed = [(n, piece(p)) for n, p in zip(names, progs)]
    timed += [("model forward (decoder.forward)", model_call)]
    if against:
        other_forward = _decoder_from(against).forward
        other = jax.jit(lambda p, c, t, q: other_forward(config, p, c, t, q,
                                                         attend_len=max_len),
                        donate_argnums=(1,))

        def other_call():
            logits, box["cache"] = other(params, box["cache"], token, pos)
            logits.block_until_ready()

        timed += [(f"model forward of {against}", other_call)]
    special = [("engine forward program", fwd_only),
               ("engine sampler program", sampler_only),
               ("engine step, synchronous (forward + sampler + read)", sync_step),
               ("engine loop, dispatch ahead (bench decode)", loop),
               ("one program forward + lean sampler, synchronous", fused_sync),
               ("one program, dispatch ahead", fused_loop)]
    best = {n: math.inf for n, _ in timed + special}
    for _, f in timed:
        f()
    for _, f in special:
        f()
    for _ in range(rounds):
        for n, f in timed:
            for _ in range(calls):
                t = time.perf_counter()
                f()
                best[n] = min(best[n], time.perf_counter() - t)
        for n, f in special:
            for _ in range(calls):
                t = time.perf_counter()
                r = f()
                best[n] = min(best[n], r if r is not None else time.perf_counter() - t)
    return best


def run(args) -> int:
    from serving.bench_decode import measure_bandwidth, param_bytes_per_token

    if args.config:
        from model.config import named_config
        from model.decoder import init_params
        config = named_config(args.config, dtype=args.dtype)
        params = init_params(config)
        if args.quantize:
            from model.quantize import quantize_params
            params = quantize_params(config, params)
        name = args.config
    else:
        from checkpoints.loader import load_model
        config, params, _ = load_model(args.model, dtype=args.dtype, quantize=args.quantize)
        name = args.model
    load = [os.getloadavg()[0]]
    bw = measure_bandwidth()
    best = waterfall(config, params, args.prompt_len, args.new_tokens, args.rounds, args.calls,
                     args.against)
    bw = max(bw, measure_bandwidth())
    load.append(os.getloadavg()[0])
    nbytes = param_bytes_per_token(config, params)
    floor = nbytes / bw
    if args.json:
        print(json.dumps({"model": name, "bandwidth_gb_s": bw / 1e9, "load_average": load,
                          "roofline_s": floor, "pieces_s": best}, indent=2))
        return 0
    print(f"model {name}: {nbytes / 1e6:.0f} MB per token, bandwidth {bw / 1e9:.1f} GB/s, "
          f"roofline {1e3 * floor:.2f} ms a token; load average {load[0]:.1f} / {load[1]:.1f}")
    prev = None
    for n, s in best.items():
        step = "" if prev is None else f"  {1e3 * (s - prev):+6.2f} ms"
        print(f"  {n:<52} {1e3 * s:7.2f} ms{step}  {100 * floor / s:5.1f}% of roofline")
        prev = s
    return 0


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="flaxserve bench waterfall",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
