"""The decode matmuls' library on CPU (serving/engine/cpu_matmul.py, `--cpu-matmul`).

- an engine on `eigen` compiles its decode forward over 4 slots with no YNNPACK fusion and
  over 1 slot as the default does, and gives the default's greedy tokens, logprobs within
  1e-5;
- `decide` keeps Eigen only where it is 10% faster;
- `auto` measures the model's own matmul chain both ways, and a second start with the
  same machine and shapes reads the kept choice instead of measuring again;
- small models, few slots, int8 params and a mesh stay on XLA's default; a bad choice
  is a ValueError naming the flag's values, and `--cpu-matmul` refuses one.
"""

import json

import numpy as np
import pytest

from model.config import named_config
from model.decoder import init_params
from sampling.params import SamplingParams
from serving.engine import cpu_matmul
from serving.engine.device import DeviceEngine

CFG = named_config("tiny", dtype="float32")
PARAMS = init_params(CFG, seed=5)
GREEDY = SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3)
PROMPTS = [[5, 17, 99, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42], [7, 7, 8, 1]]


def _decode_hlo(engine, rows=4):
    cache, reads, _ = engine._split(engine.state)
    return engine._forward_for(rows).lower(engine.params, cache, reads, engine._tables_arg(),
                                      engine.attend_buckets[0], rows).compile().as_text()


def _tokens(engine, steps=6):
    for slot, prompt in enumerate(PROMPTS):
        engine.insert(slot, np.asarray(prompt, np.int32), 0, GREEDY, seed=1).result()
    out = []
    for _ in range(steps):
        o = engine.step().result()
        out.append((np.asarray(o.tokens[:4]).copy(), np.asarray(o.logprobs[:4]).copy()))
    for slot in range(len(PROMPTS)):
        engine.release(slot)
    return out


def test_eigen_engine_drops_ynnpack_dots_and_keeps_the_tokens(monkeypatch):
    # 4 rows would take our own float32 matvec (model/cpu_matvec.py), not XLA's dots
    monkeypatch.setenv("FLAXSERVE_CPU_MATVEC", "0")
    engines = {c: DeviceEngine(CFG, PARAMS, max_slots=4, max_len=32, prefill_buckets=(16,),
                               cpu_matmul=c) for c in ("default", "eigen")}
    assert engines["eigen"].cpu_matmul == "eigen"
    hlo = {c: _decode_hlo(e) for c, e in engines.items()}
    # XLA's default hands the 4-row dots to YNNPACK (x86 and Arm builds); eigen keeps
    # every dot an XLA dot, outside any YNNPACK fusion
    assert hlo["eigen"].count(" dot(") == hlo["default"].count(" dot(") > 0
    assert "__ynn_fusion" not in hlo["eigen"]
    one = {c: _decode_hlo(e, 1) for c, e in engines.items()}     # one slot: the default
    assert engines["eigen"]._forward_for(1) is engines["eigen"]._forward_step
    assert one["eigen"].count("__ynn_fusion") == one["default"].count("__ynn_fusion")
    a, b = _tokens(engines["default"]), _tokens(engines["eigen"])
    for (ta, la), (tb, lb) in zip(a, b):
        np.testing.assert_array_equal(ta, tb)
        np.testing.assert_allclose(la, lb, atol=1e-5)


def test_decide_wants_a_clear_win():
    assert cpu_matmul.decide({"eigen": 0.7, "default": 1.0}) == "eigen"
    assert cpu_matmul.decide({"eigen": 0.95, "default": 1.0}) == "default"
    assert cpu_matmul.decide({"eigen": 1.2, "default": 1.0}) == "default"


def test_auto_measures_once_then_reads_the_kept_choice(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_matmul, "_CACHE_BYTES", 1)     # the tiny model counts as big
    path = str(tmp_path / "cpu_matmul.json")
    said = []
    first = cpu_matmul.resolve("auto", CFG, PARAMS, 8, cache_path=path, say=said.append)
    assert first in ("default", "eigen")
    assert said and "at 8 rows" in said[0] and "x XLA's default" in said[0]
    kept = json.load(open(path))
    assert list(kept.values()) == [first]

    def no_measure(*_a, **_k):
        raise AssertionError("measured again")

    monkeypatch.setattr(cpu_matmul, "measure", no_measure)
    assert cpu_matmul.resolve("auto", CFG, PARAMS, 8, cache_path=path) == first
    # another decode batch is another key: measured (here: refused) again
    with pytest.raises(AssertionError):
        cpu_matmul.resolve("auto", CFG, PARAMS, 4, cache_path=path)


def test_measure_times_both_choices():
    times = cpu_matmul.measure(CFG, PARAMS, 8, rounds=2)
    assert set(times) == {"default", "eigen"}
    assert all(0 < s < 10 for s in times.values())


def test_where_auto_keeps_the_default():
    # the bundled-size model sits in the cache; a batch under 4 rows; int8 weights; a mesh
    assert cpu_matmul.resolve("auto", CFG, PARAMS, 32) == "default"
    assert cpu_matmul.resolve("auto", CFG, PARAMS, 2) == "default"
    from model.quantize import quantize_params
    q = quantize_params(CFG, PARAMS)
    assert cpu_matmul._weights(CFG, q) is None
    assert cpu_matmul.resolve("auto", CFG, PARAMS, 32, mesh=object()) == "default"
    assert cpu_matmul.resolve("eigen", CFG, PARAMS, 1) == "eigen"      # asked for: kept


def test_bad_choices_are_refused():
    with pytest.raises(ValueError, match="auto, default, eigen"):
        DeviceEngine(CFG, PARAMS, max_slots=2, max_len=16, cpu_matmul="fast")
    with pytest.raises(ValueError, match="once resolved"):
        cpu_matmul.options("auto")
    import argparse

    from serving.flags import add_cpu_matmul_argument
    parser = argparse.ArgumentParser()
    add_cpu_matmul_argument(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--cpu-matmul", "fast"])
    assert parser.parse_args(["--cpu-matmul", "eigen"]).cpu_matmul == "eigen"
