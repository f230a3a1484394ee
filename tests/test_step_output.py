"""One packed device->host read per engine step (serving/engine/step_output.py).

- `pack` then `unpack` gives every SampleOutput field back bit for bit (NaN payloads,
  +-inf, -0.0, denormals, the -9999 floor, negative ids, bools), at K = 0 and K > 0, and
  padding the packed array equals padding each field (`pad_rows`);
- a wrong dtype is refused rather than bit-cast into extra columns;
- through the engine, a run of inserts (one at a time and batched), plain and masked
  steps (an all-masked row: the error path), greedy, seeded, logprobs_mode "all" and
  entropy rows, and a multi-step call gives StepOutputs byte-identical, field by field, to
  the path before packing: each program's SampleOutput read array by array
  (`OldPathEngine` below keeps that path: the sampler's SampleOutput computed directly,
  `host_output` and `pad_rows`, the sampling rows donated with the state), and each
  Pending holds one array.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import named_config
from model.decoder import init_params
from sampling.params import SamplingParams
from sampling.sampler import LOGPROB_FLOOR, SampleOutput
from serving.engine import device as device_module
from serving.engine import multi_step
from serving.engine.device import DeviceEngine
from serving.engine.step_output import SCALARS, StepOutput, pack, pad_packed, unpack

CFG = named_config("tiny", dtype="float32")
PARAMS = init_params(CFG, seed=3)
TOP = 5


def pad_rows(out: StepOutput, slots: int) -> StepOutput:
    """The old path (before the packed read): outputs of a step over the first rows, zero-padded to every slot."""
    def pad(x):
        if x is None or x.ndim == 0 or x.shape[0] == slots:
            return x
        return np.concatenate([x, np.zeros((slots - x.shape[0],) + x.shape[1:], x.dtype)])
    return StepOutput(tokens=pad(out.tokens), logprobs=pad(out.logprobs), ranks=pad(out.ranks),
                      top_ids=pad(out.top_ids), top_logprobs=pad(out.top_logprobs),
                      errors=pad(out.errors), device_seconds=out.device_seconds,
                      entropies=pad(out.entropies), raw_logprobs=pad(out.raw_logprobs),
                      processed_logprobs=pad(out.processed_logprobs),
                      unconstrained_logprobs=pad(out.unconstrained_logprobs),
                      removed_mass=pad(out.removed_mass))


def host_output(out, seconds: float) -> StepOutput:
    """The old path: a StepOutput from the sampler's SampleOutput copied array by array."""
    return StepOutput(
        tokens=np.asarray(out.tokens), logprobs=np.asarray(out.logprob),
        ranks=np.asarray(out.rank), top_ids=np.asarray(out.top_ids),
        top_logprobs=np.asarray(out.top_logprobs), errors=np.asarray(out.error),
        device_seconds=seconds, entropies=np.asarray(out.entropy),
        raw_logprobs=np.asarray(out.raw_logprob),
        processed_logprobs=np.asarray(out.processed_logprob),
        unconstrained_logprobs=np.asarray(out.unconstrained_logprob),
        removed_mass=np.asarray(out.removed_mass))



def same(a: StepOutput, b: StepOutput) -> None:
    """Every array field of a and b: same dtype, shape and bytes."""
    for f in dataclasses.fields(StepOutput):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "device_seconds":
            continue
        assert (x is None) == (y is None), f.name
        if x is None:
            continue
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, (f.name, x.dtype, y.dtype,
                                                           x.shape, y.shape)
        assert np.ascontiguousarray(x).tobytes() == np.ascontiguousarray(y).tobytes(), f.name


def special_output(rows: int, k: int, seed: int = 0) -> SampleOutput:
    rng = np.random.default_rng(seed)
    specials = np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-45, LOGPROB_FLOOR,
                         np.float32(3.4e38)], np.float32)
    # NaNs with other payloads (quiet and signalling bit patterns)
    specials = np.concatenate([specials, np.array([0x7fc00001, 0xffc12345, 0x7f800001],
                                                  np.uint32).view(np.float32)])

    def floats(*shape):
        x = rng.standard_normal(shape).astype(np.float32) * 10
        hit = rng.random(shape) < 0.4
        x[hit] = rng.choice(specials, size=int(hit.sum()))
        return jnp.asarray(x)

    ints = lambda *shape: jnp.asarray(rng.integers(-2 ** 31, 2 ** 31, shape, dtype=np.int64)
                                      .astype(np.int32))
    return SampleOutput(tokens=ints(rows), logprob=floats(rows), raw_logprob=floats(rows),
                        processed_logprob=floats(rows), rank=ints(rows),
                        top_ids=ints(rows, k), top_logprobs=floats(rows, k),
                        entropy=floats(rows), error=jnp.asarray(rng.random(rows) < 0.5),
                        unconstrained_logprob=floats(rows), removed_mass=floats(rows))


@pytest.mark.parametrize("rows,k", [(1, 0), (3, 1), (6, 20)])
def test_pack_round_trip_is_bit_exact(rows, k):
    out = special_output(rows, k, seed=rows)
    packed = jax.device_get(jax.jit(pack)(out))
    assert packed.dtype == np.int32 and packed.shape == (rows, SCALARS + 2 * k)
    ref = host_output(jax.device_get(out), 0.25)
    got = unpack(packed, 0.25)
    same(got, ref)
    assert got.device_seconds == 0.25
    assert got.errors.dtype == bool and got.errors.tolist() == ref.errors.tolist()
    # the NaNs in it kept their payloads (a float round trip could make them canonical)
    bits = lambda x: np.ascontiguousarray(x).view(np.uint32)
    assert (bits(got.top_logprobs) == bits(np.asarray(out.top_logprobs))).all()
    for slots in (rows, rows + 1, 8):
        same(unpack(pad_packed(packed, slots), 0.0), pad_rows(ref, slots))


def test_pack_refuses_other_dtypes():
    out = special_output(2, 1)
    with pytest.raises(TypeError, match="float32"):
        pack(out.replace(entropy=out.entropy.astype(jnp.float16)))
    with pytest.raises(TypeError, match="int32"):
        pack(out.replace(tokens=out.tokens.astype(jnp.int16)))
    with pytest.raises(ValueError, match="int32"):
        unpack(np.zeros((2, SCALARS + 1), np.int32), 0.0)


# -- the path before packing, kept as the reference ---------------------------------------

class OldPending:
    """step_output.Pending as it was: the SampleOutput pytree read array by array."""

    def __init__(self, engine, out, slots=None, dispatched=None):
        self._out, self._slots = out, slots

    def result(self):
        assert isinstance(self._out, SampleOutput)
        out = host_output(jax.device_get(self._out), 0.0)
        return out if self._slots is None else pad_rows(out, self._slots)


def old_run(forward_step, sample_step, params, state, tables, mask_bits, budget, min_left,
            stop_ids, steps, attend_len, rows, custom, lean=True):
    """multi_step.run as it was: the SampleOutput fields stacked, and `wrote` apart."""
    put = lambda full, part: jax.lax.dynamic_update_slice_in_dim(full, part, 0, axis=0)
    budget, min_left, stop_ids = budget[:rows], min_left[:rows], stop_ids[:rows]
    state = dict(state, active=put(state["active"], state["active"][:rows] & (budget > 0)))

    def one(state, taken):
        alive = state["active"][:rows]
        state, logits = forward_step(params, state, tables, attend_len, rows)
        state, out = sample_step(state, logits, mask_bits, custom, rows, lean=lean)
        n = taken + 1
        hit = jnp.any(out.tokens[:, None] == stop_ids, axis=-1) & (n > min_left)
        stop = out.error | hit | (n >= budget)
        state = dict(state, active=put(state["active"], alive & ~stop))
        return state, taken + alive.astype(jnp.int32), out, alive

    shapes = jax.eval_shape(lambda st: one(st, jnp.zeros((rows,), jnp.int32))[2:], state)
    bufs = jax.tree.map(lambda x: jnp.zeros((steps,) + x.shape, x.dtype), shapes)

    def body(carry):
        i, state, taken, bufs = carry
        state, taken, out, alive = one(state, taken)
        bufs = jax.tree.map(lambda b, x: jax.lax.dynamic_update_index_in_dim(b, x, i, 0),
                            bufs, (out, alive))
        return i + 1, state, taken, bufs

    def more(carry):
        i, state, _, _ = carry
        return (i < steps) & jnp.any(state["active"][:rows])

    _, state, _, outs = jax.lax.while_loop(
        more, body, (jnp.int32(0), state, jnp.zeros((rows,), jnp.int32), bufs))
    return state, outs


class OldMultiPending:
    def __init__(self, engine, out, dispatched):
        self._engine, self._out = engine, out

    def result(self):
        out, wrote = jax.device_get(self._out)
        slots = self._engine.max_slots
        steps = [pad_rows(host_output(jax.tree.map(lambda x, j=j: x[j], out), 0.0), slots)
                 for j in range(wrote.shape[0])]
        full = np.zeros((wrote.shape[0], slots), bool)
        full[:, :wrote.shape[1]] = wrote
        return multi_step.MultiStepOutput(steps, full, 0.0)


class OldPathEngine(DeviceEngine):
    """The engine with its programs handing back the SampleOutput itself (unpacked), and
    its decode sampler taking the whole state but the cache donated, sampling rows too."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._old_sample_step = jax.jit(self._sample_step_fn, donate_argnums=(0,),
                                        static_argnums=(3, 4, 5), static_argnames=("lean",))

    def _sample(self, logits, mask_bits, custom, rows, lean):
        cache, _, rest = self._split(self.state)
        rest, out = self._old_sample_step(rest, logits, mask_bits, custom, rows, lean=lean)
        self.state = dict(rest, cache=cache)
        return out

    def _first_packed_fn(self, state, logits, slot, row, prompt, prompt_len, mask_bits, custom,
                         orig_len, carry, restore, lean=False):
        return self._first_fn(state, logits, slot, row, prompt, prompt_len, mask_bits, custom,
                              orig_len, carry, restore, lean=lean)

    def _multi_fn(self, params, state, tables, mask_bits, budget, min_left, stop_ids,
                  steps, attend_len, rows, custom, lean=True):
        return old_run(self._forward_step_fn, self._sample_step_fn, params, state, tables,
                       mask_bits, budget, min_left, stop_ids, steps, attend_len, rows,
                       custom, lean)


def workload(engine) -> tuple:
    """Inserts, steps and a multi-step call: every output in order, the multi-step one,
    and what each Pending held before its result was read."""
    rng = np.random.default_rng(1)
    prompt = lambda n: rng.integers(0, CFG.vocab_size, n).astype(np.int32)
    seeded = SamplingParams(temperature=0.9, top_k=40, logprobs_mode="all",
                            return_entropy=True)
    outs = [engine.insert(0, prompt(7), 0, SamplingParams(temperature=0.0), seed=0),
            engine.insert(1, prompt(12), 0, seeded, seed=11)]
    outs += engine.insert_many([
        dict(slot=2, prompt_ids=prompt(5), sampling=SamplingParams(temperature=0.7), seed=5),
        dict(slot=3, prompt_ids=prompt(6), sampling=SamplingParams(
            temperature=0.0, logprobs_mode="processed", repetition_penalty=1.3), seed=0)])
    held = [p._out for p in outs]
    outs = [p.result() for p in outs]
    for _ in range(3):
        p = engine.step()
        held.append(p._out)
        outs.append(p.result())
    mask = np.full((engine.max_slots, engine.mask_words), -1, np.int32)
    mask[3] = 0                      # nothing allowed: the error row
    mask[0] = 0
    mask[0, 0] = 1 << 5              # only token 5
    outs.append(engine.step(mask).result())
    engine.release(2)
    engine.release(3)
    outs.append(engine.step().result())      # over 2 rows, padded to the 4 slots
    multi = engine.multi_step(3).result()
    return outs, multi, held


def test_engine_outputs_equal_the_unpacked_path(monkeypatch):
    kw = dict(max_slots=4, max_len=64, prefill_buckets=(8, 16), num_top_logprobs=TOP,
              prefill_batch=2)
    with monkeypatch.context() as m:
        m.setattr(device_module, "Pending", OldPending)
        m.setattr(multi_step, "MultiPending", OldMultiPending)
        old_outs, old_multi, old_held = workload(OldPathEngine(CFG, PARAMS, **kw))
    engine = DeviceEngine(CFG, PARAMS, **kw)
    new_outs, new_multi, held = workload(engine)
    # one array to read per call: [1 or 4 rows, 9 + 2K]
    width = SCALARS + 2 * TOP
    assert all(isinstance(h, jax.Array) for h in held)
    assert [h.shape for h in held] == [(1, width)] * 4 + [(4, width)] * 3
    assert all(isinstance(h, SampleOutput) for h in old_held)
    assert engine.batched_prefills == 1                 # insert_many's batched path ran
    assert len(new_outs) == len(old_outs) == 9
    for i, (a, b) in enumerate(zip(new_outs, old_outs)):
        same(a, b)
    assert len(new_multi.steps) == len(old_multi.steps) == 3
    for a, b in zip(new_multi.steps, old_multi.steps):
        same(a, b)
    assert new_multi.wrote.tolist() == old_multi.wrote.tolist()
    assert new_multi.wrote[:, :2].all() and not new_multi.wrote[:, 2:].any()
    # the run went through what it is meant to cover
    masked = new_outs[7]
    assert masked.errors.tolist() == [False, False, False, True]
    assert masked.tokens[0] == 5 and masked.logprobs[3] == LOGPROB_FLOOR
    assert (new_outs[1].raw_logprobs != new_outs[1].processed_logprobs).all()
    assert new_outs[1].entropies[0] > 0 and new_outs[4].entropies[1] > 0
    assert new_outs[4].top_ids.shape == (4, TOP)
