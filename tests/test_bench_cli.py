"""The benchmark commands run and print their figures (tiny sizes; no timing asserted)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flaxserve(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "serving.cli", *args], capture_output=True,
                          text=True, env=env, timeout=900, cwd=ROOT)


def test_bench_decode_prints_every_figure():
    proc = flaxserve("bench", "decode", "--config", "tiny", "--batch", "1,4", "--prompt-len", "8",
                     "--new-tokens", "4", "--hf-batch", "1", "--bandwidth-mib", "64", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["bandwidth_gb_s"] > 0 and out["roofline_tokens_s"] > 0
    one, four = out["runs"]
    assert one["batch"] == 1 and 0 < one["roofline_fraction"] and one["hf_tokens_s"] > 0
    assert four["batch"] == 4 and four["tokens_s"] > 0 and four["vs_batch1"] > 0
    assert "hf_tokens_s" not in four


def test_bench_sampling_prints_on_and_off():
    proc = flaxserve("bench", "sampling", "--slots", "4", "--vocab", "300", "--iters", "2",
                     "--history", "16", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["all_on_ms"] > 0 and out["all_off_ms"] > 0


def test_bench_rejects_bad_flags():
    proc = flaxserve("bench", "decode", "--config", "tiny", "--batch", "0")
    assert proc.returncode == 2 and "--batch" in proc.stderr
    proc = flaxserve("bench", "decode", "--config", "tiny", "--bandwidth-mib", "0")
    assert proc.returncode == 2 and "--bandwidth-mib" in proc.stderr
    proc = flaxserve("bench", "decode", "--config", "nope")
    assert proc.returncode == 2 and "unknown config" in proc.stderr


def test_bench_serve_in_process_prints_both_loads():
    proc = flaxserve("bench", "serve", "--config", "tiny", "--concurrency", "1,4",
                     "--num-requests", "4", "--prompt-len", "8", "--output-len", "5", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    one, four = out["runs"]
    assert (one["concurrency"], four["concurrency"]) == (1, 4)
    for r in (one, four):
        assert r["completed"] == 4 and r["errors"] == 0 and r["output_tokens"] == 4 * 5
        assert 0 < r["ttft_ms"]["p50"] <= r["ttft_ms"]["p99"]
        assert r["tpot_ms"]["mean"] > 0 and r["itl_ms"]["mean"] > 0
    assert out["throughput_ratio_last_vs_first"] > 0


def test_bench_grammar_prints_masked_and_unmasked():
    proc = flaxserve("bench", "grammar", "--config", "tiny", "--batch", "1,2", "--steps", "4",
                     "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["batch"] for r in out["runs"]] == [1, 2]
    for r in out["runs"]:
        assert r["unconstrained_step_ms"] > 0 and r["constrained_step_ms"] > 0
        assert r["host_fill_ms_per_row"] > 0
        assert r["compiled_while_timed"] == 0       # the untimed pass compiled it all
