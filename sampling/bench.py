"""`flaxserve bench sampling`: the cost of the sampler, every stage on vs every stage off.

Times the jitted `sample` on [slots, vocab] random logits (warm-up excluded,
block_until_ready), once with rows that use every stage and once with plain
temperature-1 rows, and optionally one decode step of the 100M bench model at the same
batch for scale: the sampler should cost less than the step it rides in.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from sampling.params import SamplingParams
from sampling.rows import make_rows
from sampling.sampler import sample
from sampling.state import init_state, reset_row

ALL_ON = dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, typical_p=0.95,
              epsilon_cutoff=1e-4, eta_cutoff=1e-4, top_n_sigma=3.0, xtc_probability=0.5,
              xtc_threshold=0.1, dynatemp_range=0.2, repetition_penalty=1.1,
              presence_penalty=0.3, frequency_penalty=0.3, dry_multiplier=0.8,
              no_repeat_ngram_size=3, logit_bias={1: 2.0, 2: -2.0}, min_tokens=1,
              logprobs=True, top_logprobs=5, return_entropy=True)


def add_arguments(parser) -> None:
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--history", type=int, default=256, help="tokens of history per row")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--compare-step", action="store_true",
                        help="also time one decode step of the qwen3-100m model at --slots")
    parser.add_argument("--json", action="store_true")


def _time(fn, iters: int) -> float:
    jax.block_until_ready(fn())
    t = time.perf_counter()
    for _ in range(iters):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / iters


def time_sampler(slots: int, vocab: int, history: int, params: SamplingParams, iters: int) -> float:
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((slots, vocab), np.float32) * 3)
    rows = jax.tree.map(jnp.asarray, make_rows([params] * slots, vocab, list(range(slots)),
                                               [0] * slots, eos_ids=(0,)))
    max_len = history + 8
    state = init_state(slots, vocab, max_len)
    one = make_rows([params], vocab, [0], [0])
    reset = jax.jit(reset_row)
    for s in range(slots):
        prompt = np.zeros(max_len, np.int32)
        prompt[:history] = rng.integers(0, vocab, history)
        state = reset(state, s, prompt, history, one)
    fn = jax.jit(lambda l, r, st: sample(l, r, st, num_top=20, custom_order=False)[0])
    return _time(lambda: fn(logits, rows, state), iters)


def time_decode_step(slots: int, iters: int) -> float:
    from model.config import named_config
    from model.decoder import forward, init_cache, init_params

    cfg = named_config("qwen3-100m")
    params = init_params(cfg)
    cache = init_cache(cfg, slots, 256)
    tokens = jnp.zeros((slots, 1), jnp.int32)
    pos = jnp.full((slots, 1), 128, jnp.int32)
    fn = jax.jit(lambda p, c: forward(cfg, p, c, tokens, pos)[0])
    return _time(lambda: fn(params, cache), max(2, iters // 3))


def run(args) -> int:
    if args.slots < 1 or args.vocab < 2 or args.iters < 1 or args.history < 1:
        raise ValueError("--slots, --vocab, --iters and --history must be positive")
    off = time_sampler(args.slots, args.vocab, args.history, SamplingParams(), args.iters)
    on = time_sampler(args.slots, args.vocab, args.history, SamplingParams(**ALL_ON), args.iters)
    result = {"slots": args.slots, "vocab": args.vocab, "history": args.history,
              "all_off_ms": off * 1e3, "all_on_ms": on * 1e3, "on_over_off": on / off}
    if args.compare_step:
        step = time_decode_step(args.slots, args.iters)
        result["decode_step_ms"] = step * 1e3
        result["all_on_over_step"] = on / step
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"sampler on [{args.slots}, {args.vocab}] logits, {args.history} tokens of history")
    print(f"  all stages off: {off * 1e3:8.2f} ms")
    print(f"  all stages on:  {on * 1e3:8.2f} ms  ({on / off:.2f}x off)")
    if args.compare_step:
        print(f"  qwen3-100m decode step at batch {args.slots}: {result['decode_step_ms']:.2f} ms "
              f"(all-on sampler = {result['all_on_over_step']:.2f} of a step)")
    return 0
