"""`flaxserve bench grammar`: what constrained decoding costs per token.

Loops over the same engine and batch, timed per step: unconstrained (dispatch step N+1,
then read step N: the device never waits), constrained as the scheduler runs it (dispatch
step N+1's forward pass, read step N, feed every row's token to its llguidance matcher and
fill the rows' bitmasks on the host while the forward runs, then dispatch N+1's sampler
with the mask) and constrained without that overlap (read, fill, dispatch the whole step).
The difference is the whole price: host mask fill, the upload, the lost overlap. The host
fill time is also reported alone.

The vocabulary matters for the mask cost, so the model's vocabulary is covered by a real
byte-level BPE tokenizer trained here in seconds on Python's own standard library sources
(random weights do not care which tokenizer names their rows).
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
import time

import numpy as np

from serving.flags import int_list

SCHEMA = {"type": "object", "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 40},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 16},
                                  "maxItems": 8}}}


def add_arguments(parser) -> None:
    parser.add_argument("--config", default="qwen3-100m", help="named config, random weights")
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=24, help="timed decode steps per loop")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


class _BpeTokenizer:
    """The few members sampling.grammar needs, over a `tokenizers` BPE model."""

    def __init__(self, vocab_size: int):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
        files = files[:300] if vocab_size > 4096 else files[:30]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train(files, trainer)
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.eos_id, self.bos_id = 0, None
        self.special_ids = frozenset({0})
        self.stop_ids = frozenset({0})
        byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
        self._bytes = [bytes(byte_decoder[c] for c in tok.id_to_token(i))
                       if i else b"<eos>" for i in range(self.vocab_size)]

    def token_bytes(self, i: int) -> bytes:
        return self._bytes[i]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text).ids


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def constrained(engine, fresh, compiler, grammar, sampling, batch, steps, overlap):
    """ms per constrained step, and the seconds spent filling masks on the host."""
    from sampling.grammar import all_ones

    fresh()
    cons = [compiler.constraint(grammar, sampling) for _ in range(batch)]
    mask = all_ones(batch, compiler.vocab_size)
    for slot, c in enumerate(cons):
        c.fill(mask[slot])
    fill_s = 0.0
    pending = engine.step(mask)
    t0 = time.perf_counter()
    for _ in range(steps):
        forward = engine.forward_step() if overlap else None
        out = pending.result()
        f0 = time.perf_counter()
        for slot, c in enumerate(cons):
            c.consume(int(out.tokens[slot]))
            c.fill(mask[slot])
        fill_s += time.perf_counter() - f0
        pending = (engine.sample_step(forward, mask) if overlap else engine.step(mask))
    pending.result()
    return 1e3 * (time.perf_counter() - t0) / steps, fill_s


def _measure(engine, fresh, compiler, grammar, sampling, batch, steps):
    """One pass over the three loops: (unconstrained ms per step, constrained serial ms
    per step, its host fill s, constrained overlapped ms per step, its host fill s)."""
    # unconstrained: dispatch ahead
    fresh()
    pending = engine.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = engine.step()
        pending.result()
        pending = nxt
    pending.result()
    free_ms = 1e3 * (time.perf_counter() - t0) / steps
    # constrained, serial: read step N, fill, dispatch step N+1 with the mask
    serial_ms, serial_fill = constrained(engine, fresh, compiler, grammar, sampling, batch,
                                         steps, overlap=False)
    # constrained, as the scheduler runs it: dispatch N+1's forward, read N and fill
    # while it runs, then dispatch N+1's sampler with the mask
    masked_ms, fill_s = constrained(engine, fresh, compiler, grammar, sampling, batch, steps,
                                    overlap=True)
    return free_ms, serial_ms, serial_fill, masked_ms, fill_s


def run(args) -> int:
    import jax

    from model.config import named_config
    from model.decoder import init_params
    from sampling.grammar import GrammarCompiler
    from sampling.params import SamplingParams
    from serving.engine.device import DeviceEngine, compile_count

    batches = int_list(args.batch, "--batch")
    if args.steps < 4:
        raise ValueError(f"--steps must be >= 4, got {args.steps}")
    config = named_config(args.config)
    params = init_params(config, seed=0)
    tok = _BpeTokenizer(config.vocab_size)
    compiler = GrammarCompiler(tok, config.vocab_size, tok.stop_ids)
    sampling = SamplingParams(temperature=1.0, guided_json=SCHEMA, seed=0)
    grammar = compiler.check(sampling)
    prompt = np.arange(1, 33, dtype=np.int32)
    rows = []
    for batch in batches:
        engine = DeviceEngine(config, params, max_slots=batch,
                              max_len=len(prompt) + args.steps * 2 + 8,
                              prefill_buckets=(len(prompt),), num_top_logprobs=0)

        def fresh():
            for slot in range(batch):
                engine.insert(slot, prompt, 0, sampling, seed=slot, sample_index=slot).result()

        # a first, untimed pass compiles exactly what the timed one runs (a full warm-up
        # would also compile every program the loops never call)
        _measure(engine, fresh, compiler, grammar, sampling, batch, args.steps)
        before = compile_count()
        free_ms, serial_ms, serial_fill, masked_ms, fill_s = _measure(
            engine, fresh, compiler, grammar, sampling, batch, args.steps)
        rows.append({"batch": batch, "unconstrained_step_ms": free_ms,
                     "constrained_step_ms": masked_ms,
                     "constrained_serial_step_ms": serial_ms,
                     "host_fill_ms_per_row": 1e3 * (fill_s + serial_fill) / 2 / args.steps
                     / batch,
                     "overhead_ms_per_token": (masked_ms - free_ms) / batch,
                     "compiled_while_timed": compile_count() - before})
        jax.clear_caches()
    report = {"config": args.config, "vocab_size": config.vocab_size, "runs": rows}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"constrained decoding (llguidance JSON schema) on {args.config}, vocab "
          f"{config.vocab_size}, {args.steps} steps")
    for r in rows:
        print(f"batch {r['batch']:3d}: step {r['unconstrained_step_ms']:8.2f} ms unconstrained, "
              f"{r['constrained_step_ms']:8.2f} ms constrained "
              f"({r['constrained_step_ms'] / r['unconstrained_step_ms']:.2f}x; "
              f"{r['constrained_serial_step_ms']:.2f} ms without overlap); host mask fill "
              f"{r['host_fill_ms_per_row']:.3f} ms per row; +{r['overhead_ms_per_token']:.2f} ms "
              "per token")
    return 0
