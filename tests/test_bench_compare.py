"""`flaxserve bench compare` runs us and transformers `generate` on the same prompts and
prints every figure (tiny random config; the HTTP peers need --model and are skipped)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_compare_prints_every_figure_and_skips_missing_peers():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "serving.cli", "bench", "compare", "--config", "tiny",
         "--concurrency", "1,2", "--num-requests", "2", "--prompt-len", "8",
         "--output-len", "4"], capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    lines = proc.stdout.splitlines()
    assert "TTFT ms p50" in proc.stdout and "TPOT ms p50" in proc.stdout
    assert "MB/token" in proc.stdout
    for who in ("flaxserve", "hf"):
        rows = [line.split() for line in lines if line.split()[:1] == [who]]
        assert [r[1] for r in rows] == ["1", "2"], rows        # both concurrencies
        for r in rows:
            assert r[2] == "2"                                   # both requests completed
            figures = [float(r[i]) for i in (3, 5, 6, 8, 9, 11)]  # tok/s, TTFT, TPOT, MB
            assert all(f > 0 for f in figures), r
    for conc in (1, 2):
        ratio = next(line for line in lines if line.startswith(f"us/hf at concurrency {conc}:"))
        assert ratio.count("x") >= 4 and "bytes/token 1.00x" in ratio   # same float32 weights
    assert "hf-serve: skipped:" in proc.stdout and "llama: skipped:" in proc.stdout
    assert "load average" in proc.stdout
