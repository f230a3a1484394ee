"""A/B in one process (docs/speed.md, "Later turns and later chunks"): a chunk after a
cached prefix over its chunk span (DeviceEngine.chunk_spans, new) against the whole row
(old), alternated, on the engine as `serve` configures it (paged, max_len 2048).

    python -m serving.bench_chunk_spans [MODEL]     (default smollm2; REPS=6, ALL=1:
                                                     also compile every lazy span program)
"""
import argparse
import os
import resource
import sys
import time

import numpy as np

from checkpoints.loader import load_model
from serving.engine.device import DeviceEngine
from serving.engine.main import kv_engine_args

model = sys.argv[1] if len(sys.argv) > 1 else "smollm2"
config, params, _ = load_model(model, dtype="float32")
max_len = min(config.max_position_embeddings, 2048)
kv = kv_engine_args(argparse.Namespace(), config, 4, max_len)
eng = DeviceEngine(config, params, max_slots=4, max_len=max_len, **kv)
eng._warmed = True
print("model", model, "max_len", max_len, "buckets", eng.prefill_buckets, "kv", kv.get("num_blocks"))
lazy = [(b, a) for b in eng.prefill_buckets for a in eng.chunk_spans[b] if a != eng.prefix_spans.get(b)]
print(f"span programs: {sum(map(len, eng.chunk_spans.values()))} "
      f"({len(eng.prefix_spans)} eager, {len(lazy)} compiled on first want)")
eng.set_blocks(0, range(1, 1 + max_len // eng.block_size))
rng = np.random.default_rng(0)
prompt = rng.integers(0, config.vocab_size, 700).astype(np.int32)
cases = [("turn 2: 72 after 288", 288, 72), ("turn 3: 90 after 560", 560, 90),
         ("600-token prompt, 2nd chunk: 88 after 512", 512, 88)]
# the prefix: 560 tokens, fresh 512 then 48 (whatever programs; written once, kept)
eng.prefill_chunk(0, prompt[:512], 0)
eng.prefill_chunk(0, prompt[512:560], 512)

def chunk(start, n, new):
    args = eng._chunk_args(0, prompt[start:start + n], start)
    t = time.perf_counter()
    eng.state, logits = eng._prefill(eng.params, eng.state, eng._tables_arg(), *args)
    logits = np.asarray(logits)
    return time.perf_counter() - t, args[-1], logits

def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

# first wants: whole row (old), the span queued; then compiled in the background
for name, start, n in cases:
    eng.lazy_spans = False; chunk(start, n, False)
eng.lazy_spans = True
r0, t0 = rss(), time.perf_counter()
for name, start, n in cases:
    _, attend, _ = chunk(start, n, True)
    assert attend is None
eng.wait_compiled()
print(f"lazy compile of {sorted(eng._ready_spans)}: {time.perf_counter() - t0:.1f} s, "
      f"peak RSS {r0:.0f} -> {rss():.0f} MiB, errors {eng.lazy_errors}")
ready = set(eng._ready_spans)
for name, start, n in cases:
    chunk(start, n, True)      # first run of the compiled program
times = {c[0]: ([], []) for c in cases}
for rep in range(int(os.environ.get("REPS", 5))):
    for name, start, n in cases:
        for new in ((True, False) if rep % 2 == 0 else (False, True)):
            eng._ready_spans = ready if new else set()
            eng.lazy_spans = new
            dt, attend, logits = chunk(start, n, new)
            assert (attend is None) != new, (attend, new)
            times[name][0 if new else 1].append(dt)
            if rep == 0:
                times[name] += (logits,)
print("load", open("/proc/loadavg").read().split()[:3])
for name, start, n in cases:
    new, old, *lg = times[name]
    ratio = np.median(np.array(new) / np.array(old))
    d = np.abs(lg[0] - lg[1]).max()
    same = int(lg[0].argmax()) == int(lg[1].argmax())
    print(f"{name}: new {1e3*np.median(new):.0f} ms, old {1e3*np.median(old):.0f} ms, "
          f"new/old {ratio:.2f}x (median of per-pair ratios), argmax same {same}, "
          f"max |logit diff| {d:.2e}; new {[round(1e3*x) for x in new]} old {[round(1e3*x) for x in old]}")
# compile memory of every lazy program (SmolLM2): compile the rest, RSS and code size
if os.environ.get("ALL"):
    r0, t0 = rss(), time.perf_counter()
    sizes = []
    for b, a in lazy:
        c = eng._span_lower(b, a)().compile()
        m = c.memory_analysis()
        sizes.append((b, a, getattr(m, "generated_code_size_in_bytes", 0), getattr(m, "temp_size_in_bytes", 0)))
    print(f"compiling all {len(lazy)} lazy programs: {time.perf_counter() - t0:.1f} s, peak RSS {r0:.0f} -> {rss():.0f} MiB")
    for s in sizes:
        print(f"  {s[0]} x {s[1]}: code {s[2]/2**20:.1f} MiB, temp {s[3]/2**20:.1f} MiB")
