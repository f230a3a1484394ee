"""Compiling the engine's programs ahead of the requests that need them (DeviceEngine mixes
this in). `warmup()` compiles every prefill bucket, insert, decode step and copy; with
background=True it runs only what a first request's prompt needs (the largest prefill
bucket's program, a slot reset and the one-slot decode sampler, which draws a first
request's first token: DeviceEngine._activate), then lowers and compiles the rest on a
thread while the engine already serves: the first request's decode forward first
(alone), with the first-token sampler, then fresh prefills, cached-prefix ones last. Until a bucket's program is ready, a prompt
runs in the smallest ready bucket that holds it (DeviceEngine._bucket; a batched prefill
not ready yet runs its prompts one at a time); a call whose program a background job is
compiling waits for that job (`_await_program`), and new jobs hold off meanwhile; any
other program is compiled by the call that needs it. Nothing fails, it waits. Tracing
holds Python's GIL, so the thread helps by overlapping XLA's compile and the server's
start, not by tracing in parallel (docs/cli.md, the start-up section).

Programs no warm-up but the full one compiles (a chunk after a cached prefix over a span
other than its bucket's prefix span: DeviceEngine.chunk_spans) are queued by the chunk
that first wants one (`_compile_later`) and compiled on a thread of their own once the
background list is done; that chunk and the next ones run the whole-row program until
then, so a request never waits for them.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sampling.params import SamplingParams
from sampling.rows import make_rows
from serving.engine import programs


class Warmup:
    """DeviceEngine's compile-ahead methods (serving/engine/device.py holds the programs)."""

    def warmup(self, progress: Callable[[str], None] | None = None,
               background: bool = False) -> "threading.Thread | None":
        """Compile the step, every prefill bucket and the slot copy.

        background=True: run only what a first short request needs (the smallest prefill
        bucket, the first-token sampler, a one-slot decode step) and compile the rest on a
        thread, which is returned (see `_compile_rest`); a call that needs a program not yet
        compiled compiles it itself, so it waits, never fails."""
        if background:
            return self._warm_first(progress)
        say = progress or (lambda _msg: None)
        greedy = SamplingParams(temperature=0.0)
        if self.paged:   # warm-up writes go to block 1 (garbage until a sequence owns it)
            self._tables[:] = 1
            self._tables_dev = None
        for i, b in enumerate(self.prefill_buckets):
            say(f"warm-up: prefill bucket {b} ({i + 1}/{len(self.prefill_buckets)})")
            n = min(b, self.max_len - 1)
            self.prefill_chunk(0, np.zeros(n, np.int32), 0)          # a fresh prompt
            # after a cached prefix: a chunk ending at each span (DeviceEngine.chunk_spans;
            # over several processes the prefix span only), then one ending at max_len
            spans = [a for a in self.chunk_spans[b]
                     if self.lazy_spans or a == self.prefix_spans.get(b)]
            self._ready_spans.update(programs.cached_prefill_span(b, a) for a in spans)
            for a in spans:
                n = min(b, a - 1)
                self.prefill_chunk(0, np.zeros(n, np.int32), a - n)
            n = min(b, self.max_len - 2)
            self.prefill_chunk(0, np.zeros(n, np.int32), self.max_len - n)   # the whole row
        for rows in self.prefill_rows:    # batched prefill (insert_many), first tokens
            say(f"warm-up: batched prefill of {rows} prompts, buckets "
                f"{'/'.join(map(str, self.prefill_buckets))}")
            for b in self.prefill_buckets:
                item = dict(slot=0, prompt_ids=np.zeros(min(b, self.max_len - 1), np.int32),
                            sampling=greedy, seed=0)
                for pending in self.insert_many([item] * rows):
                    pending.result()
            self.release(0)
        self.batched_prefills = self.batched_prompts = 0
        say("warm-up: first-token sampler")
        self.insert(0, np.zeros(1, np.int32), 0, greedy, 0).result()
        for rows in self.batch_buckets:
            slot = rows - 1
            if slot:
                self.insert(slot, np.zeros(1, np.int32), 0, greedy, 0).result()
            say(f"warm-up: decode steps over {rows} slots, attending "
                f"{'/'.join(map(str, self.attend_buckets))}")
            for b in self.attend_buckets:
                if rows * b > self.warm_run_tokens and b != self.attend_buckets[0]:
                    # compile only: running it would move rows x b tokens of KV per layer
                    # (a 64 x 32k paged step); jit then reuses the compiled program
                    cache, reads, _ = self._split(self.state)
                    self._forward_for(rows).lower(self.params, cache, reads,
                                                  self._tables_arg(), b, rows).compile()
                    continue
                self._host_pos[self._host_active] = b - 1
                self.step().result()
            self._warm_multi(rows, say)
            if slot:
                self.release(slot)
        say("warm-up: the full samplers (first token; decode over "
            f"{'/'.join(map(str, self.batch_buckets))} slots)")
        for _name, lower in self._sampler_jobs(*self._abstract_args(), full_only=True):
            lower().compile()        # jit then reuses it (the lean ones ran above)
        if self.paged:
            self.copy_block(0, 0)
        else:
            self.copy_prefix(0, min(1, self.max_slots - 1), 1)
        self.release(0)
        self._host_pos[:] = 0
        self._tables[:] = 0
        self._tables_dev = None
        jax.block_until_ready(self.state)
        say("warm-up: done")

    def _multi_args(self, rows: int):
        """Arguments of a warm-up multi-step call over `rows` slots: live rows run one step
        (budget 1), so the program compiles at the cost of a single step."""
        budget = np.where(self._host_active, 1, 0).astype(np.int32)
        return (self._mask_bits(rows, None), budget, np.zeros(self.max_slots, np.int32),
                np.full((self.max_slots, self.max_stop_ids), -1, np.int32))

    def _warm_multi(self, rows: int, say) -> None:
        """Compile the multi-step programs over `rows` slots (only with decode_steps > 1):
        the lean ones run, the full-sampler ones compile only (jit then reuses them)."""
        k = self.decode_steps
        if k == 1:
            return
        say(f"warm-up: {k}-step decode over {rows} slots")
        for b in self.attend_buckets:
            args = self._multi_args(rows)
            self._multi_for(rows).lower(self.params, self.state, self._tables_arg(), *args,
                                        k, b, rows, False, False).compile()
            if rows * b > self.warm_run_tokens and b != self.attend_buckets[0]:
                self._multi_for(rows).lower(self.params, self.state, self._tables_arg(),
                                            *args, k, b, rows, False, True).compile()
                continue
            self._dispatch_multi(k, b, rows, *args[1:]).result()

    def _warm_first(self, progress) -> threading.Thread:
        say = progress or (lambda _msg: None)
        t0 = time.perf_counter()
        # the first prefill is the largest bucket's (for a small model: `_first_bucket`):
        # until the background thread has the others, a prompt that fits it runs in the
        # smallest ready bucket (DeviceEngine._bucket) and never waits for a compilation
        # (over several processes every one must run the same programs: the choices
        # stay those of a full warm-up, whatever each one's thread has compiled)
        self._unready = {name for name, _ in self._rest_jobs()
                         if name.startswith(("prefill ", "batched", "first-token"))
                         and jax.process_count() == 1}
        self._unready.discard(programs.prefill(self._first_bucket()))
        if self.paged:
            self._tables[:] = 1
            self._tables_dev = None
        self.insert(0, np.zeros(1, np.int32), 0, SamplingParams(temperature=0.0), 0).result()
        self.release(0)
        for rows in self.batch_buckets:   # the unconstrained masks, made on the device once
            self._mask_bits(rows, None)
        self._host_pos[:] = 0
        self._tables[:] = 0
        self._tables_dev = None
        jax.block_until_ready(self.state)
        say(f"warm-up: first-request programs ready in {time.perf_counter() - t0:.1f} s; "
            f"compiling the rest in the background")
        jobs = self._rest_jobs()     # placed as the state is now (committed by the calls)
        self._programs, self._in_progress = threading.Condition(), set()
        self.background_errors, self.background_done = [], False
        thread = threading.Thread(target=self._compile_rest, args=(jobs, say),
                                  name="flaxserve-compile", daemon=True)
        self._background_thread = thread
        thread.start()
        return thread

    # token x parameter products a first prefill may cost (it runs at every start, and a
    # short prompt padded to it until its own bucket is compiled): the bundled model's
    # 512 tokens (3.8M parameters) on a CPU, far more on an accelerator
    first_prefill_budget = {"cpu": 2 ** 31}

    def _first_bucket(self) -> int:
        """The largest prefill bucket whose run stays within `first_prefill_budget` (at
        least the smallest): the first-request program compiled before serving."""
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))
        budget = self.first_prefill_budget.get(jax.default_backend(), 2 ** 38)
        fits = [b for b in self.prefill_buckets if b * n <= budget]
        return fits[-1] if fits else self.prefill_buckets[0]

    def _rest_jobs(self) -> list:
        """(name, lower) for every program the full warm-up compiles, likeliest first; the
        arguments are abstract (shapes, dtypes, shardings), so nothing touches the state."""
        params, state, tables = self._abstract_args()
        i32 = jax.ShapeDtypeStruct((), jnp.int32)
        jobs = []
        for b in self.prefill_buckets:
            toks = jax.ShapeDtypeStruct((b,), jnp.int32)
            span = self.prefix_spans.get(b)      # the other spans: `_compile_later`
            for name, attend in ((programs.prefill(b), b), (programs.cached_prefill(b), None),
                                 (programs.cached_prefill_span(b, span), span)):
                if name == programs.cached_prefill_span(b, None):
                    continue
                jobs.append((name, lambda toks=toks, attend=attend: self._prefill.lower(
                    params, state, tables, toks, i32, i32, i32, attend)))
        for rows in self.prefill_rows:
            for b in self.prefill_buckets:
                jobs.append((programs.batched_prefill(rows, b),
                             lambda b=b, rows=rows: self._prefill_many.lower(
                                 params, state, tables,
                                 jax.ShapeDtypeStruct((rows, b), jnp.int32),
                                 jax.ShapeDtypeStruct((rows,), jnp.int32),
                                 jax.ShapeDtypeStruct((rows,), jnp.int32))))
        for rows in self.batch_buckets:
            for b in self.attend_buckets:
                jobs.append((programs.decode(rows, b),
                             lambda b=b, rows=rows: self._forward_for(rows).lower(
                                 params, *self._split(state)[:2], tables, b, rows)))
        jobs += self._sampler_jobs(params, state, tables)
        if self.decode_steps > 1:      # multi-step decode (serving/engine/multi_step.py)
            s, k = self.max_slots, self.decode_steps
            i32s = jax.ShapeDtypeStruct((s,), jnp.int32)
            ids = jax.ShapeDtypeStruct((s, self.max_stop_ids), jnp.int32)
            for lean in (True, False):     # the full sampler's (a row needs it) after
                for rows in self.batch_buckets:
                    bits = jax.ShapeDtypeStruct((rows, self.mask_words), jnp.int32)
                    for b in self.attend_buckets:
                        jobs.append((programs.multi_decode(k, rows, b, full=not lean),
                                     lambda b=b, rows=rows, bits=bits, lean=lean:
                                     self._multi_for(rows).lower(
                                         params, state, tables, bits, i32s, i32s, ids, k, b,
                                         rows, False, lean)))
        if self.paged:
            jobs.append((programs.cache_copy(True),
                         lambda: self._copy_block.lower(state, i32, i32)))
        else:
            jobs.append((programs.cache_copy(False), lambda: self._copy.lower(state, i32, i32)))
        # a first request's decode step first (one job: its sampler's lowering needs the
        # forward's), then a new prompt of any length needs its fresh prefill; a cached
        # prefix (a second turn, a long prompt's later chunks) comes later (stable: small
        # first). `_await_program` waits for a job under way rather than compile twice
        rows, b = self.batch_buckets[0], self.attend_buckets[0]
        fwd, smp = programs.decode(rows, b), programs.sampler(rows)
        lower_step = dict(jobs)[fwd]

        def first_step():
            lower_step().compile()
            return self._sampler_lower(params, state, tables, rows, True)

        jobs = [(f"{fwd}, {smp}", first_step)] + [job for job in jobs if job[0] != fwd]
        jobs.sort(key=lambda job: 2 if "cached prefix" in job[0] else
                  -1 if job[0].startswith((fwd, "first-token")) else
                  0 if job[0].startswith("prefill ") else 1)
        return jobs

    def _await_program(self, name: str) -> None:
        """Wait while the background thread compiles `name` (rather than compile it a
        second time beside it); a program not under way is compiled by its caller."""
        if not any(name in job.split(", ") for job in tuple(self._in_progress)):
            return
        with self._programs:
            self._waiters += 1          # no new background job starts meanwhile (the GIL)
            try:
                self._programs.wait_for(lambda: not any(name in job.split(", ")
                                                        for job in self._in_progress), 120)
            finally:
                self._waiters -= 1
                self._programs.notify_all()

    def _abstract_args(self):
        """(params, state, block tables) as abstract arguments for `.lower`."""
        return (jax.tree.map(_abstract, self.params), jax.tree.map(_abstract, self.state),
                _abstract(self._tables_arg()))

    def _sampler_jobs(self, params, state, tables, full_only: bool = False) -> list:
        """(name, lower) for the sampler programs: the full first-token sampler and, per
        batch bucket, the lean decode sampler (but over the first bucket: `_rest_jobs`
        puts it with the first decode step; none with full_only) and the full one."""
        i32 = jax.ShapeDtypeStruct((), jnp.int32)

        def first(lean=False):
            toks = jax.ShapeDtypeStruct((self.prefill_buckets[0],), jnp.int32)
            logits = self._logits_of(self._prefill.lower(params, state, tables, toks, i32, i32,
                                                         i32, self.prefill_buckets[0]))
            row = jax.tree.map(_abstract, make_rows([None], self.vocab_size, [0], [0]))
            return self._first.lower(
                state, logits, i32, row, jax.ShapeDtypeStruct((self.max_len,), jnp.int32), i32,
                jax.ShapeDtypeStruct((1, self.mask_words), jnp.int32), False, i32,
                jax.ShapeDtypeStruct((len(self._carried),), jnp.float32),
                jax.ShapeDtypeStruct((), jnp.bool_), lean=lean)

        step = functools.partial(self._sampler_lower, params, state, tables)
        jobs = [] if full_only else [
            (programs.sampler(rows), lambda rows=rows: step(rows, True))
            for rows in self.batch_buckets[1:]]
        jobs += [(programs.sampler(rows, full=True), lambda rows=rows: step(rows, False))
                 for rows in self.batch_buckets]
        # the lean first-token sampler: a warm restart's first request draws its first
        # token with the decode sampler instead (DeviceEngine._activate), the next need it
        jobs = ([] if full_only else [(programs.first_sampler(), lambda: first(True))]) + jobs
        return jobs + [(programs.first_sampler(full=True), first)]

    def _sampler_lower(self, params, state, tables, rows: int, lean: bool):
        """The decode sampler over `rows` slots, lowered (the logits placed as the
        compiled forward places them)."""
        cache, reads, rest = self._split(state)
        fwd = self._forward_for(rows).lower(params, cache, reads, tables,
                                            self.attend_buckets[0], rows)
        sampling_rows = rest.pop("rows")         # read-only (DeviceEngine._sample)
        return self._sample_step.lower(
            rest, sampling_rows, self._logits_of(fwd),
            jax.ShapeDtypeStruct((rows, self.mask_words), jnp.int32), False, rows, lean=lean)

    def _logits_of(self, lowered):
        """A lowered program's logits (its second output) as an abstract argument, placed
        as the compiled program places them."""
        out = lowered.out_info[1]
        placed = lowered.compile().output_shardings[1] if self._committed_state() else None
        return jax.ShapeDtypeStruct(out.shape, out.dtype, sharding=placed)

    def _committed_state(self) -> bool:
        """jit's outputs are committed only when an input was: uncommitted params and
        state (init_params, tests) give uncommitted logits, lowered unplaced."""
        return self.mesh is not None or any(
            getattr(x, "_committed", True) for x in jax.tree.leaves((self.params, self.state)))

    background_switch_s = 0.001        # Python's switch interval while they run
    background_yield_s = 1.0           # a job waits this long at most for live slots
    _in_progress: set = frozenset()    # background jobs under way (_compile_rest)
    _waiters = 0                       # device-thread calls waiting for one of them

    def _give_way(self, yield_s: float) -> None:
        """A running request first (up to yield_s) before a background compile: its steps
        need the GIL that tracing holds, and a few short requests end within it."""
        deadline = time.monotonic() + yield_s
        while self._host_active.any() and time.monotonic() < deadline:
            time.sleep(0.01)

    def _compile_rest(self, jobs, say) -> None:
        """Compile (or read from the persistent cache) every job, a few at a time."""
        from concurrent.futures import ThreadPoolExecutor
        import os
        t0, done = time.perf_counter(), 0

        def one(job, yield_s=0.0):
            name, lower = job
            self._give_way(yield_s)
            with self._programs:
                self._programs.wait_for(lambda: not self._waiters, 60)
                self._in_progress.add(name)
            try:
                lower().compile()
            except Exception as e:  # noqa: BLE001 - the call that needs it compiles it
                self.background_errors.append(f"{name}: {e}")
            with self._programs:
                self._in_progress.discard(name)
                self._unready.discard(name)     # its bucket may be chosen from now on
                self._programs.notify_all()
            return name

        # the first decode step's programs alone (a first request may be waiting for
        # them: beside another job they would take twice as long, tracing holds the GIL)
        first = [job for job in jobs if job[0].startswith("decode ")][:1]
        rest = [job for job in jobs if job not in first]

        def run_all(pool):
            yield from map(one, first)           # a first request may wait for it
            yield from pool.map(functools.partial(one, yield_s=self.background_yield_s),
                                rest)            # submitted once the first is done

        # tracing holds the GIL in long runs of bytecode: a thread that wants it back (the
        # device thread dispatching a request's step, gRPC, detokenizing) waits up to the
        # switch interval each time, 5 ms by default, many times per decode step
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, self.background_switch_s))
        try:
            with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
                for _name in run_all(pool):
                    done += 1
                    elapsed = time.perf_counter() - t0
                    eta = elapsed / done * (len(jobs) - done)   # every one: `say` may thin
                    say(f"background compile: {done}/{len(jobs)} programs, "
                        f"{elapsed:.1f} s, ETA {eta:.0f} s")
        finally:
            sys.setswitchinterval(switch)
        self._unready.clear()
        self.background_done = True

    _background_thread = None          # the warm-up's (`_warm_first`), if it ran one

    def _compile_later(self, name: str, lower) -> None:
        """Queue a program a chunk wants but the warm-up left out (a cached-prefix chunk
        over a span other than its bucket's prefix span: DeviceEngine._attend_of) for a
        thread of its own, which starts once the warm-up's own background jobs are done;
        when it is compiled its name joins `_ready_spans`. The caller never waits: it runs
        a program that is compiled meanwhile. Queued once; a failure stays in
        `lazy_errors` and the chunk keeps the whole row."""
        with self._lazy_lock:
            if name in self._lazy_queued:
                return
            self._lazy_queued.add(name)
            self._lazy_jobs.append((name, lower))
            if self._lazy_thread is None:
                self._lazy_thread = threading.Thread(target=self._compile_queued,
                                                     name="flaxserve-compile-later", daemon=True)
                self._lazy_thread.start()

    def _compile_queued(self) -> None:
        if self._background_thread is not None:
            self._background_thread.join()
        while True:
            with self._lazy_lock:
                if not self._lazy_jobs:
                    self._lazy_thread = None
                    return
                name, lower = self._lazy_jobs.pop(0)
            self._give_way(self.background_yield_s)
            switch = sys.getswitchinterval()
            sys.setswitchinterval(min(switch, self.background_switch_s))
            try:
                lower().compile()
                self._ready_spans.add(name)
            except Exception as e:  # noqa: BLE001 - the chunk keeps the whole row
                self.lazy_errors.append(f"{name}: {e}")
            finally:
                sys.setswitchinterval(switch)

    def wait_compiled(self, timeout: float = 600.0) -> None:
        """Wait until the programs `_compile_later` was handed are compiled (tests,
        benchmarks)."""
        deadline = time.monotonic() + timeout
        while self._lazy_thread is not None and time.monotonic() < deadline:
            time.sleep(0.01)


def _abstract(x):
    """x as an abstract argument: shape, dtype and placement; uncommitted arrays (numpy,
    jnp.zeros) lower unplaced. A host array stays on the host (jnp.asarray of one runs an
    eager program per shape, on the thread that competes with the first requests)."""
    if isinstance(x, (np.ndarray, np.generic)):
        return jax.ShapeDtypeStruct(x.shape, jax.dtypes.canonicalize_dtype(x.dtype))
    x = jnp.asarray(x)       # a Python scalar keeps its weak type
    sharding = x.sharding if getattr(x, "_committed", True) else None
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

