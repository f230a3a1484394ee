"""`flaxserve generate`: one prompt, in process, no servers.

It drives the same `DeviceEngine` the batch server uses (one slot), so what a researcher
sees here is what the server does. Every sampling parameter is a flag named after its
`SamplingParams` field with dashes (`--top-k`, `--repetition-penalty`, ...); the flags are
derived from the dataclass, so a new parameter needs no change here.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import sys

import numpy as np

# Fields handled by dedicated flags of this command rather than the generic ones.
_OWN_FLAGS = {"max_tokens", "seed", "logprobs", "top_logprobs", "n", "best_of", "speculative"}


def _field_type(field):
    hint = field.type if not isinstance(field.type, str) else field.type
    return str(hint)


def _parse_list(text: str):
    text = text.strip()
    if text.startswith("[") or text.startswith("{"):
        return json.loads(text)
    return [x for x in text.split(",") if x != ""]


def _add_sampling_flags(parser) -> None:
    from sampling.params import SamplingParams

    group = parser.add_argument_group("sampling (see SAMPLING.md)")
    for field in dataclasses.fields(SamplingParams):
        if field.name in _OWN_FLAGS:
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = _field_type(field)
        if "bool" in kind and "list" not in kind and "dict" not in kind:
            group.add_argument(flag, dest=field.name, action="store_true", default=None)
        elif "dict" in kind or "list" in kind:
            group.add_argument(flag, dest=field.name, default=None, metavar="JSON|a,b",
                               help="JSON, or a comma-separated list")
        elif "float" in kind:
            group.add_argument(flag, dest=field.name, type=float, default=None)
        elif "int" in kind:
            group.add_argument(flag, dest=field.name, type=int, default=None)
        else:
            group.add_argument(flag, dest=field.name, default=None)


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="default",
                        help="model reference: default (bundled), smollm2, a Hugging Face or orbax "
                             "dir, a .gguf file, or a Hub id org/name[@revision]")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (tokenized with the model's tokenizer)")
    prompt.add_argument("--prompt-ids", help="comma-separated prompt token ids")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=None, help="default: drawn and reported")
    parser.add_argument("--logprobs", type=int, default=None, metavar="K",
                        help="report each token's logprob and the top K alternatives")
    parser.add_argument("--dtype", default=None)
    from serving.flags import add_quantize_argument
    add_quantize_argument(parser)
    from serving.flags import add_decode_steps_argument
    add_decode_steps_argument(parser)
    parser.add_argument("--compile-cache", default=None, metavar="DIR",
                        help="persistent XLA compilation cache (default: "
                             "$JAX_COMPILATION_CACHE_DIR, else ~/.cache/flaxserve/xla; "
                             "'' turns it off)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--speculative", choices=("ngram", "draft"), default=None,
                        help="exact speculative decoding (docs/speed.md): ngram = prompt "
                             "lookup, draft = --draft-model proposes")
    parser.add_argument("--num-speculative-tokens", type=int, default=4, metavar="K",
                        help="draft tokens verified per target forward")
    parser.add_argument("--draft-model", default=None,
                        help="model reference of the draft (same tokenizer) for "
                             "--speculative draft")
    _add_sampling_flags(parser)


def sampling_from_args(args, vocab_size: int):
    """SamplingParams from the parsed flags; invalid values raise ValueError naming them."""
    from sampling.params import SamplingParams

    values = {}
    for field in dataclasses.fields(SamplingParams):
        if field.name in _OWN_FLAGS:
            continue
        value = getattr(args, field.name, None)
        if value is None:
            continue
        kind = _field_type(field)
        if isinstance(value, str) and ("dict" in kind or "list" in kind):
            try:
                value = _parse_list(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"--{field.name.replace('_', '-')}: invalid JSON ({e})") from None
            if "dict" in kind and isinstance(value, dict):
                value = {int(k) if str(k).lstrip("-").isdigit() else k: v for k, v in value.items()}
            elif "list[int]" in kind:
                value = [int(v) for v in value]
        values[field.name] = value
    values["max_tokens"] = args.max_tokens
    if args.logprobs is not None:
        values["logprobs"] = True
        values["top_logprobs"] = args.logprobs
    try:
        return SamplingParams.from_dict(values).validate(vocab_size)
    except ValueError as e:
        raise ValueError(f"{e} (flag --{_first_field(str(e))})") from None


def _first_field(message: str) -> str:
    word = message.split()[0].strip(":'\"")
    return word.replace("_", "-")


def generate(engine, tokenizer, prompt_ids, sampling, seed: int, stop_ids=()):
    """Run one request to completion on `engine`; returns (token_ids, outputs per token)."""
    chunk = engine.prefill_buckets[-1]
    start = 0
    while len(prompt_ids) - start > chunk and not sampling.deterministic:  # insert grids it
        engine.prefill_chunk(0, prompt_ids[start:start + chunk], start)
        start += chunk
    out = engine.insert(0, prompt_ids, start, sampling, seed).result()
    tokens, records = [], []
    stops = set(sampling.stop_token_ids or ())
    if not sampling.ignore_eos:
        stops |= set(stop_ids)
    max_tokens = min(sampling.max_tokens or engine.max_len, engine.max_len - len(prompt_ids))
    # multi-step decode (engine decode_steps > 1, serving/engine/multi_step.py): the device
    # stops the row where this loop would
    k = getattr(engine, "decode_steps", 1)
    multi = k > 1 and engine.multi_step_ok() and len(stops) <= engine.max_stop_ids
    row, ready = 0, [out]
    while True:
        out = ready.pop(0)
        if out.errors[row]:
            raise ValueError("sampling failed: every token was masked for this request")
        tok = int(out.tokens[row])
        tokens.append(tok)
        records.append((tok, float(out.logprobs[row]), out.top_ids[row], out.top_logprobs[row]))
        if len(tokens) >= max_tokens or (tok in stops and len(tokens) > (sampling.min_tokens or 0)):
            break
        if not ready and multi:
            from serving.engine.multi_step import stop_rows
            left = {row: (max_tokens - len(tokens), (sampling.min_tokens or 0) - len(tokens),
                          stops)}
            res = engine.multi_step(k, *stop_rows(engine.max_slots, engine.max_stop_ids,
                                                  left)).result()
            ready = [step for step, wrote in zip(res.steps, res.wrote[:, row]) if wrote]
        elif not ready:
            ready = [engine.step().result()]
    engine.release(0)
    return tokens, records


def run(args) -> int:
    from checkpoints.loader import load_model
    from serving.engine.device import DeviceEngine

    if args.max_tokens < 1:
        raise ValueError("--max-tokens must be >= 1")
    from serving.warmup import configure_compile_cache
    configure_compile_cache(getattr(args, "compile_cache", None))
    config, params, model_dir = load_model(args.model, dtype=args.dtype, quantize=args.quantize)
    tokenizer = None
    try:
        from checkpoints.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(model_dir)
    except (ValueError, OSError):
        if args.prompt is not None:
            raise ValueError(f"--prompt needs a tokenizer, and none was found in {model_dir}; "
                             "use --prompt-ids") from None
    if args.prompt is not None:
        prompt_ids = tokenizer.encode(args.prompt)
    else:
        try:
            prompt_ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise ValueError("--prompt-ids must be comma-separated integers") from None
        bad = [t for t in prompt_ids if not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(f"--prompt-ids: ids {bad[:5]} are outside the vocabulary "
                             f"[0, {config.vocab_size})")
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    sampling = sampling_from_args(args, config.vocab_size)
    seed = args.seed if args.seed is not None else secrets.randbits(63)
    need = len(prompt_ids) + args.max_tokens
    if need > config.max_position_embeddings:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + --max-tokens ({args.max_tokens}) "
                         f"exceeds the model's context of {config.max_position_embeddings}")
    if getattr(args, "speculative", None):
        from serving.speculative import run_cli
        return run_cli(args, config, params, tokenizer, prompt_ids, sampling, seed)
    max_len = min(config.max_position_embeddings, max(32, 1 << (need - 1).bit_length()))
    steps = getattr(args, "decode_steps", None) or 1
    if steps < 1:
        raise ValueError(f"--decode-steps must be >= 1, got {steps}")
    engine = DeviceEngine(config, params, max_slots=1, max_len=max_len,
                          num_top_logprobs=max(args.logprobs or 0, 1),
                          token_limit=tokenizer.vocab_size if tokenizer else None,
                          decode_steps=steps)
    stop_ids = set(config.eos_token_ids)
    if tokenizer is not None:
        stop_ids |= set(tokenizer.stop_ids)
    tokens, records = generate(engine, tokenizer, np.asarray(prompt_ids, np.int32), sampling,
                               seed, stop_ids)
    text = tokenizer.decode(tokens) if tokenizer is not None else None
    if args.json:
        result = {"token_ids": tokens, "text": text, "seed": seed}
        if args.logprobs is not None:
            k = args.logprobs
            result["logprobs"] = [
                {"token_id": tok, "logprob": lp,
                 "top_logprobs": [{"token_id": int(i), "logprob": float(l)}
                                  for i, l in zip(top_ids[:k], top_lps[:k])]}
                for tok, lp, top_ids, top_lps in records]
        print(json.dumps(result))
    else:
        print(text if text is not None else ",".join(map(str, tokens)))
        print(f"[seed {seed}]", file=sys.stderr)
    return 0
