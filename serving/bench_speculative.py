"""`flaxserve bench speculative`: speculative vs plain decoding at batch 1, same prompt.

Prompt lookup pays off where the output copies its input, so the default prompt is
extractive: a passage and the instruction to quote it. Both runs are greedy, so their
texts must be identical (printed as a check, not assumed); the figures are decode tokens/s
as `bench decode` times them, (time for N tokens - time for 1) / (N - 1), so the prompt's
prefill is excluded (best of two runs after a warm-up run of each), the whole request's
tokens/s, the ratios, the draft acceptance rate and the tokens emitted per target forward.
"""

from __future__ import annotations

import json
import time

import numpy as np

from serving.flags import int_list

PASSAGE = (
    "The lighthouse at Point Reyes was built in 1870 and stands on a rocky ledge three "
    "hundred feet above the Pacific Ocean. Its first-order Fresnel lens, made in France, "
    "has over a thousand pieces of glass and could be seen twenty-four miles out to sea. "
    "Keepers climbed three hundred steps every evening to wind the clockwork that turned "
    "the lens, and they scraped fog-blown salt from the windows by hand. The light was "
    "automated in 1975, and the old lens still turns today for visitors who make the climb.")
INSTRUCTION = "Repeat the passage above exactly, word for word, and nothing else."


def add_arguments(parser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--model", default=None,
                     help="model reference (default: smollm2, a real instruct model that can "
                          "quote)")
    src.add_argument("--config", help="a named config with random weights, e.g. qwen3-100m "
                     "(the prompt is then the passage's token ids repeated)")
    parser.add_argument("--method", choices=("ngram", "draft"), default="ngram")
    parser.add_argument("--draft-model", default=None, help="for --method draft")
    parser.add_argument("--num-speculative-tokens", default="4", metavar="K[,K...]",
                        help="comma-separated draft lengths to try")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt", default=None, help="a prompt instead of the passage")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--k-mode", choices=("adaptive", "fixed", "both"), default="adaptive",
                        help="ngram: K as the cap of adaptive K (default), K fixed, or both "
                             "(draft: always fixed)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed rounds (each runs every configuration once, interleaved)")
    parser.add_argument("--profile", action="store_true",
                        help="also time the verify's parts: the forward over 1 and K+1 "
                             "positions, the acceptance alone, the whole verify program")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--serving", action="store_true",
                        help="through the batch server instead (an in-process engine over "
                             "gRPC, concurrency 1): requests with speculative {method, K} vs "
                             "speculative null (serving/engine/spec_jobs.py)")


def _prompt(args, tokenizer, vocab_size: int) -> list[int]:
    if tokenizer is None:
        rng = np.random.default_rng(0)
        passage = rng.integers(0, vocab_size, 96).tolist()
        return passage + passage[:8]
    text = args.prompt or f"{PASSAGE}\n\n{INSTRUCTION}"
    template = getattr(tokenizer, "chat_template", None)
    if template and not args.prompt:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        text = env.from_string(template).render(
            messages=[{"role": "user", "content": text}], add_generation_prompt=True)
    return tokenizer.encode(text)


def _timed(fn, repeats: int = 2):
    """fn's result and its best wall time over `repeats` runs, after a warm-up run (which
    compiles what the timed runs need)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def _interleaved(fns: dict, repeats: int = 2) -> dict:
    """{name: (result, best seconds)}: one warm-up round, then `repeats` rounds that run
    every fn once in turn, so a load change on a shared machine hits all of them alike."""
    for fn in fns.values():
        fn()
    best = {name: (None, float("inf")) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            out = fn()
            s = time.perf_counter() - t
            if s < best[name][1]:
                best[name] = (out, s)
    return best


def _runs(args, ks):
    """(label, K, adaptive) of every speculative run `--k-mode` asks for."""
    modes = {"adaptive": (True,), "fixed": (False,), "both": (False, True)}[args.k_mode]
    if args.method == "draft":
        modes = (False,)
    return [(f"{args.method} K={k}{' adaptive' if a else ''}", k, a)
            for k in ks for a in modes]


def run(args) -> int:
    from sampling.params import SamplingParams
    from serving.engine.device import DeviceEngine
    from serving.generate import generate
    from serving.speculative import SpeculativeDecoder, cache_len, load_draft

    ks = int_list(args.num_speculative_tokens, "--num-speculative-tokens")
    if args.max_tokens < 2:
        raise ValueError("--max-tokens must be >= 2")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    tokenizer = None
    if args.config:
        from model.config import named_config
        from model.decoder import init_params
        config = named_config(args.config, dtype=args.dtype)
        params, name = init_params(config), args.config
    else:
        from checkpoints.loader import load_model
        from checkpoints.tokenizer import load_tokenizer
        name = args.model or "smollm2"
        config, params, model_dir = load_model(name, dtype=args.dtype)
        try:
            tokenizer = load_tokenizer(model_dir)
        except (ValueError, OSError):
            tokenizer = None
    draft = load_draft(args.draft_model, args.dtype) if args.method == "draft" else (None, None)
    if args.method == "draft" and not args.draft_model:
        raise ValueError("--method draft needs --draft-model")
    prompt = _prompt(args, tokenizer, config.vocab_size)
    if getattr(args, "serving", False):
        return _run_serving(args, name, config, params, tokenizer, prompt, draft, ks)
    stop_ids = set(config.eos_token_ids) | set(tokenizer.stop_ids if tokenizer else ())
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    max_len = cache_len(config, len(prompt), args.max_tokens, max(ks))
    limit = tokenizer.vocab_size if tokenizer else None
    engine = DeviceEngine(config, params, max_slots=1, max_len=max_len, num_top_logprobs=1,
                          token_limit=limit)
    ids = np.asarray(prompt, np.int32)
    one = SamplingParams(temperature=0.0, max_tokens=1)
    fns = {"plain": lambda: generate(engine, tokenizer, ids, greedy, 0, stop_ids)[0],
           "plain/1": lambda: generate(engine, tokenizer, ids, one, 0, stop_ids)[0]}
    decoders = {}
    for label, k, adaptive in _runs(args, ks):
        dec = SpeculativeDecoder(config, params, method=args.method, num_tokens=k,
                                 max_len=max_len, draft_config=draft[0], draft_params=draft[1],
                                 token_limit=limit, adaptive=adaptive)
        decoders[label] = dec
        fns[label] = lambda dec=dec: dec.generate(ids, greedy, 0, stop_ids)
        fns[label + "/1"] = lambda dec=dec: dec.generate(ids, one, 0, stop_ids)
    timed = _interleaved(fns, repeats=args.repeats)
    plain, plain_s = timed["plain"]
    plain_1 = timed["plain/1"][1]
    decode = tokenizer.decode if tokenizer else (lambda t: ",".join(map(str, t)))
    if len(plain) < 2:
        raise ValueError("the model stopped after one token; use a longer --max-tokens or "
                         "another --prompt")
    plain_tps = (len(plain) - 1) / max(plain_s - plain_1, 1e-9)
    result = {"model": name, "method": args.method, "prompt_tokens": len(prompt),
              "plain": {"tokens": len(plain), "seconds": plain_s, "first_token_s": plain_1,
                        "decode_tokens_s": plain_tps, "request_tokens_s": len(plain) / plain_s},
              "runs": []}
    if not args.json:
        print(f"model {name}, prompt {len(prompt)} tokens, greedy, batch 1 (best of "
              f"{args.repeats} interleaved rounds after a warm-up round)")
        print(f"{'plain':22s} {len(plain):4d} tokens in {plain_s:6.2f} s (first "
              f"{plain_1:5.2f} s) = {plain_tps:7.1f} decode tokens/s, "
              f"{len(plain) / plain_s:6.1f} per request second", flush=True)
    for label, k, adaptive in _runs(args, ks):
        r, s = timed[label]
        s1 = timed[label + "/1"][1]
        n = len(r.token_ids)
        tps = (n - 1) / max(s - s1, 1e-9) if n > 1 else 0.0
        steps = max(r.verify_steps, 1)
        entry = {"num_tokens": k, "adaptive": adaptive, "tokens": n, "seconds": s,
                 "first_token_s": s1, "decode_tokens_s": tps, "speedup": tps / plain_tps,
                 "request_speedup": (n / s) / (len(plain) / plain_s),
                 "identical": r.token_ids == plain, "acceptance_rate": r.acceptance_rate,
                 "tokens_per_target_pass": n / (r.verify_steps + 1),
                 "mean_k": r.proposed / steps, "k_trace": r.k_trace,
                 "ms_per_verify": {p: 1e3 * t / steps for p, t in r.timings.items()}}
        result["runs"].append(entry)
        if not args.json:
            ms = entry["ms_per_verify"]
            print(f"{label:22s} {n:4d} tokens in {s:6.2f} s (first {s1:5.2f} s) = "
                  f"{tps:7.1f} decode tokens/s  {entry['speedup']:.2f}x (request "
                  f"{entry['request_speedup']:.2f}x)  identical text: "
                  f"{'yes' if entry['identical'] else 'NO'}  acceptance "
                  f"{100 * r.acceptance_rate:.0f}%  {entry['tokens_per_target_pass']:.2f} "
                  f"tokens per target pass, mean K {entry['mean_k']:.1f}; per verify: "
                  f"draft {ms['draft']:.2f} ms, verify program {ms['verify']:.1f} ms, "
                  f"emit {ms['emit']:.2f} ms", flush=True)
    if args.profile:
        result["profile"] = _profile(config, params, decoders, ids, plain, max_len, args.json)
    result["text"] = decode(plain)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"text: {result['text'][:300]!r}")
    return 0


def _profile(config, params, decoders, ids, plain, max_len, quiet) -> dict:
    """Where a verify's time goes: the target forward alone over 1 and over K+1 positions
    (the attention bucket of the middle of the output), the acceptance program alone, and
    the verify program (forward + acceptance, one host read), best of 5 each."""
    from functools import partial

    import jax
    import jax.numpy as jnp

    from model.decoder import forward, init_cache
    from sampling.params import SamplingParams
    from sampling.rows import make_rows
    from sampling.state import init_state
    from serving import speculative as S

    @partial(jax.jit, donate_argnums=(1,), static_argnums=(4,))
    def fwd(params, cache, tokens, pos, attend):
        positions = pos + jnp.arange(tokens.shape[0])
        logits, cache = forward(config, params, cache, tokens[None], positions[None],
                                attend_len=attend)
        return cache, logits[0]

    def best(fn, reps=5):
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 1e3 * min(times)

    greedy = SamplingParams(temperature=0.0)
    history = list(ids) + list(plain)
    pos = len(ids) + len(plain) // 2
    holder = {"cache": init_cache(config, 1, max_len)}
    out = {}
    ks = sorted({b for d in decoders.values() for b in d.ladder} | {0})
    any_dec = next(iter(decoders.values()), None)
    token_limit = any_dec.token_limit if any_dec else config.vocab_size
    for k in ks:
        tokens = np.asarray(history[pos:pos + k + 1], np.int32)
        attend = min(max(128, 1 << (pos + k).bit_length()), max_len)

        def run_fwd():
            holder["cache"], logits = fwd(params, holder["cache"], tokens, np.int32(pos), attend)
            logits.block_until_ready()
        row = {"forward_ms": best(run_fwd)}
        if k:
            st = S._Static(config, None, max_len, token_limit, 0)   # as the decoders use
            rows = jax.tree.map(jnp.asarray, make_rows([greedy] * (k + 1), config.vocab_size,
                                                       [0] * (k + 1), [0] * (k + 1)))
            state = init_state(k + 1, config.vocab_size, 1)
            logits = jnp.zeros((k + 1, config.vocab_size), jnp.float32)
            accept = jax.jit(lambda lg, d, r, s: S._accept(st, lg, d, r, s, np.int32(pos), True))
            row["accept_ms"] = best(lambda: jax.device_get(accept(logits, tokens[1:], rows,
                                                                   state)))

            def run_verify():
                holder["cache"], *o = S._verify(st, holder["cache"], params, tokens,
                                                np.int32(pos), rows, state, attend, True)
                jax.device_get(o)
            row["verify_ms"] = best(run_verify)
        out[k] = row
    draft_ms = best(lambda: [S.spec.propose_ngram(history[:pos + 1], max(ks) or 1)
                             for _ in range(10)]) / 10
    one = out[0]["forward_ms"]
    if not quiet:
        print(f"profile at position {pos}: n-gram lookup on the host {draft_ms:.3f} ms; "
              f"one decode step (forward over 1 position) {one:.1f} ms")
        for k in ks[1:]:
            r = out[k]
            print(f"  K={k:<2} forward over {k + 1:2d} positions {r['forward_ms']:6.1f} ms "
                  f"({r['forward_ms'] / one:.2f} steps)  acceptance alone "
                  f"{r['accept_ms']:5.2f} ms  verify program {r['verify_ms']:6.1f} ms "
                  f"({r['verify_ms'] / one:.2f} steps)", flush=True)
    return {"position": pos, "ngram_lookup_ms": draft_ms, "by_k": out}


def _run_serving(args, name, config, params, tokenizer, prompt, draft, ks) -> int:
    """`--serving`: the same comparison through the batch server (gRPC, one request at a
    time): each request's tokens/s, prefill included, best of two after a warm-up."""
    from serving.client import EngineClient
    from serving.engine.server import start_in_process
    from serving.engine.spec_jobs import SpecConfig
    from serving.speculative import cache_len

    max_len = cache_len(config, len(prompt), args.max_tokens, max(ks))
    buckets = tuple(b for b in (32, 64, 128, 256, 512, 1024, 2048) if b <= max_len)
    srv = start_in_process(config, params, max_slots=2, max_len=max_len, tokenizer=tokenizer,
                           prefill_buckets=buckets, prefix_cache=False,
                           speculative=SpecConfig(draft=draft if draft[0] is not None
                                                  else None))
    client = EngineClient(f"127.0.0.1:{srv.port}")
    greedy = {"temperature": 0.0, "max_tokens": args.max_tokens}
    try:
        def request(spec):
            g = client.generate(prompt, dict(greedy, speculative=spec))
            return g.choices[0].token_ids, g.choices[0].text, g.usage
        (plain, text, _), plain_s = _timed(lambda: request(None))
        result = {"model": name, "method": args.method, "prompt_tokens": len(prompt),
                  "serving": True, "plain": {"tokens": len(plain), "seconds": plain_s,
                                             "request_tokens_s": len(plain) / plain_s},
                  "runs": []}
        if not args.json:
            print(f"model {name}, prompt {len(prompt)} tokens, greedy, through the batch "
                  f"server (gRPC, concurrency 1)")
            print(f"plain:       {len(plain):4d} tokens in {plain_s:6.2f} s = "
                  f"{len(plain) / plain_s:7.1f} tokens/s", flush=True)
        for k in ks:
            (toks, spec_text, usage), s = _timed(
                lambda: request({"method": args.method, "num_tokens": k}))
            u = usage.speculative
            rate = u.accepted_tokens / u.draft_tokens if u.draft_tokens else 0.0
            entry = {"num_tokens": k, "tokens": len(toks), "seconds": s,
                     "request_tokens_s": len(toks) / s,
                     "speedup": (len(toks) / s) / (len(plain) / plain_s),
                     "identical": toks == plain and spec_text == text,
                     "acceptance_rate": rate, "ran_speculative": usage.HasField("speculative"),
                     "tokens_per_target_pass": len(toks) / (u.verify_steps + 1)}
            result["runs"].append(entry)
            if not args.json:
                print(f"{args.method} K={k:<2}:  {len(toks):4d} tokens in {s:6.2f} s = "
                      f"{entry['request_tokens_s']:7.1f} tokens/s  {entry['speedup']:.2f}x  "
                      f"identical text: {'yes' if entry['identical'] else 'NO'}  acceptance "
                      f"{100 * rate:.0f}%  {entry['tokens_per_target_pass']:.2f} tokens per "
                      f"target pass", flush=True)
        result["text"] = text
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"text: {text[:300]!r}")
    finally:
        client.close()
        srv.stop(grace_s=5)
    return 0
