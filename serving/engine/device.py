"""The device side of the batch server: jitted prefill, insert and decode step.

Everything that touches the accelerator lives here, behind a narrow interface in the
spirit of JetStream's engine API: the scheduler (one thread) decides which slot gets what,
this class only runs compiled programs over a decode state that never leaves the device.

- The decode state (KV cache, per-slot sampling rows and sampler state, last token,
  position, active flag) is one pytree, donated to every call, so XLA updates it in place
  (but for the decode sampler, which takes the sampling rows read-only: it never changes
  them, and 52 arrays donated and handed back cost host time every step).
- `step` is two programs dispatched back to back: the model forward for every slot, then
  the sampler and the state update (logits stay on the device). The forward attends over
  a power-of-two prefix of the cache that covers the longest live sequence ("attend
  buckets"), and both programs run over the first B slots only, B the smallest of a few
  "batch buckets" covering every live slot (the scheduler fills low slots first), so one
  request on a 32-slot engine costs a batch-1 step, not a batch-32 one. Only sampled ids,
  their logprobs and the top-N logprobs come back to the host, packed into one int32
  array a call (serving/engine/step_output.py), so one read a step.
- Prompts run in power-of-two buckets (padding writes are dropped), so a new prompt
  length never compiles anything once `warmup` has run. With `prefill_batch` > 1,
  `insert_many` prefills several fresh prompts in one [rows, bucket] program
  (serving/engine/prefill_plan.py) and samples each first token as `insert` does.
- Inactive slots still ride along in the fixed-shape batch, but write nothing: a released
  slot keeps its KV intact for the prefix cache.
- KV layout (`kv_layout`): "dense" keeps one [max_slots, max_len] row per slot per layer;
  "paged" keeps a pool of `num_blocks` blocks of `block_size` tokens per layer and a block
  table [max_slots, max_blocks_per_seq] (model/paged_attention.py). In paged mode the
  scheduler owns the blocks (serving/engine/block_manager.py) and sets each slot's table
  row with `set_blocks`; the table goes to the device with the next call that changed.
"""

from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import monitoring

from model.config import ModelConfig
from model.decoder import forward, init_cache, init_paged_cache
from model.paged_attention import copy_block
from sampling import dynamic_top_p
from sampling.params import SamplingParams
from sampling.rows import make_rows, set_row
from sampling.sampler import needs_full, sample
from sampling.state import init_state, reset_row
from serving.engine import multi_step, programs
from serving.engine.cpu_matmul import options as decode_compiler_options
from serving.engine.cpu_matmul import WIDE_ROWS
from serving.engine.cpu_matmul import resolve as resolve_cpu_matmul
from serving.engine.sizing import attend_buckets, batch_buckets, default_buckets
from serving.engine.step_output import Forward, Pending, pack
from serving.engine.warmup import Warmup

_compiles = 0
_compiles_lock = threading.Lock()


def _count_compile(name: str, *_args, **_kw) -> None:
    global _compiles
    if name == "/jax/core/compile/backend_compile_duration":
        with _compiles_lock:
            _compiles += 1


monitoring.register_event_duration_secs_listener(_count_compile)


def compile_count() -> int:
    """XLA compilations in this process so far (tests: none after warm-up)."""
    return _compiles


class DeviceEngine(Warmup):
    """Owns params and the decode state; call every method from one thread."""

    # warm-up runs decode steps over at most this many (rows x attended) positions and
    # only compiles the larger ones
    warm_run_tokens = 1 << 16

    def __init__(self, config: ModelConfig, params, *, max_slots: int, max_len: int,
                 mesh=None, attention: str = "auto", interpret: bool = False,
                 prefill_buckets: tuple[int, ...] | None = None,
                 num_top_logprobs: int = 20, eos_ids=(), kv_layout: str = "dense",
                 block_size: int = 16, num_blocks: int | None = None,
                 token_limit: int | None = None, steering: bool = False,
                 prefill_batch: int = 1, decode_steps: int = 1,
                 cpu_matmul: str = "default"):
        if kv_layout not in ("dense", "paged"):
            raise ValueError(f"kv_layout must be 'dense' or 'paged', got {kv_layout!r}")
        if kv_layout == "paged":
            if block_size < 1 or block_size & (block_size - 1):
                raise ValueError(f"block_size must be a power of two, got {block_size}")
            if num_blocks is None or num_blocks < 2:
                raise ValueError(f"num_blocks must be >= 2 for the paged layout, got "
                                 f"{num_blocks}")
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        if prefill_batch < 1:
            raise ValueError(f"prefill_batch must be >= 1, got {prefill_batch}")
        if decode_steps < 1:
            raise ValueError(f"decode_steps must be >= 1, got {decode_steps}")
        if not 2 <= max_len <= config.max_position_embeddings:
            raise ValueError(f"max_len must be in [2, {config.max_position_embeddings}] "
                             f"(the model's max_position_embeddings), got {max_len}")
        self.config = config
        self.max_slots = max_slots
        self.max_len = max_len
        self.vocab_size = config.vocab_size
        # ids the tokenizer knows: checkpoints pad their vocabulary (Qwen: 151936 rows for
        # ~151665 tokens), and an id past the tokenizer must never be sampled
        self.token_limit = min(token_limit or config.vocab_size, config.vocab_size)
        self.prefill_buckets = tuple(sorted(prefill_buckets or default_buckets(max_len)))
        self.num_top_logprobs = num_top_logprobs
        self.eos_ids = tuple(eos_ids)
        self.mesh = mesh
        self.kv_layout = kv_layout
        self.paged = kv_layout == "paged"
        # paged decode attention (model/pallas_paged.py): None, the gather path; "gpu" or
        # "tpu", that Pallas kernel, over a head-first pool (interpret: on CPU, for tests)
        from model.pallas_paged import ATTENTION_CHOICES, resolve_attention
        if attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, "
                             f"got {attention!r}")
        devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
        self.paged_kernel = (resolve_attention(attention, devices[0].platform, interpret,
                                               len(devices), block_size, config.head_dim,
                                               config.dtype)
                             if self.paged else None)
        self.interpret = interpret
        self.attention = "pallas" if self.paged_kernel else "gather"
        # per-slot activation steering (model/steering.py): a [slots, layers, hidden] array
        # in the decode state, handed to every forward; off: the programs are unchanged
        self.steering = steering
        self.block_size = block_size
        self.num_blocks = num_blocks if self.paged else 0
        self.max_blocks_per_seq = -(-max_len // block_size)
        # the first position nothing is written at (padding and idle rows)
        self._void = self.max_blocks_per_seq * block_size if self.paged else max_len
        self._tables = np.zeros((max_slots, self.max_blocks_per_seq if self.paged else 1),
                                np.int32)
        self._tables_dev = None
        self._last_done = 0.0
        self.params = params
        if mesh is not None:
            from model import sharding
            self.params = sharding.shard_params(params, sharding.param_shardings(config, mesh))
        self.state = _committed_like(self._init_state(), self.params, mesh)
        # per-slot float sampler values a resumed sample carries over (sampler_carry)
        self._carried = tuple(f for f, x in vars(self.state["sampler"]).items()
                              if x.shape == (max_slots,) and x.dtype == jnp.float32)
        self.attend_buckets = attend_buckets(max_len)
        # a chunk after a cached prefix attends over the smallest attend bucket holding
        # start + n, one of `chunk_spans[b]` (the attend buckets >= its bucket b, short of
        # the whole row), else over the whole row (`_attend_of`). A chat prompt behind a
        # cached system prompt, a later turn of a conversation or a long prompt's second
        # chunk over the whole 2048 positions paid as much again in attention as in its
        # matmuls (docs/speed.md). The `prefix_spans[b]` program (the smallest attend
        # bucket of at least twice b: a chunk behind a short prefix) is compiled at
        # warm-up; the other spans in the background the first time a chunk wants one
        # (`_compile_later`), meanwhile the chunk takes the whole row. Over several
        # processes every one must run the same programs: the warm-up's spans only
        self.prefix_spans = {b: a for b in self.prefill_buckets
                             for a in [next((x for x in self.attend_buckets if x >= 2 * b),
                                            max_len)] if a < max_len}
        self.chunk_spans = {b: tuple(a for a in self.attend_buckets if b <= a < max_len)
                            for b in self.prefill_buckets}
        self.lazy_spans = jax.process_count() == 1
        self._ready_spans: set[str] = set()     # other span programs compiled (by name)
        self._lazy_jobs: list = []              # (name, lower) queued (warmup.py)
        self._lazy_queued: set[str] = set()
        self._lazy_lock = threading.Lock()
        self._lazy_thread = None
        self.lazy_errors: list[str] = []
        # on a mesh the slot axis is sharded: slicing it would reshard, so run every slot
        self.batch_buckets = batch_buckets(max_slots) if mesh is None else (max_slots,)
        self._host_pos = np.zeros(max_slots, np.int64)      # mirrors state["pos"]
        self._host_active = np.zeros(max_slots, bool)       # mirrors state["active"]
        # the decode programs' matmuls on CPU over >= WIDE_ROWS slots: XLA's default
        # (YNNPACK) or Eigen's, measured where "auto" (serving/engine/cpu_matmul.py);
        # fewer rows and the prefill keep the default (`_forward_for`, `_multi_for`)
        self.cpu_matmul = resolve_cpu_matmul(cpu_matmul, config, self.params, max_slots,
                                              mesh=mesh)
        wide_options = decode_compiler_options(self.cpu_matmul) or None
        # the forward takes the cache (donated) and the few arrays it reads, the sampler
        # the state without the cache (`_split`) and without the sampling rows, which it
        # takes read-only (`_sample`)
        self._forward_step = jax.jit(self._forward_cache_fn, donate_argnums=(1,),
                                     static_argnums=(4, 5))
        self._forward_wide = (jax.jit(self._forward_cache_fn, donate_argnums=(1,),
                                      static_argnums=(4, 5), compiler_options=wide_options)
                              if wide_options else self._forward_step)
        # custom=True compiles the reorderable sampler; used only while a row needs it.
        # lean=True: the common stages only (sampling/sampler.py), while no live row needs
        # more (_full_slots); its trace and lower take a fraction of the full one's at start
        # the programs a Pending reads hand back their outputs as one packed array
        # (serving/engine/step_output.py: one device->host read a step). The sampling
        # rows go in read-only, not donated: a decode step never changes them, and each
        # donated array handed back costs host time (`_sample`)
        self._sample_step = jax.jit(self._sample_packed_fn, donate_argnums=(0,),
                                    static_argnums=(4, 5, 6), static_argnames=("lean",))
        # multi-step decode (serving/engine/multi_step.py): K steps of the two bodies above
        # in one program, over the lean sampler or (a live row needs it) the full one; the
        # scheduler uses it when every live row allows (decode_steps, multi_step_ok)
        self.decode_steps = decode_steps
        self._multi = jax.jit(self._multi_fn, donate_argnums=(1,),
                              static_argnums=(7, 8, 9, 10, 11))
        self._multi_wide = (jax.jit(self._multi_fn, donate_argnums=(1,),
                                    static_argnums=(7, 8, 9, 10, 11),
                                    compiler_options=wide_options)
                            if wide_options else self._multi)
        self._custom_slots: set[int] = set()
        self._full_slots: set[int] = set()       # live slots the lean sampler cannot serve
        # slots of `deterministic: true` requests: while one is live, decode steps run over
        # every slot and the whole cache (one shape, so XLA's reductions never change)
        self._deterministic_slots: set[int] = set()
        self._prefill = jax.jit(self._prefill_fn, donate_argnums=(1,), static_argnums=(7,))
        self._first = jax.jit(self._first_packed_fn, donate_argnums=(0,),
                              static_argnums=(7, 11), static_argnames=("lean",))
        self._reset = jax.jit(self._reset_fn, donate_argnums=(0,))    # see _activate
        # batched prefill of fresh prompts (insert_many): R rows from these buckets
        from serving.engine.prefill_plan import row_buckets
        self.prefill_rows = row_buckets(min(prefill_batch, max_slots))
        # a CPU computes every padding row and position of a batched prefill: group only
        # where that costs no more than prefilling alone (prefill_plan.plan)
        self.prefill_padding_costs = jax.default_backend() == "cpu"
        self._prefill_many = jax.jit(self._prefill_many_fn, donate_argnums=(1,))
        self.batched_prefills = self.batched_prompts = 0     # programs run, prompts in them
        # token masks (grammars, forced tokens) as packed bits; all ones when unconstrained
        self.mask_words = (self.vocab_size + 31) // 32
        self._ones = {}
        # prefill programs (warmup.py job names) the background compilation has not done
        # yet: while it runs, a prompt takes the smallest ready bucket that holds it
        self._unready: set[str] = set()
        self._copy = jax.jit(self._copy_fn, donate_argnums=(0,))
        self._copy_block = jax.jit(self._copy_block_fn, donate_argnums=(0,))
        self._release = jax.jit(lambda active, slot: active.at[slot].set(False),
                                donate_argnums=(0,))

    # -- state ------------------------------------------------------------------------

    def _init_state(self) -> dict:
        s, length = self.max_slots, self.max_len

        def zeros():
            if self.paged:
                cache = init_paged_cache(self.config, self.num_blocks, self.block_size,
                                         head_first=self.paged_kernel is not None)
            else:
                cache = init_cache(self.config, s, length)
            return {
                "cache": cache,
                "sampler": init_state(s, self.vocab_size, length),
                "last": jnp.zeros((s,), jnp.int32),
                "pos": jnp.zeros((s,), jnp.int32),
                "active": jnp.zeros((s,), bool),
                **({"steer": jnp.zeros((s, self.config.num_layers, self.config.hidden_size),
                                       jnp.float32)} if self.steering else {}),
            }

        if self.mesh is None:   # one program, not ~20 eager ones (a start's 0.2-0.4 s)
            state = jax.jit(zeros)()
        else:
            state = zeros()
            from model import sharding
            shardings = (sharding.pool_shardings(self.config, self.mesh, self.num_blocks,
                                                 self.block_size) if self.paged else
                         sharding.cache_shardings(self.config, self.mesh, s, length))
            state["cache"] = sharding.shard_cache(state["cache"], shardings)
        rows = make_rows([None] * s, self.vocab_size, [0] * s, [0] * s)
        # device_put: a plain copy (jnp.asarray compiled a program per dtype)
        return {"cache": state.pop("cache"), "rows": jax.device_put(rows), **state}

    # -- jitted programs ---------------------------------------------------------------

    def _forward(self, *args, **kw):
        """model.decoder.forward with this engine's paged attention (kernel, pool layout)."""
        return forward(self.config, *args, paged_kernel=self.paged_kernel,
                       interpret=self.interpret, **kw)

    def _forward_step_fn(self, params, state, tables, attend_len, rows):
        """The model over slots [0, rows): logits [rows, V]."""
        active, pos = state["active"][:rows], state["pos"][:rows]
        write_pos = jnp.where(active, pos, self._void)  # inactive rows write nothing
        slot_ids = None if rows == self.max_slots else jnp.arange(rows)
        logits, cache = self._forward(params, state["cache"],
                                     state["last"][:rows, None], write_pos[:, None],
                                     slot_ids=slot_ids, attend_len=attend_len,
                                     block_tables=tables if self.paged else None,
                                     steering=state["steer"][:rows] if self.steering else None)
        return dict(state, cache=cache), logits[:, 0]

    def _forward_cache_fn(self, params, cache, reads, tables, attend_len, rows):
        """`_forward_step_fn` over the cache and `reads` (`_split`): (cache, logits)."""
        state, logits = self._forward_step_fn(params, dict(reads, cache=cache), tables,
                                              attend_len, rows)
        return state["cache"], logits

    _forward_reads = ("last", "pos", "active", "steer")

    def _split(self, state):
        """(cache, what a decode forward reads besides it, the rest of the state but the
        cache). A single step's two programs each take only their part: every array a
        call takes costs dispatch time on the host (about a microsecond, more for one
        donated and handed back), and the decode state holds ~90 (the sampling rows and
        sampler state, ~60, only the sampler reads; the cache, 2 per layer, only the
        forward: docs/speed.md, "The batch-1 step, op by op")."""
        reads = {k: state[k] for k in self._forward_reads if k in state}
        return state["cache"], reads, {k: v for k, v in state.items() if k != "cache"}

    def _sample_step_fn(self, state, logits, mask_bits, custom, rows, lean=False):
        """The sampler over slots [0, rows), written back into the full state (lean: the
        common stages only, sampling/sampler.py).

        The [slots, V] arrays (penalty counts, bias) go in whole: the sampler reads their
        first `rows` rows only inside the stages that use them and counts the new tokens
        in place (sampling/state.py), so a batch without penalties or a bias never copies
        them (slicing, copying and writing them back was ~40% of a 16-row sampler at a
        49152 vocabulary: docs/speed.md, "At concurrency 16 and 32")."""
        take = lambda x: x[:rows]
        put = lambda full, part: (part if part.shape == full.shape else
                                  jax.lax.dynamic_update_slice_in_dim(full, part, 0, axis=0))
        active, pos, last = take(state["active"]), take(state["pos"]), take(state["last"])
        full_rows, full_sampler = state["rows"], state["sampler"]
        wide = ("out_counts", "prompt_counts")
        part = {f: getattr(full_sampler, f) if f in wide else take(x)
                for f, x in vars(full_sampler).items()}
        out, sampler = sample(logits,
                              jax.tree.map(take, full_rows).replace(bias=full_rows.bias),
                              full_sampler.replace(**part),
                              num_top=self.num_top_logprobs, mask=self._unpack(mask_bits),
                              custom_order=custom, lean=lean)
        state = dict(state, sampler=jax.tree.map(put, full_sampler, sampler),
                     last=put(state["last"], jnp.where(active, out.tokens, last)),
                     pos=put(state["pos"], jnp.where(active, pos + 1, pos)))
        return state, out

    def _sample_packed_fn(self, state, sampling_rows, logits, mask_bits, custom, rows,
                          lean=False):
        """`_sample_step_fn` over `state` without its "rows" (taken apart, read-only) with
        its SampleOutput packed (step_output.pack): (state without "rows", packed)."""
        state, out = self._sample_step_fn(dict(state, rows=sampling_rows), logits, mask_bits,
                                          custom, rows, lean=lean)
        return ({k: v for k, v in state.items() if k != "rows"},
                self._on_every_process(pack(out)))

    def _sample(self, logits, mask_bits, custom: bool, rows: int, lean: bool):
        """Run the decode sampler program on the state; its packed outputs. The sampling
        rows (52 arrays) stay out of the donated state: donated and handed back they cost
        ~90 us of host time a step more (docs/speed.md, "One read a step")."""
        cache, _, rest = self._split(self.state)
        sampling_rows = rest.pop("rows")
        rest, out = self._sample_step(rest, sampling_rows, logits, mask_bits, custom, rows,
                                      lean=lean)
        self.state = dict(rest, cache=cache, rows=sampling_rows)
        return out

    def _on_every_process(self, out):
        """Over several processes (serving/engine/lockstep.py) the sampled ids (the packed
        outputs) come back replicated, so the leader reads them without a collective of its
        own."""
        if self.mesh is None or jax.process_count() == 1:
            return out
        from jax.sharding import NamedSharding, PartitionSpec
        return jax.lax.with_sharding_constraint(out, NamedSharding(self.mesh, PartitionSpec()))

    def _run_chunk(self, params, state, tables, tokens, start, true_len, slot, attend):
        """`attend` (static): the cache positions the chunk attends over, from 0: its own
        bucket for a fresh prompt (start 0), a span after a short cached prefix
        (`prefix_spans`), None for the whole row."""
        n = tokens.shape[0]
        idx = jnp.arange(n)
        positions = jnp.where(idx < true_len, start + idx, self._void)[None]
        logits, cache = self._forward(params, state["cache"], tokens[None], positions,
                                     slot_ids=slot[None], logits_index=(true_len - 1)[None],
                                     attend_len=attend,
                                     block_tables=tables if self.paged else None,
                                     steering=(state["steer"][slot][None] if self.steering
                                               else None))
        return logits, dict(state, cache=cache)

    def _prefill_fn(self, params, state, tables, tokens, start, true_len, slot, attend):
        """One chunk into one slot; returns the logits of its last real token [1, V]."""
        return self._run_chunk(params, state, tables, tokens, start, true_len, slot,
                               attend)[::-1]

    def _prefill_many_fn(self, params, state, tables, tokens, lengths, slots):
        """R fresh prompts [R, T] (row r: lengths[r] real tokens from position 0) into
        slots [R]; returns R logits [1, V] of each row's last real token, each shaped as
        `_prefill_fn`'s so the compiled first-token sampler (`_first`) takes them as is."""
        rows, n = tokens.shape
        idx = jnp.arange(n)[None]
        positions = jnp.where(idx < lengths[:, None], idx, self._void)
        # fresh prompts attend only to their own chunk, as in `_run_chunk`
        logits, cache = self._forward(params, state["cache"], tokens, positions,
                                     slot_ids=slots, logits_index=jnp.maximum(lengths - 1, 0),
                                     attend_len=n, block_tables=tables if self.paged else None,
                                     steering=state["steer"][slots] if self.steering else None)
        return dict(state, cache=cache), tuple(logits[r:r + 1] for r in range(rows))

    def _unpack(self, bits):
        """[R, words] int32 -> bool [R, V]: bit t of word t // 32 allows token t. A shift
        per bit and a reshape, no gather: XLA fuses it into the one masking select
        (indexing the words per token was a gather and a transposed copy per step)."""
        shifts = jnp.arange(32, dtype=jnp.int32)
        allowed = ((bits[:, :, None] >> shifts) & 1).astype(bool)
        return allowed.reshape(bits.shape[0], -1)[:, :self.vocab_size]

    def _mask_bits(self, rows: int, mask) -> jax.Array:
        if mask is None:
            if rows not in self._ones:
                allowed = np.zeros(self.mask_words * 32, bool)
                allowed[:self.token_limit] = True
                words = np.packbits(allowed.reshape(-1, 32), axis=1, bitorder="little")
                words = words.view("<u4").astype(np.uint32).view(np.int32).reshape(1, -1)
                # device_put: a copy (jnp.asarray runs an eager program per shape)
                self._ones[rows] = jax.device_put(np.repeat(words, rows, axis=0))
            return self._ones[rows]
        return np.ascontiguousarray(np.asarray(mask, np.int32)[:rows])

    def _first_fn(self, state, logits, slot, row, prompt, prompt_len, mask_bits, custom,
                  orig_len, carry, restore, lean=False):
        """Sample a slot's first token from its prompt's last logits and activate it.

        Separate from the per-bucket prefill programs so the sampler compiles once.
        `orig_len` < prompt_len resumes a preempted sequence: prompt[orig_len:prompt_len]
        are tokens it had generated, so its sampler state counts them as output and its
        step (and PRNG key) continues where it stopped; `restore` puts back its running
        values (`carry`, see `sampler_carry`: mirostat's mu, ...)."""
        sampler = reset_row(state["sampler"], slot, prompt, prompt_len, row)
        sampler = _resumed(sampler, slot, prompt, prompt_len, orig_len)
        if not lean:     # a lean row's top_p never decays: reset_row's -1 stands
            sampler = dynamic_top_p.resume(sampler, row, slot, prompt, orig_len, prompt_len)
        sampler = sampler.replace(**{
            f: getattr(sampler, f).at[slot].set(
                jnp.where(restore, carry[i], getattr(sampler, f)[slot]))
            for i, f in enumerate(self._carried)})
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, slot, 1, axis=0)
        one_state = jax.tree.map(take, sampler)
        out, one_state = sample(logits, row, one_state, num_top=self.num_top_logprobs,
                                mask=self._unpack(mask_bits), custom_order=custom, lean=lean)
        put = lambda full, one: jax.lax.dynamic_update_slice_in_dim(full, one, slot, axis=0)
        sampler = jax.tree.map(put, sampler, one_state)
        state = dict(state, sampler=sampler, rows=set_row(state["rows"], slot, row),
                     last=state["last"].at[slot].set(out.tokens[0]),
                     pos=state["pos"].at[slot].set(prompt_len),
                     active=state["active"].at[slot].set(True))
        return state, out

    def _first_packed_fn(self, state, logits, slot, row, prompt, prompt_len, mask_bits, custom,
                         orig_len, carry, restore, lean=False):
        """`_first_fn` with its SampleOutput packed (step_output.pack)."""
        state, out = self._first_fn(state, logits, slot, row, prompt, prompt_len, mask_bits,
                                    custom, orig_len, carry, restore, lean=lean)
        return state, pack(out)

    def _multi_fn(self, params, state, tables, mask_bits, budget, min_left, stop_ids,
                  steps, attend_len, rows, custom, lean=True):
        """multi_step.run over this engine's two step bodies; its outputs come back packed
        (step_output.pack), [steps, rows, 9 + 2K + 1], the last column `wrote`."""
        state, outs = multi_step.run(self._forward_step_fn, self._sample_step_fn, params,
                                     state, tables, mask_bits, budget, min_left, stop_ids,
                                     steps, attend_len, rows, custom, lean)
        return state, self._on_every_process(outs)

    def _copy_block_fn(self, state, src, dst):
        hf = self.paged_kernel is not None
        cache = tuple((copy_block(k, src, dst, hf), copy_block(v, src, dst, hf))
                      for k, v in state["cache"])
        return dict(state, cache=cache)

    def _copy_fn(self, state, src, dst):
        cache = tuple((k.at[dst].set(k[src]), v.at[dst].set(v[src])) for k, v in state["cache"])
        return dict(state, cache=cache)

    # -- host API -------------------------------------------------------------------------

    _warmed = False

    def warmup(self, progress=None, background: bool = False):
        """Warmup.warmup (serving/engine/warmup.py); once it ran, a fresh prompt just past
        a bucket may run as two of the programs it compiles (`insert`). An engine never
        warmed up (`flaxserve generate`) compiles on first use, so it keeps one program
        per prompt rather than compile two."""
        self._warmed = True
        return super().warmup(progress, background)

    def _bucket(self, n: int, fresh: bool | None = None) -> int:
        """The smallest prefill bucket holding n tokens; fresh (True: from position 0,
        False: after a cached prefix; None: exactly that bucket): the smallest whose
        program is ready, if one is (a warm restart serves before every bucket is)."""
        fits = [b for b in self.prefill_buckets if n <= b]
        name = programs.prefill if fresh else programs.cached_prefill
        for b in fits if fresh is not None and self._unready else ():
            if name(b) not in self._unready:
                return b
        if fits:
            return fits[0]
        raise ValueError(f"chunk of {n} tokens exceeds the largest prefill bucket "
                         f"{self.prefill_buckets[-1]}")

    def _chunk_args(self, slot: int, token_ids, start: int, grid: bool = False):
        """grid=True (a `deterministic` prompt, see `_grid_prefill`): a chunk of at most
        `block_size` tokens at a grid line, run at one shape (bucket, whole cache)."""
        token_ids = np.asarray(token_ids, np.int32)
        n = len(token_ids)
        if n < 1:
            raise ValueError("a prefill chunk needs at least one token")
        if grid and (n > self.block_size or start % self.block_size):
            raise ValueError(f"a grid chunk is at most {self.block_size} tokens at a multiple "
                             f"of {self.block_size}, got {n} at {start}")
        if start + n > self.max_len:
            raise ValueError(f"prompt of {start + n} tokens exceeds max_len {self.max_len}")
        if self.paged:
            have = int(np.count_nonzero(self._tables[slot]))
            if -(-(start + n) // self.block_size) > have:
                raise ValueError(f"slot {slot} holds {have} blocks, too few for positions "
                                 f"up to {start + n}")
        bucket = self._bucket(self.block_size) if grid else self._bucket(n, fresh=start == 0)
        padded = np.zeros(bucket, np.int32)
        padded[:n] = token_ids
        return (padded, np.int32(start), np.int32(n), np.int32(slot),
                self._attend_of(bucket, start, n, grid))

    def _attend_of(self, bucket: int, start: int, n: int, grid: bool = False):
        """`_prefill`'s static `attend` for n tokens at start in `bucket`: the bucket for a
        fresh prompt; after a cached prefix, the smallest of `chunk_spans[bucket]` holding
        start + n if its program is compiled, else None (the whole row; a grid chunk
        always). An engine never warmed up takes the whole row (a span would compile on
        the request's path); a span not compiled yet is queued for the background
        (`_compile_later`), so the next such chunk may take it."""
        if grid:
            return None
        if start == 0:
            return bucket
        span = next((a for a in self.chunk_spans.get(bucket, ()) if a >= start + n), None)
        if span is None or not self._warmed:
            return None
        name = programs.cached_prefill_span(bucket, span)
        if span == self.prefix_spans.get(bucket):           # the warm-up compiles it
            return None if name in self._unready else span
        if name in self._ready_spans:
            return span
        if self.lazy_spans and name not in self._lazy_queued:
            self._compile_later(name, self._span_lower(bucket, span))
        return None

    def _span_lower(self, bucket: int, span: int):
        """A function lowering the `bucket` chunk over `span` positions (abstract
        arguments taken now, on the device thread: the state is not touched later)."""
        params, state, tables = self._abstract_args()
        toks = jax.ShapeDtypeStruct((bucket,), jnp.int32)
        i32 = jax.ShapeDtypeStruct((), jnp.int32)
        return lambda: self._prefill.lower(params, state, tables, toks, i32, i32, i32, span)

    def set_blocks(self, slot: int, blocks) -> None:
        """Paged layout: slot's block table row (unused entries: the null block 0)."""
        row = self._tables[slot]
        if len(blocks) > len(row):
            raise ValueError(f"{len(blocks)} blocks exceed max_blocks_per_seq {len(row)}")
        row[:len(blocks)] = blocks
        row[len(blocks):] = 0
        self._tables_dev = None

    def copy_block(self, src: int, dst: int) -> None:
        """Paged layout: block dst := block src, every layer."""
        self.state = self._copy_block(self.state, np.int32(src), np.int32(dst))

    def position(self, slot: int) -> int:
        """The position the next decode step writes for `slot`."""
        return int(self._host_pos[slot])

    def _tables_arg(self):
        if self._tables_dev is None:
            # a copy on the device, no program (jnp.asarray: an eager one per shape)
            self._tables_dev = jax.device_put(self._tables.copy())
            if self.mesh is not None:
                from jax.sharding import NamedSharding, PartitionSpec
                replicated = NamedSharding(self.mesh, PartitionSpec())
                if jax.process_count() > 1:   # device_put would compare every process's
                    host = self._tables.copy()  # copy (a collective) at each change
                    self._tables_dev = jax.make_array_from_callback(
                        host.shape, replicated, lambda index: host[index])
                else:
                    self._tables_dev = jax.device_put(self._tables_dev, replicated)
        return self._tables_dev

    def set_steering(self, slot: int, vectors) -> None:
        """Steering of `slot` ([layers, hidden] float32, None = zeros) for its next prefill
        and decode steps (model/steering.py); needs `steering=True`."""
        if not self.steering:
            raise ValueError("steering: this engine was built without steering")
        shape = (self.config.num_layers, self.config.hidden_size)
        vec = np.zeros(shape, np.float32) if vectors is None else np.asarray(vectors, np.float32)
        if vec.shape != shape:
            raise ValueError(f"steering: expected [{shape[0]}, {shape[1]}], got {vec.shape}")
        if not hasattr(self, "_set_steer"):
            self._set_steer = jax.jit(lambda st, i, v: dict(st, steer=st["steer"].at[i].set(v)),
                                      donate_argnums=(0,))
        self.state = self._set_steer(self.state, np.int32(slot), vec)

    def prefill_chunk(self, slot: int, token_ids, start: int,
                      deterministic: bool = False) -> None:
        """Write the KV of `token_ids` at positions start.. of `slot`; no sampling.
        deterministic=True: on the fixed grid (`_grid_prefill`; start must be a grid line)."""
        if deterministic:
            token_ids = np.asarray(token_ids, np.int32)
            last = self._grid_prefill(slot, token_ids, start)
            self.state, _ = self._prefill(self.params, self.state, self._tables_arg(),
                                          *self._chunk_args(slot, token_ids[last:],
                                                            start + last, grid=True))
            return
        self.state, _ = self._prefill(self.params, self.state, self._tables_arg(),
                                      *self._chunk_args(slot, token_ids, start))

    def _grid_prefill(self, slot: int, token_ids, start: int) -> int:
        """Batch-invariant prefill (a `deterministic` request) of token_ids at positions
        start..: chunks of `block_size` tokens at multiples of `block_size`, each padded to
        one bucket and attending the whole cache. A position's K/V then come from the same
        program with the same inputs whether the prompt ran from 0 or resumed after cached
        blocks (a prefix hit ends at a block boundary), and no matmul or attention
        reduction changes shape with the prompt's length. Runs every chunk but the last;
        returns the last one's offset in token_ids (the caller runs it: `insert` needs its
        logits)."""
        c = self.block_size
        if start % c:
            raise ValueError(f"a deterministic prefill starts at a multiple of {c}, got {start}")
        off = 0
        while len(token_ids) - off > c:
            self.state, _ = self._prefill(self.params, self.state, self._tables_arg(),
                                          *self._chunk_args(slot, token_ids[off:off + c],
                                                            start + off, grid=True))
            off += c
        return off

    def insert(self, slot: int, prompt_ids, start: int, sampling: SamplingParams, seed: int,
               sample_index: int = 0, mask=None, prompt_len: int | None = None,
               carry=None) -> Pending:
        """Run prompt_ids[start:], sample the first token, activate `slot` for decode.

        `mask` ([words] int32 packed bits, optional) restricts the first token.
        `prompt_len` < len(prompt_ids): resume a preempted sample whose generated tokens
        are prompt_ids[prompt_len:] (see `_first_fn`); `carry`: its `sampler_carry` taken
        at preemption."""
        prompt_ids = np.asarray(prompt_ids, np.int32)
        grid = bool(getattr(sampling, "deterministic", False))
        if grid:   # from the grid line at or before start (a slot's own block: rewritten)
            start -= start % self.block_size
            start += self._grid_prefill(slot, prompt_ids[start:], start)
        elif start == 0 and self._warmed:   # just past a bucket: two smaller programs
            from serving.engine.prefill_plan import split_head
            head = split_head(len(prompt_ids), self.prefill_buckets,
                              lambda name: name not in self._unready)
            if head:
                self.prefill_chunk(slot, prompt_ids[:head], 0)
                start = head
        args = self._chunk_args(slot, prompt_ids[start:], start, grid=grid)
        self.state, logits = self._prefill(self.params, self.state, self._tables_arg(), *args)
        return self._activate(slot, prompt_ids, logits, sampling, seed, sample_index, mask,
                              prompt_len, carry)

    def _activate(self, slot: int, prompt_ids, logits, sampling: SamplingParams, seed: int,
                  sample_index: int, mask, prompt_len, carry) -> Pending:
        """Sample `slot`'s first token from its prompt's last logits [1, V] (`_first`) and
        make it live; `insert`'s second half, shared with `insert_many`."""
        prompt = np.zeros(self.max_len, np.int32)
        prompt[:len(prompt_ids)] = prompt_ids
        row = make_rows([sampling], self.vocab_size, [seed], [sample_index], self.eos_ids)
        custom = sampling.sampler_order is not None or sampling.temperature_last
        (self._custom_slots.add if custom else self._custom_slots.discard)(slot)
        full = bool(needs_full(row)[0])
        (self._full_slots.add if full else self._full_slots.discard)(slot)
        (self._deterministic_slots.add if getattr(sampling, "deterministic", False)
         else self._deterministic_slots.discard)(slot)
        bits = self._mask_bits(1, None if mask is None else np.asarray(mask)[None])
        orig = len(prompt_ids) if prompt_len is None else prompt_len
        restore = carry is not None
        if (slot == 0 and not full and not custom and not restore and orig == len(prompt_ids)
                and programs.first_sampler() in self._unready and self.batch_buckets[0] == 1
                and not self._host_active.any() and slot not in self._deterministic_slots):
            # a warm restart's first request, its first-token sampler not compiled yet:
            # reset the slot (a small program), then the one-slot decode sampler draws
            # the token (a first request needs that program anyway). The same sampler
            # over the same row and state; only right at start, alone in slot 0
            self.state = self._reset(self.state, np.int32(slot), row, prompt,
                                     np.int32(len(prompt_ids)))
            out = self._sample(logits, bits, False, 1, lean=True)
        else:
            carry = np.zeros(len(self._carried), np.float32) if carry is None else carry
            self.state, out = self._first(self.state, logits, np.int32(slot), row, prompt,
                                          np.int32(len(prompt_ids)), bits, custom,
                                          np.int32(orig), np.asarray(carry, np.float32),
                                          np.bool_(restore), lean=not full)
        self._host_pos[slot] = len(prompt_ids)
        self._host_active[slot] = True
        return Pending(self, out)

    def _reset_fn(self, state, slot, row, prompt, prompt_len):
        """A fresh sequence in `slot` set up for the decode sampler to draw its first
        token from the prompt's logits (`_activate`): what `_first_fn` writes before it
        samples, with the position one back (the sampler's step moves it on)."""
        return dict(state, sampler=reset_row(state["sampler"], slot, prompt, prompt_len, row),
                    rows=set_row(state["rows"], slot, row),
                    pos=state["pos"].at[slot].set(prompt_len - 1),
                    active=state["active"].at[slot].set(True))

    def insert_many(self, items: list[dict]) -> list[Pending]:
        """`insert` for several fresh prompts (each from position 0) at once: prompts of
        similar bucketed length run as one [R, T] prefill program (serving/engine/
        prefill_plan.py), then each row's first token is sampled as `insert` samples it.
        A prompt left alone in its group takes `insert` itself (same numerics as one
        prompt). Each item holds insert's arguments: slot, prompt_ids, sampling, seed and
        optionally sample_index, mask, prompt_len, carry. Returns one Pending per item."""
        from serving.engine.prefill_plan import plan
        prompts = [np.asarray(it["prompt_ids"], np.int32) for it in items]
        out: list[Pending | None] = [None] * len(items)
        for group, rows, t in plan([len(p) for p in prompts], self.prefill_rows,
                                   self.prefill_buckets, self.prefill_padding_costs):
            if rows == 1 or programs.batched_prefill(rows, t) in self._unready:
                for i in group:     # alone, or its batched program is still compiling
                    it = items[i]
                    out[i] = self.insert(
                        it["slot"], prompts[i], 0, it["sampling"], it["seed"],
                        it.get("sample_index", 0), it.get("mask"), it.get("prompt_len"),
                        it.get("carry"))
                continue
            tokens = np.zeros((rows, t), np.int32)
            lengths = np.zeros(rows, np.int32)         # padding rows: length 0, no writes
            slots = np.full(rows, items[group[0]]["slot"], np.int32)
            for r, i in enumerate(group):
                self._chunk_args(items[i]["slot"], prompts[i], 0)    # the same checks
                tokens[r, :len(prompts[i])] = prompts[i]
                lengths[r], slots[r] = len(prompts[i]), items[i]["slot"]
            self.state, logits = self._prefill_many(self.params, self.state,
                                                    self._tables_arg(), tokens, lengths, slots)
            self.batched_prefills += 1
            self.batched_prompts += len(group)
            for r, i in enumerate(group):
                it = items[i]
                out[i] = self._activate(it["slot"], prompts[i], logits[r], it["sampling"],
                                        it["seed"], it.get("sample_index", 0), it.get("mask"),
                                        it.get("prompt_len"), it.get("carry"))
        return out

    def sampler_carry(self, slot: int) -> np.ndarray:
        """The slot's running sampler values that its tokens alone do not give back
        (mirostat's mu, adaptive-p's sums, ...: `_carried`), as of the last dispatched
        step; a preempted sample hands them to `insert(carry=...)` when it resumes. Waits
        for that step (preemption only); compiles nothing."""
        sampler = self.state["sampler"]
        return np.asarray([np.asarray(jax.device_get(getattr(sampler, f)))[slot]
                           for f in self._carried], np.float32)

    def copy_prefix(self, src_slot: int, dst_slot: int, length: int) -> None:
        """Give dst_slot the KV of src_slot's positions [0, length) (the whole row is copied;
        entries past `length` are never attended before being overwritten)."""
        if self.paged:
            raise ValueError("copy_prefix is the dense layout's; paged slots share blocks")
        if length > 0 and src_slot != dst_slot:
            self.state = self._copy(self.state, np.int32(src_slot), np.int32(dst_slot))

    def step(self, mask=None) -> Pending:
        """Dispatch one decode step over all slots; returns at once.

        `mask` ([slots, words] int32 packed bits, optional): allowed tokens per slot."""
        return self.sample_step(self.forward_step(), mask)

    def forward_step(self) -> "Forward":
        """The first half of `step`: dispatch the forward pass over the live slots.

        A caller whose masks depend on the previous step's tokens reads them and fills the
        masks while this runs, then calls `sample_step`; nothing else may run in between."""
        live = self._host_pos[self._host_active]
        need = int(live.max()) + 1 if live.size else 1
        attend = next(b for b in self.attend_buckets if b >= min(need, self.max_len))
        slots = np.flatnonzero(self._host_active)
        top = int(slots[-1]) + 1 if slots.size else 1
        rows = next(b for b in self.batch_buckets if b >= top)
        if self._deterministic_slots:      # batch invariance: one shape for every step
            rows, attend = self.batch_buckets[-1], self.attend_buckets[-1]
        self._await_program(programs.decode(rows, attend))   # warmup.py
        dispatched = time.perf_counter()
        cache, reads, _ = self._split(self.state)
        cache, logits = self._forward_for(rows)(self.params, cache, reads,
                                                self._tables_arg(), attend, rows)
        self.state = dict(self.state, cache=cache)
        return Forward(logits, rows, dispatched)

    def sample_step(self, forward: "Forward", mask=None) -> Pending:
        """The second half of `step`: sample from `forward`'s logits under `mask`."""
        if not self._custom_slots:
            self._await_program(programs.sampler(forward.rows, bool(self._full_slots)))
        out = self._sample(forward.logits, self._mask_bits(forward.rows, mask),
                           bool(self._custom_slots), forward.rows, lean=not self._full_slots)
        self._host_pos[self._host_active] += 1
        return Pending(self, out, self.max_slots, forward.dispatched)

    def multi_step(self, steps: int, budget=None, min_left=None, stop_ids=None):
        """Dispatch `steps` decode steps in one program (serving/engine/multi_step.py);
        returns a MultiPending at once. Per slot: budget (tokens it may still produce; 0:
        it does not run; None: no limit for active slots), min_left (min_tokens minus its
        tokens so far) and stop_ids [slots, max_stop_ids] (-1 pads): a row stops on the
        device after an error, a stop id past min_left or its budget. No masks: the
        caller keeps constrained rows on `step`."""
        s = self.max_slots
        budget = (np.where(self._host_active, 2 ** 30, 0).astype(np.int32) if budget is None
                  else np.asarray(budget, np.int32))
        min_left = np.zeros(s, np.int32) if min_left is None else np.asarray(min_left, np.int32)
        stop_ids = (np.full((s, self.max_stop_ids), -1, np.int32) if stop_ids is None
                    else np.asarray(stop_ids, np.int32))
        run = self._host_active & (budget > 0)
        live = self._host_pos[run]
        need = int(live.max()) + steps if live.size else 1
        attend = next(b for b in self.attend_buckets if b >= min(need, self.max_len))
        slots = np.flatnonzero(self._host_active)
        top = int(slots[-1]) + 1 if slots.size else 1
        rows = next(b for b in self.batch_buckets if b >= top)
        pending = self._dispatch_multi(steps, attend, rows, budget, min_left, stop_ids)
        # tokens each slot gains unless it stops early (the scheduler's count ahead)
        pending.advance = np.where(run, np.minimum(steps, budget), 0)
        self._host_pos += pending.advance
        return pending

    max_stop_ids = 16       # stop ids (EOS included) a row may have in a multi-step call

    def multi_step_ok(self) -> bool:
        """Whether every live row can run in `multi_step`: it uses the default sampler
        order and is not `deterministic` (the lean or the full sampler: both have K-step
        programs; serving/engine/multi_step.py says why the other two do not)."""
        return not (self._custom_slots or self._deterministic_slots)

    def _forward_for(self, rows: int):
        """The jitted decode forward over `rows` slots (the matmul library: cpu_matmul)."""
        return self._forward_wide if rows >= WIDE_ROWS else self._forward_step

    def _multi_for(self, rows: int):
        """The jitted multi-step decode over `rows` slots (as `_forward_for`)."""
        return self._multi_wide if rows >= WIDE_ROWS else self._multi

    def _dispatch_multi(self, steps, attend, rows, budget, min_left, stop_ids):
        if not self.multi_step_ok():
            raise ValueError("multi_step: a live row has a custom sampler order or the "
                             "deterministic shape; use step (multi_step_ok)")
        dispatched = time.perf_counter()
        self.state, out = self._multi_for(rows)(self.params, self.state, self._tables_arg(),
                                                self._mask_bits(rows, None), budget,
                                                min_left, stop_ids, steps, attend, rows,
                                                False, not self._full_slots)
        return multi_step.MultiPending(self, out, dispatched)

    def release(self, slot: int) -> None:
        self._custom_slots.discard(slot)
        self._full_slots.discard(slot)
        self._deterministic_slots.discard(slot)
        self._host_active[slot] = False
        self.state["active"] = self._release(self.state["active"], np.int32(slot))


def _resumed(sampler, slot, prompt, prompt_len, orig_len):
    """Sampler state of a resumed sequence: prompt[:orig_len] is its prompt and
    prompt[orig_len:prompt_len] its output so far (the identity when they are equal)."""
    idx = jnp.arange(prompt.shape[0])
    vocab = sampler.out_counts.shape[1]
    count = lambda keep: jnp.zeros((vocab,), jnp.int32).at[prompt].add(keep.astype(jnp.int32))
    put = lambda full, row: jax.lax.dynamic_update_slice_in_dim(full, row[None], slot, axis=0)
    return sampler.replace(
        prompt_len=sampler.prompt_len.at[slot].set(orig_len),
        step=sampler.step.at[slot].set(prompt_len - orig_len),
        out_counts=put(sampler.out_counts, count((idx >= orig_len) & (idx < prompt_len))),
        prompt_counts=put(sampler.prompt_counts, count(idx < orig_len)))


def _committed_like(state, params, mesh):
    """The fresh decode state placed as every program's output will be: replicated over
    the mesh the params are on. Uncommitted, the first call of each program would compile
    a variant of its own (a start-up cost: warm-up's first prefill ran twice)."""
    leaf = next(iter(jax.tree.leaves(params)), None)
    sharding = getattr(leaf, "sharding", None)
    if mesh is not None or not getattr(leaf, "_committed", False) or not hasattr(sharding,
                                                                                "mesh"):
        return state
    from jax.sharding import NamedSharding, PartitionSpec
    return jax.device_put(state, NamedSharding(sharding.mesh, PartitionSpec()))
