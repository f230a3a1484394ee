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
            figures = [float(r[i]) for i in (3, 5, 6, 11)]       # tok/s, TTFT, MB
            assert all(f > 0 for f in figures), r
            # TPOT: 0.0 when a loaded machine's stream coalesced a request's 4 tokens into
            # one message (seen once in CI), never negative or NaN
            assert all(float(r[i]) >= 0 for i in (8, 9)), r
        assert any(float(r[8]) > 0 for r in rows), rows
    for conc in (1, 2):
        ratio = next(line for line in lines if line.startswith(f"us/hf at concurrency {conc}:"))
        assert ratio.count("x") >= 4 and "bytes/token 1.00x" in ratio   # same float32 weights
    assert "hf-serve: skipped:" in proc.stdout and "llama: skipped:" in proc.stdout
    assert "load average" in proc.stdout


def test_llama_gguf_flag_errors_name_the_flag(tmp_path, monkeypatch):
    """--llama-gguf: a missing file, or f32 with no llama.cpp sources for the converter,
    is a ValueError naming the flag (pure: nothing runs)."""
    import argparse

    import pytest

    from serving import bench_compare, bench_peers
    parser = argparse.ArgumentParser()
    bench_compare.add_arguments(parser)
    monkeypatch.delenv("FLAXSERVE_LLAMA_SRC", raising=False)
    monkeypatch.setenv("FLAXSERVE_MODELS", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))            # no llama-server to look beside
    with pytest.raises(ValueError, match="--llama-gguf: no such file"):
        bench_compare.run(parser.parse_args(["--config", "tiny", "--llama-gguf",
                                             "own," + str(tmp_path / "nope.gguf")]))
    args = parser.parse_args(["--llama-gguf", "f32"])
    with pytest.raises(ValueError, match="--llama-src"):
        bench_peers.llama_gguf(args, str(tmp_path / "m.gguf"), print)
    args = parser.parse_args(["--llama-gguf", str(tmp_path / "m.gguf")])
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert bench_peers.llama_gguf(args, "other.gguf", print) == str(tmp_path / "m.gguf")
    assert bench_peers.llama_gguf(parser.parse_args([]), "own.gguf", print) == "own.gguf"
    assert [bench_peers.llama_label(c) for c in ("own", "f32", "/a/b.gguf")] == \
        ["llama", "llama-f32", "llama-b"]
