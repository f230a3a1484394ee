"""Multi-step decode (serving/engine/multi_step.py): K steps per dispatch equal K = 1.

- tokens and logprobs of seeded and greedy rows of different lengths are the same as one
  step at a time, on the dense and the paged layout;
- rows stop on the device at max_tokens (their budget), a stop id (not before min_tokens)
  and write nothing after, while the other rows carry on;
- through the Scheduler: the same tokens, finish reasons and usage with --decode-steps 4
  as with 1, stop strings (the tokens after the cut are dropped), EOS and stop ids;
- nothing compiles after the (background) warm-up, which compiles the K-step programs;
- rows that need the full sampler (mirostat, DRY with a windowed penalty, no_repeat_ngram)
  next to a lean row take K-step calls through the Scheduler and give K = 1's tokens and
  logprobs;
- `--decode-steps` below 1 and a bad `bench serve --sampling` are refused, naming the flag.
"""


import dataclasses

import numpy as np
import pytest

from model.config import named_config
from model.decoder import init_params
from sampling.params import SamplingParams
from serving.engine.device import DeviceEngine, compile_count
from serving.engine.multi_step import stop_rows

CFG = named_config("tiny", dtype="float32")
PARAMS = init_params(CFG, seed=3)
K = 4
PROMPTS = [[5, 17, 99, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42], [7, 7, 8]]
SEEDED = SamplingParams(temperature=0.9, top_k=50, logprobs=True, top_logprobs=3)
GREEDY = SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3)


@pytest.fixture(scope="module", params=["dense", "paged"])
def engine(request):
    """Not warmed up (the Scheduler's engine below is, and counts compilations): the same
    shapes as that one, so the paged programs come from the persistent compilation cache."""
    kv = (dict(kv_layout="paged", block_size=16, num_blocks=1 + 4 * 4)
          if request.param == "paged" else {})
    eng = DeviceEngine(CFG, PARAMS, max_slots=4, max_len=64, prefill_buckets=(8, 16),
                       decode_steps=K, **kv)
    if eng.paged:
        for slot in range(4):     # each slot owns 4 blocks of its own: 64 positions
            eng.set_blocks(slot, list(range(1 + 4 * slot, 5 + 4 * slot)))
    return eng


def insert_all(engine, params):
    for slot, prompt in enumerate(PROMPTS):
        engine.insert(slot, np.asarray(prompt, np.int32), 0, params[slot], seed=slot + 1).result()


def release_all(engine):
    for slot in range(len(PROMPTS)):
        engine.release(slot)


def one_at_a_time(engine, params, steps):
    """[slot] -> (tokens, logprobs, top logprobs) of `steps` single decode steps."""
    insert_all(engine, params)
    outs = [engine.step().result() for _ in range(steps)]
    release_all(engine)
    return [(np.array([o.tokens[s] for o in outs]), np.array([o.logprobs[s] for o in outs]),
             np.array([o.top_logprobs[s] for o in outs])) for s in range(len(PROMPTS))]


PARAMS_MIX = [SEEDED, GREEDY, SEEDED, GREEDY]


def test_k_steps_equal_single_steps(engine):
    ref = one_at_a_time(engine, PARAMS_MIX, 2 * K)
    insert_all(engine, PARAMS_MIX)
    steps = engine.multi_step(K).result().steps + engine.multi_step(K).result().steps
    release_all(engine)
    for s in range(len(PROMPTS)):
        tokens = np.array([o.tokens[s] for o in steps])
        assert tokens.tolist() == ref[s][0].tolist(), s
        np.testing.assert_allclose([o.logprobs[s] for o in steps], ref[s][1], atol=1e-6)
        np.testing.assert_allclose([o.top_logprobs[s] for o in steps], ref[s][2], atol=1e-6)


def test_rows_stop_on_the_device(engine):
    ref = one_at_a_time(engine, PARAMS_MIX, 2 * K)
    toks = [r[0].tolist() for r in ref]
    # slot 0: max_tokens mid-loop (2 more); slot 1: a stop id first seen at step j;
    # slot 2: its first token as a stop id, held off by min_tokens at that step; slot 3: free
    j = next(i for i in range(2, 2 * K) if toks[1][i] not in toks[1][:i])
    again = next((i for i in range(1, K) if toks[2][i] == toks[2][0]), K - 1)
    rows = {0: (2, 0, []), 1: (100, 0, [toks[1][j]]), 2: (100, 1, [toks[2][0]]),
            3: (100, 0, [])}
    insert_all(engine, PARAMS_MIX)
    first = engine.multi_step(K, *stop_rows(4, engine.max_stop_ids, rows)).result()
    rows.pop(2)                                  # budget 0: it does not run
    second = engine.multi_step(K, *stop_rows(4, engine.max_stop_ids, rows)).result()
    release_all(engine)
    wrote = np.concatenate([first.wrote, second.wrote])
    steps = first.steps + second.steps
    assert wrote[:, 0].tolist() == [True] * 2 + [False] * (2 * K - 2)
    assert wrote[:, 1].tolist() == [True] * (j + 1) + [False] * (2 * K - j - 1)
    assert wrote[:, 2].tolist() == [True] * (again + 1) + [False] * (2 * K - again - 1)
    assert wrote[:, 3].all()
    for s in range(4):
        got = [int(o.tokens[s]) for o, w in zip(steps, wrote[:, s]) if w]
        assert got == toks[s][:len(got)], s
        np.testing.assert_allclose([o.logprobs[s] for o, w in zip(steps, wrote[:, s]) if w],
                                   ref[s][1][:len(got)], atol=1e-6)


def test_a_stopped_row_writes_nothing_more(engine):
    """A row stopped on the device goes inactive with the position and last token its last
    step left; a row with budget 0 does not run at all."""
    insert_all(engine, [GREEDY] * 4)
    out = engine.multi_step(K, *stop_rows(4, engine.max_stop_ids, {0: (1, 0, [])})).result()
    pos, last, active = (np.asarray(engine.state[k]) for k in ("pos", "last", "active"))
    release_all(engine)
    assert out.wrote[:, 0].tolist() == [True] + [False] * (K - 1) and not out.wrote[:, 1:].any()
    assert engine.position(0) == pos[0] == len(PROMPTS[0]) + 1
    assert last[0] == out.steps[0].tokens[0] and not active.any()
    assert pos[1:].tolist() == [len(p) for p in PROMPTS[1:]]


# ---- through the Scheduler -----------------------------------------------------------------

@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    from checkpoints.tokenizer import load_tokenizer
    from serving.engine.scheduler import Scheduler
    from tests.tokenizer_fixtures import build_bytelevel_dir

    tok = load_tokenizer(str(build_bytelevel_dir(tmp_path_factory.mktemp("tok"))))
    assert tok.vocab_size <= CFG.vocab_size      # token_limit keeps sampled ids in it
    # paged, as `serve` runs (the scheduler gives each row the blocks of its next K
    # positions), with the engine fixture's pool: the same programs
    eng = DeviceEngine(CFG, PARAMS, max_slots=4, max_len=64, prefill_buckets=(8, 16),
                       decode_steps=K, eos_ids=tuple(sorted(tok.stop_ids)),
                       token_limit=tok.vocab_size, kv_layout="paged", block_size=16,
                       num_blocks=1 + 4 * 4)
    # serve's default warm-up: the first request's programs, the rest (the K-step programs
    # among them) on a background thread, which this waits for
    eng.warmup(background=True).join()
    assert not eng.background_errors
    assert any(name.startswith(f"{K}-step decode") for name, _ in eng._rest_jobs())
    sched = Scheduler(eng, tok, prefix_cache=False).start()   # every run prefills afresh
    sched.compiled_after_warmup = compile_count()
    yield sched, tok
    sched.stop(drain_timeout_s=5)


def generate(sched, prompts, sampling, k, logprobs=False):
    """Submit every prompt at once with decode_steps k; [(tokens, text, finish, usage)]
    (logprobs: and each request's TokenLogprobs)."""
    sched.decode_steps = k
    handles = [sched.submit(sched.make_request(f"r{i}", p, dict(sampling[i])))
               for i, p in enumerate(prompts)]
    out, lps = [], []
    for h in handles:
        tokens, text, finish, usage, lp = [], "", None, None, []
        for ev in h:
            if hasattr(ev, "token_ids"):
                tokens += ev.token_ids
                text += ev.text
                lp += ev.logprobs
                finish = ev.finish_reason or finish
            else:
                usage = ev
        assert hasattr(usage, "completion_tokens"), usage
        out.append((tokens, text, finish, usage.completion_tokens))
        lps.append(lp)
    return (out, lps) if logprobs else out


def test_scheduler_k_steps_equal_single_steps(scheduler):
    sched, tok = scheduler
    prompts = [tok.encode(t) for t in ("Hello world", "The quick brown fox jumps", "a")]
    base = [{"temperature": 0.0, "max_tokens": 13, "ignore_eos": True},
            {"temperature": 0.8, "max_tokens": 9, "ignore_eos": True, "seed": 5},
            {"temperature": 0.8, "max_tokens": 20, "seed": 6}]
    ref = generate(sched, prompts, base, 1)
    assert generate(sched, prompts, base, K) == ref
    # a stop id, a stop string (cut mid-block: the tokens after it are dropped) and EOS
    t0, t1 = ref[0][0], ref[1][0]
    j = next(i for i in range(2, len(t0)) if t0[i] not in t0[:i])
    text = ref[1][1]
    stop = text[len(text) // 3:len(text) // 3 + 2]
    cut = [dict(base[0], stop_token_ids=[t0[j]]), dict(base[1], stop=[stop]),
           dict(base[2], ignore_eos=False),
           dict(base[0], stop_token_ids=[t0[j]], min_tokens=j + 2)]   # held off, then?
    ref_cut = generate(sched, prompts + prompts[:1], cut, 1)
    got = generate(sched, prompts + prompts[:1], cut, K)
    assert got == ref_cut
    assert got[0][0] == t0[:j + 1] and got[0][2] == "stop"
    assert got[1][2] == "stop" and got[1][1] == text[:text.find(stop)]
    assert got[1][3] == len(got[1][0]) < len(t1)      # usage counts the returned tokens
    assert compile_count() == sched.compiled_after_warmup



def test_generate_loop_with_k_steps(engine):
    """`flaxserve generate`'s loop (serving/generate.py) on K-step calls: the tokens and
    logprobs of one step at a time, stopping at a stop id and at max_tokens."""
    from serving.generate import generate
    prompt = np.asarray(PROMPTS[1], np.int32)
    free = dataclasses.replace(SEEDED, max_tokens=10, ignore_eos=True)
    engine.decode_steps = 1
    ref, ref_lp = generate(engine, None, prompt, free, 7)
    j = next(i for i in range(2, len(ref)) if ref[i] not in ref[:i])
    stop = dataclasses.replace(free, stop_token_ids=[ref[j]])
    ref_stop, _ = generate(engine, None, prompt, stop, 7)
    engine.decode_steps = K
    got, got_lp = generate(engine, None, prompt, free, 7)
    assert got == ref and len(got) == 10
    np.testing.assert_allclose([r[1] for r in got_lp], [r[1] for r in ref_lp], atol=1e-6)
    assert generate(engine, None, prompt, stop, 7)[0] == ref_stop == ref[:j + 1]


def test_scheduler_full_sampler_rows_run_k_steps(scheduler, monkeypatch):
    """Rows that need the full sampler (sampling/sampler.py `needs_full`), each with state
    the device carries from step to step: mirostat's mu (its processed logprobs show it),
    DRY over the history with a windowed repetition penalty, no_repeat_ngram; next to a
    lean row. Through the Scheduler they take K-step calls and give the tokens and
    logprobs of K = 1, and nothing compiles after the background warm-up (its full-sampler
    K-step jobs)."""
    sched, tok = scheduler
    calls = []
    multi_step = sched.engine.multi_step
    monkeypatch.setattr(sched.engine, "multi_step",
                        lambda *a, **kw: calls.append(a[0]) or multi_step(*a, **kw))
    prompts = [tok.encode(t) for t in ("Hello world", "The quick brown fox jumps", "a", "zz")]
    common = {"max_tokens": 10, "ignore_eos": True, "logprobs": True, "top_logprobs": 3}
    sampling = [dict(common, temperature=0.9, seed=3, mirostat_mode=2, mirostat_tau=3.0,
                     mirostat_eta=0.5, logprobs_mode="processed"),
                dict(common, temperature=0.0),
                dict(common, temperature=0.9, seed=4, dry_multiplier=1.5,
                     dry_allowed_length=1, repetition_penalty=1.6, penalty_window=4),
                dict(common, temperature=0.0, no_repeat_ngram_size=2)]
    from sampling.params import SamplingParams as P
    from sampling.rows import make_rows
    from sampling.sampler import needs_full
    rows = make_rows([P(**{k: v for k, v in p.items() if k != "logprobs_mode"})
                      for p in sampling], CFG.vocab_size, [1] * 4, [0] * 4)
    assert needs_full(rows).tolist() == [True, False, True, True]
    compiled = compile_count()      # (needs_full's host predicates may compile a jnp.any)
    ref, ref_lp = generate(sched, prompts, sampling, 1, logprobs=True)
    assert not calls
    got, got_lp = generate(sched, prompts, sampling, K, logprobs=True)
    assert calls and set(calls) == {K}
    assert got == ref
    for a, b in zip(got_lp, ref_lp):
        assert [x.token_id for x in a] == [x.token_id for x in b]
        assert [x.top_ids for x in a] == [x.top_ids for x in b]
        np.testing.assert_allclose([x.logprob for x in a], [x.logprob for x in b], atol=1e-6)
        np.testing.assert_allclose([x.top_logprobs for x in a], [x.top_logprobs for x in b],
                                   atol=1e-6)
    seq = prompts[3] + got[3][0]          # no_repeat_ngram held: no bigram repeats
    assert len(set(zip(seq, seq[1:]))) == len(seq) - 1
    assert compile_count() == compiled


@pytest.mark.parametrize("argv", [["engine"], ["serve"], ["generate", "--prompt", "hi", "--max-tokens", "4"],
                                  ["bench", "serve"], ["bench", "decode", "--config", "tiny"]])
@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_decode_steps_below_one_is_refused(argv, value, capsys):
    """--decode-steps 0 (or negative, or not a number) is an argparse error naming the flag,
    not a silent K = 1; no engine starts."""
    from serving.cli import build_parser
    parser = build_parser()
    assert parser.parse_args([*argv, "--decode-steps", "3"]).decode_steps == 3
    with pytest.raises(SystemExit) as e:
        parser.parse_args([*argv, "--decode-steps", value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --decode-steps: must be an integer >= 1" in err and repr(value) in err


def test_bench_serve_sampling_option(capsys):
    """`bench serve --sampling JSON` (how the full-sampler K-step figures were measured): a
    JSON object joins every request's sampling; anything else is refused, naming the flag,
    before an engine starts."""
    from serving import cli
    from serving.bench_serve import sampling_option
    args = cli.build_parser().parse_args(["bench", "serve", "--sampling",
                                          '{"penalty_window": 8, "repetition_penalty": 1.1}'])
    assert sampling_option(args) == {"penalty_window": 8, "repetition_penalty": 1.1}
    for bad in ("[1]", "{x"):
        assert cli.main(["bench", "serve", "--config", "tiny", "--sampling", bad]) == 2
        assert "--sampling must be a JSON object" in capsys.readouterr().err
