"""The peers of `flaxserve bench compare`, and what it needs to drive any server.

bench_compare.py is the command (flags, our own run, the report); this module is how each
peer runs: transformers `generate()` in the process (`hf`), `transformers serve` over HTTP
(`hf-serve`, on a float32 safetensors dir dequantised once from the GGUF) and llama.cpp's
server (`llama`, on the GGUF itself or, for equal bytes per token, on an F32/F16 GGUF made
from that float32 dir by llama.cpp's own converter). The pieces both sides use live here
too (a server subprocess, the streaming OpenAI client, the figures), so the arrows point
one way: bench_compare -> bench_peers -> bench_serve.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from serving.bench_serve import Trace, run_clients

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_PRECISIONS = ("f32", "f16")


# -- figures -------------------------------------------------------------------------------------

def percentiles(values: list[float]) -> dict:
    """p50 and p90 in ms (None when there are no values)."""
    if not values:
        return {"p50": None, "p90": None}
    a = np.asarray(values, np.float64) * 1000.0
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90))}


def summarise(traces: list[Trace], wall: float, concurrency: int) -> dict:
    done = [t for t in traces if t.error is None and t.tokens > 0]
    errors = [t.error for t in traces if t.error is not None]
    tokens = sum(t.tokens for t in done)
    ttft = [t.token_times[0] for t in done]
    tpot = [(t.token_times[-1] - t.token_times[0]) / (t.tokens - 1) for t in done if t.tokens > 1]
    return {"concurrency": concurrency, "requests": len(traces), "completed": len(done),
            "errors": len(errors), "first_error": errors[0] if errors else None,
            "output_tokens": tokens, "wall_s": wall, "tokens_s": tokens / wall,
            "ttft_ms": percentiles(ttft), "tpot_ms": percentiles(tpot)}


def weight_bytes_torch(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    if not model.config.tie_word_embeddings:
        e = model.get_input_embeddings().weight
        total -= e.numel() * e.element_size()
    return total


def weight_bytes_gguf(path: str) -> int:
    from checkpoints.gguf_read import GGUFFile
    tensors = GGUFFile(path).tensors
    total = sum(int(t.n_bytes) for t in tensors.values())
    if "output.weight" in tensors:          # untied: the embedding is only gathered
        total -= int(tensors["token_embd.weight"].n_bytes)
    return total


# -- a streaming client ---------------------------------------------------------------------

class TextHttpTarget:
    """Streams OpenAI `/v1/completions` with text prompts (any OpenAI-style server)."""

    def __init__(self, url: str, output_len: int):
        import requests
        self.url, self.output_len = url.rstrip("/"), output_len
        self.model = requests.get(self.url + "/v1/models", timeout=30).json()["data"][0]["id"]
        self.extra = {"ignore_eos": True}
        self._local = threading.local()

    def send(self, prompt: str, trace: Trace, retried: bool = False) -> None:
        import requests
        session = getattr(self._local, "s", None) or requests.Session()
        self._local.s = session
        try:
            self._post(session, prompt, trace)
        except requests.ConnectionError:
            # a kept-alive connection the server has closed meanwhile (llama-server does):
            # once, on a new connection, if no token had come yet
            self._local.s = None
            if retried or trace.tokens:
                raise
            self.send(prompt, trace, retried=True)

    def _post(self, session, prompt: str, trace: Trace) -> None:
        body = {"model": self.model, "prompt": prompt, "max_tokens": self.output_len,
                "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
                **self.extra}
        with session.post(self.url + "/v1/completions", json=body, stream=True,
                          timeout=3600) as r:
            if r.status_code in (400, 422) and "ignore_eos" in r.text and self.extra:
                self.extra = {}                 # this server has no ignore_eos: plain greedy
                return self._post(session, prompt, trace)
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            usage = None
            for line in r.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                if any(c.get("text") for c in chunk.get("choices") or []):
                    trace.add(1)
            if usage and usage.get("completion_tokens") and trace.tokens:
                trace.tokens = int(usage["completion_tokens"])   # chunks may hold several


# -- servers ---------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(cmd: list[str], port: int, timeout: float, log_name: str, env=None,
           ready=("/v1/models",)):
    """A server subprocess (own process group), up when GET of each `ready` path answers
    200 (flaxserve: also /health, which is 503 until its engine serves)."""
    import requests
    log = tempfile.NamedTemporaryFile("w+", prefix=f"bench-compare-{log_name}-",
                                      suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env=env or os.environ.copy(), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"{log_name} exited with {proc.returncode}: "
                                   f"{log.read()[-800:]}")
            with contextlib.suppress(requests.RequestException):
                if all(requests.get(url + path, timeout=5).status_code == 200
                       for path in ready):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{log_name} did not answer within {timeout:.0f} s "
                                   f"(log {log.name})")
            time.sleep(1.0)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        os.unlink(log.name)


# -- running a load ----------------------------------------------------------------------------

def timed_batches(generate_batch, prompts, concurrency: int, count: int) -> dict:
    """Static batches of `concurrency` prompts; generate_batch(prompts, traces) fills traces."""
    traces = []
    t0 = time.perf_counter()
    for i in range(0, count, concurrency):
        batch = prompts[i:min(i + concurrency, count)]
        start = time.perf_counter()
        ts = [Trace(start=start) for _ in batch]
        try:
            generate_batch(batch, ts)
        except Exception as e:  # reported, never silently dropped
            for t in ts:
                t.error = f"{type(e).__name__}: {e}"
        traces += ts
    return summarise(traces, time.perf_counter() - t0, concurrency)


def hf_generate_runner(model, output_len: int):
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self, traces):
            self.traces, self.first = traces, True

        def put(self, value):
            if self.first:              # generate() puts the prompt first
                self.first = False
                return
            for t in self.traces:
                t.add(1)

        def end(self):
            pass

    def generate_batch(batch, traces):
        ids = torch.tensor(batch, dtype=torch.long)
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                           min_new_tokens=output_len, do_sample=False, pad_token_id=0,
                           streamer=Clock(traces))
    return generate_batch


def run_traced(send, prompts, concurrencies, counts) -> list[dict]:
    """Fixed-concurrency clients (bench serve's loop), summarised with p50/p90; one
    uncounted request first warms connections and lazy paths."""
    def load(ps, conc):
        traces = [Trace(start=0.0) for _ in ps]

        def one(i):
            traces[i].start = time.perf_counter()
            try:
                send(ps[i], traces[i])
            except Exception as e:  # counted and reported, never silently dropped
                traces[i].error = f"{type(e).__name__}: {e}"
        return summarise(traces, run_clients(len(ps), conc, one), conc)

    load(prompts[:1], 1)
    return [load(prompts[:count], conc) for conc, count in zip(concurrencies, counts)]


# -- the peers ------------------------------------------------------------------------------------

def hf_dir_for(source: str, say) -> str:
    """A float32 safetensors dir transformers serve can load (GGUF: dequantised once)."""
    if os.path.isdir(source):
        return source
    from checkpoints.resolve import cache_dir
    out = os.path.join(cache_dir(), "bench-hf", os.path.basename(source) + ".hf")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    import torch
    import transformers
    say(f"dequantising {os.path.basename(source)} into {out} for transformers serve")
    d, f = os.path.dirname(source), os.path.basename(source)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    cfg = model.config
    cfg.architectures = [type(model).__name__]
    if hasattr(cfg, "quantization_config"):     # not serialisable as a GGUF-quantised model
        del cfg.quantization_config
    fresh = type(model)(cfg)
    fresh.load_state_dict(model.state_dict())
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def llama_command(args, gguf: str, port: int, max_conc: int, ctx: int):
    """llama-server's command line, else llama-cpp-python's server's, else None."""
    binary = args.llama_server or shutil.which("llama-server")
    if binary:
        return [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-t",
                str(args.threads), "--parallel", str(max_conc), "-c", str(ctx * max_conc)]
    python = args.llama_python or os.environ.get("FLAXSERVE_LLAMA_PYTHON") or sys.executable
    probe = subprocess.run([python, "-c", "import llama_cpp.server"], capture_output=True)
    if probe.returncode != 0:
        return None
    return [python, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1",
            "--port", str(port), "--n_threads", str(args.threads), "--n_ctx", str(ctx)]


def llama_src(args) -> str | None:
    """A llama.cpp source tree (for its GGUF converter): --llama-src, $FLAXSERVE_LLAMA_SRC,
    else a folder above the llama-server binary that holds convert_hf_to_gguf.py."""
    given = args.llama_src or os.environ.get("FLAXSERVE_LLAMA_SRC")
    if given:
        return given
    binary = args.llama_server or shutil.which("llama-server")
    d = os.path.dirname(os.path.realpath(binary)) if binary else None
    while d and d != os.path.dirname(d):
        if os.path.isfile(os.path.join(d, "convert_hf_to_gguf.py")):
            return d
        d = os.path.dirname(d)
    return None


def llama_label(choice: str) -> str:
    """The report's name for llama.cpp on one --llama-gguf choice."""
    if choice == "own":
        return "llama"
    if choice in LLAMA_PRECISIONS:
        return f"llama-{choice}"
    return "llama-" + os.path.splitext(os.path.basename(choice))[0][:16]


def llama_gguf(args, source: str, say) -> str:
    """The GGUF llama.cpp runs: the model's own (unset or `own`), a path, or f32/f16:
    the float32 dir transformers serve gets, written back out by llama.cpp's own converter
    (once, into the model cache), so both sides read the same bytes per token."""
    want = args.llama_gguf
    if not want or want == "own":
        return source
    if want not in LLAMA_PRECISIONS:
        if not os.path.isfile(want):
            raise ValueError(f"--llama-gguf: no such file {want!r} (or use one of "
                             f"{', '.join(LLAMA_PRECISIONS)})")
        return want
    from checkpoints.resolve import cache_dir
    out = os.path.join(cache_dir(), "bench-hf", os.path.basename(source) + f".{want}.gguf")
    if os.path.isfile(out):
        return out
    src = llama_src(args)
    script = os.path.join(src or "", "convert_hf_to_gguf.py")
    if not src or not os.path.isfile(script):
        raise ValueError(f"--llama-gguf {want}: needs llama.cpp's sources for "
                         "convert_hf_to_gguf.py (--llama-src DIR or FLAXSERVE_LLAMA_SRC)")
    hf_dir = hf_dir_for(source, say)
    say(f"converting {hf_dir} to a {want} GGUF with llama.cpp's converter")
    env = dict(os.environ, PYTHONPATH=os.path.join(src, "gguf-py"))  # its own gguf-py
    tmp = out + ".tmp"
    proc = subprocess.run([sys.executable, script, "--outtype", want, "--outfile", tmp,
                           hf_dir], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed: {proc.stderr[-800:]}")
    os.replace(tmp, out)
    return out


def run_peer(peer, args, hf_model, source, ids, texts, concurrencies, counts, max_len,
              result, say):
    skipped = result["skipped"]
    if peer == "hf":
        say("transformers generate ...")
        result["bytes_per_token"]["hf"] = weight_bytes_torch(hf_model)
        gen = hf_generate_runner(hf_model, args.output_len)
        timed_batches(gen, ids, 1, 1)                                   # warm, uncounted
        return [timed_batches(gen, ids, c, n) for c, n in zip(concurrencies, counts)]
    if texts is None:
        skipped[peer] = "needs --model (text prompts over HTTP)"
        return None
    if peer == "hf-serve":
        try:
            import fastapi  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError:
            skipped[peer] = "transformers serve needs fastapi and uvicorn (pip install " \
                            "-e '.[bench]', or 'transformers[serving]')"
            return None
        exe = shutil.which("transformers") or os.path.join(os.path.dirname(sys.executable),
                                                            "transformers")
        if not os.path.exists(exe):
            skipped[peer] = "no `transformers` command"
            return None
        hf_dir = hf_dir_for(source, say)
        port = free_port()
        block = 32
        blocks = max(concurrencies) * (-(-max_len // block)) + 8   # bounded KV memory
        cmd = [exe, "serve", "--continuous-batching", "--port", str(port), "--host",
               "127.0.0.1", "--device", "cpu", "--dtype", "float32", "--cb-block-size",
               str(block), "--cb-num-blocks", str(blocks), hf_dir]
        say("transformers serve --continuous-batching ...")
        if hf_model is not None:
            result["bytes_per_token"]["hf-serve"] = weight_bytes_torch(hf_model)
        with server(cmd, port, args.server_timeout, "hf-serve") as url:
            target = TextHttpTarget(url, args.output_len)
            return run_traced(target.send, texts, concurrencies, counts)
    # llama (peer: its label, llama or llama-f32, ...)
    if not (os.path.isfile(source) and source.endswith(".gguf")):
        skipped[peer] = "llama.cpp needs a .gguf model"
        return None
    gguf = llama_gguf(args, source, say)
    port = free_port()
    cmd = llama_command(args, gguf, port, max(concurrencies), max_len)
    if cmd is None:
        skipped[peer] = ("no llama.cpp: neither `llama-server` on PATH (--llama-server) nor "
                         "a python with llama_cpp.server (--llama-python)")
        return None
    result["bytes_per_token"][peer] = weight_bytes_gguf(gguf)
    result["llama_gguf"][peer] = os.path.basename(gguf)
    say(f"llama.cpp ({os.path.basename(cmd[0])}) on {os.path.basename(gguf)} ...")
    with server(cmd, port, args.server_timeout, "llama") as url:
        target = TextHttpTarget(url, args.output_len)
        return run_traced(target.send, texts, concurrencies, counts)
