"""`flaxserve serve`: the batch server and the HTTP front end, one command.

Two child processes, supervised here: `flaxserve engine` (the only process that imports
JAX and holds the device) and `flaxserve http` (gunicorn). The front end starts once the
engine's gRPC health check says SERVING, so the first HTTP request never meets a cold
engine. Ctrl-C or SIGTERM stops the front end first (no new requests), then the engine;
if either child dies, the other is stopped and the exit status says so. API keys go to
the front end through its environment (FLAXSERVE_API_KEYS), never its command line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

ENGINE_START_TIMEOUT_S = 1800.0


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="default",
                        help="Hugging Face dir, orbax dir written by convert, or 'default'")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=50051)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--api-key", action="append", default=[], metavar="K")
    parser.add_argument("--api-key-file", default=None, metavar="F")
    parser.add_argument("--served-model-name", action="append", default=[], metavar="NAME")
    parser.add_argument("--chat-template", default=None, metavar="FILE",
                        help="a Jinja chat template file that replaces the model's")
    parser.add_argument("--max-slots", type=int, default=None)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--mesh", default=None, metavar="data=1,model=1")
    parser.add_argument("--engine-start-timeout", type=float, default=ENGINE_START_TIMEOUT_S,
                        help="seconds to wait for the engine to load and compile")


def engine_command(args) -> list[str]:
    cmd = [sys.executable, "-m", "serving.cli", "engine", "--model", args.model,
           "--grpc-port", str(args.grpc_port)]
    for flag, value in (("--max-slots", args.max_slots), ("--max-model-len", args.max_model_len),
                        ("--mesh", args.mesh)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


def http_command(args) -> list[str]:
    cmd = [sys.executable, "-m", "serving.http.main", "--engine",
           f"127.0.0.1:{args.grpc_port}", "--host", args.host, "--port", str(args.port),
           "--workers", str(args.workers)]
    for name in args.served_model_name:
        cmd += ["--served-model-name", name]
    if args.chat_template is not None:
        cmd += ["--chat-template", os.path.abspath(args.chat_template)]
    return cmd


def wait_engine(proc: subprocess.Popen, address: str, timeout_s: float,
                stopping=lambda: False) -> bool:
    """True once the engine's gRPC health says SERVING; False if asked to stop first."""
    from serving.http.engine_link import EngineLink

    link = EngineLink(address)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if stopping():
                return False
            if proc.poll() is not None:
                raise ValueError(f"the engine exited with status {proc.returncode} while "
                                 "starting (see its log above)")
            if link.healthy(timeout_s=2.0):
                return True
            time.sleep(0.5)
    finally:
        link.close()
    raise ValueError(f"the engine did not become healthy within {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen | None, grace_s: float = 20.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run(args) -> int:
    from serving.http.auth import ENV_VAR, load_keys

    for name in ("port", "grpc_port", "workers"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    keys = load_keys(args.api_key, args.api_key_file)
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    engine = http = None
    try:
        engine = subprocess.Popen(engine_command(args))
        if not wait_engine(engine, f"127.0.0.1:{args.grpc_port}", args.engine_start_timeout,
                           lambda: stopping):
            return 0
        env = dict(os.environ)
        if keys:
            env[ENV_VAR] = ",".join(keys)
        http = subprocess.Popen(http_command(args), env=env)
        print(f"flaxserve: serving on http://{args.host}:{args.port} "
              f"(engine on 127.0.0.1:{args.grpc_port})", file=sys.stderr, flush=True)
        while not stopping:
            if engine.poll() is not None or http.poll() is not None:
                time.sleep(0.5)  # a Ctrl-C reaches the children too: let ours land first
                break
            time.sleep(0.2)
        if stopping:
            return 0
        dead, code = ("engine", engine.returncode) if engine.poll() is not None else (
            "http front end", http.returncode)
        print(f"flaxserve: the {dead} exited with status {code}; stopping", file=sys.stderr)
        return 1
    finally:
        _stop(http)
        _stop(engine)
        for s, h in old.items():
            signal.signal(s, h)
