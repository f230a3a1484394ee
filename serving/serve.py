"""`flaxserve serve`: the batch server and the HTTP front end, one command, supervised.

Two child processes: `flaxserve engine` (the only process that imports JAX and holds the
device) and `flaxserve http` (gunicorn). Both ports are checked before anything loads, so a
busy port is one clear error line at once (never a new front end talking to an old
engine). Both start at once (the front end answers 503 until the engine is healthy, so its
start-up overlaps the engine's), and "serving on" is printed once the engine's gRPC health
says SERVING and the front end accepts connections.

Supervision: each child runs in its own process group (a terminal's Ctrl-C or hang-up
reaches this process alone) and dies with it (parent-death signal, `serving.process`), so
nothing outlives `serve`, even a SIGKILL of it. A child that dies is restarted with backoff
(1, 2, 4 ... 30 s); while the engine is down the front end answers 503 with Retry-After,
and it reconnects within a second of the engine being back. SIGTERM, SIGINT or SIGHUP
stop the front end first (it stops accepting and lets running requests finish for up to
`--drain-timeout`, then ends them with an error event), then the engine; a second signal
kills both at once. API keys go to the front end through its environment
(FLAXSERVE_API_KEYS), never its command line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

ENGINE_START_TIMEOUT_S = 1800.0
HTTP_START_TIMEOUT_S = 120.0
BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
STABLE_S = 60.0          # a child up this long starts its backoff from the beginning again
POLL_S = 0.05            # start-up polls (engine health, front-end port): cheap, loopback


def add_arguments(parser) -> None:
    from serving.http.main import add_limit_arguments
    parser.add_argument("--model", default="default",
                        help="model reference: default (bundled), smollm2, a Hugging Face "
                             "or orbax dir, a .gguf file, or a Hub id org/name[@revision]")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP interface")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port")
    parser.add_argument("--grpc-port", type=int, default=50051,
                        help="the engine's gRPC port (loopback)")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn worker processes")
    parser.add_argument("--api-key", action="append", default=[], metavar="K",
                        help="accepted API key (repeatable); also FLAXSERVE_API_KEYS")
    parser.add_argument("--api-key-file", default=None, metavar="F",
                        help="file with one API key per line")
    parser.add_argument("--served-model-name", action="append", default=[], metavar="NAME",
                        help="model names requests may use (default: the model's)")
    parser.add_argument("--chat-template", default=None, metavar="FILE",
                        help="a Jinja chat template file that replaces the model's")
    parser.add_argument("--response-store", default="~/.cache/flaxserve/responses.sqlite",
                        metavar="FILE", help="SQLite file of stored /v1/responses (store: true)")
    parser.add_argument("--strict-max-tokens", action="store_true",
                        help="prompt + max_tokens over the context is a 400 (OpenAI's rule); "
                             "default: max_tokens is clamped to what the context leaves")
    parser.add_argument("--max-slots", type=int, default=None,
                        help="concurrent sequences on the device (default: the engine's)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="context length (default: the model's, capped at 2048)")
    parser.add_argument("--max-queue", type=int, default=None,
                        help="the engine's admission queue (default: the engine's, 256)")
    parser.add_argument("--mesh", default=None, metavar="data=1,model=1",
                        help="device mesh, e.g. data=1,model=2 (default: one device)")
    from serving.engine.main import (add_kv_arguments, add_steering_arguments,
                                     add_warmup_arguments)
    add_kv_arguments(parser)
    add_steering_arguments(parser)
    from serving.engine import spec_jobs
    spec_jobs.add_arguments(parser)      # passed on to the engine
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: per platform)")
    from serving.flags import add_decode_steps_argument, add_quantize_argument
    add_quantize_argument(parser)
    add_decode_steps_argument(parser)      # passed on to the engine
    from serving.flags import add_cpu_matmul_argument
    add_cpu_matmul_argument(parser)        # passed on to the engine
    parser.add_argument("--compile-cache", default=None, metavar="DIR",
                        help="persistent XLA compilation cache (default: "
                             "$JAX_COMPILATION_CACHE_DIR, else ~/.cache/flaxserve/xla; "
                             "'' turns it off)")
    parser.add_argument("--prefill-budget", type=int, default=None,
                        help="prompt tokens prefilled per scheduler iteration "
                             "(default: the largest prefill bucket; with --prefill-batch > 1 "
                             "at least 512 on CPU, 2048 on GPU/TPU)")
    parser.add_argument("--prefill-batch", type=int, default=None, metavar="N",
                        help="fresh prompts prefilled together in one program, at most "
                             "(batched prefill; 1: one program per prompt; default 16)")
    parser.add_argument("--no-prefix-cache", action="store_true",
                        help="turn the prefix cache off (on by default)")
    add_warmup_arguments(parser)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per front-end worker (default: --max-inflight + "
                             "--max-waiting + spare)")
    from serving.logs import add_arguments as add_log_arguments
    add_log_arguments(parser)       # children inherit it through FLAXSERVE_LOG_FORMAT
    parser.add_argument("--engine-start-timeout", type=float, default=ENGINE_START_TIMEOUT_S,
                        help="seconds to wait for the engine to load and compile "
                             f"(default {ENGINE_START_TIMEOUT_S:g})")
    add_limit_arguments(parser)


LIMIT_FLAGS = (("--max-inflight", "max_inflight"), ("--max-waiting", "max_waiting"),
               ("--queue-timeout", "queue_timeout"), ("--header-timeout", "header_timeout"),
               ("--body-timeout", "body_timeout"), ("--max-connections", "max_connections"),
               ("--drain-timeout", "drain_timeout"))


def engine_command(args) -> list[str]:
    cmd = [sys.executable, "-m", "serving.cli", "engine", "--model", args.model,
           "--grpc-port", str(args.grpc_port), "--drain-timeout", str(args.drain_timeout)]
    for flag, value in (("--max-slots", args.max_slots), ("--max-model-len", args.max_model_len),
                        ("--max-queue", args.max_queue), ("--mesh", args.mesh),
                        ("--kv-layout", getattr(args, "kv_layout", None)),
                        ("--block-size", getattr(args, "block_size", None)),
                        ("--kv-cache-memory", getattr(args, "kv_cache_memory", None)),
                        ("--paged-attention", getattr(args, "paged_attention", None)),
                        ("--dtype", getattr(args, "dtype", None)),
                        ("--quantize", getattr(args, "quantize", None)),
                        ("--compile-cache", getattr(args, "compile_cache", None)),
                        ("--prefill-budget", getattr(args, "prefill_budget", None)),
                        ("--prefill-batch", getattr(args, "prefill_batch", None)),
                        ("--decode-steps", getattr(args, "decode_steps", None)),
                        ("--cpu-matmul", getattr(args, "cpu_matmul", None)),
                        ("--speculative", getattr(args, "speculative", None)),
                        ("--draft-model", getattr(args, "draft_model", None)),
                        ("--speculative-max-batch", getattr(args, "speculative_max_batch", None)),
                        ("--speculative-max-jobs", getattr(args, "speculative_max_jobs", None)),
                        ("--steering-vectors", getattr(args, "steering_vectors", None)
                         and os.path.abspath(args.steering_vectors))):
        if value is not None:
            cmd += [flag, str(value)]
    for flag, name in (("--no-prefix-cache", "no_prefix_cache"),
                       ("--full-warmup", "full_warmup"), ("--warmup-only", "warmup_only"),
                       ("--lazy-compile", "lazy_compile")):
        if getattr(args, name, False):
            cmd.append(flag)
    return cmd


def http_command(args) -> list[str]:
    cmd = [sys.executable, "-m", "serving.http.main", "--engine",
           f"127.0.0.1:{args.grpc_port}", "--host", args.host, "--port", str(args.port),
           "--workers", str(args.workers)]
    for flag, name in LIMIT_FLAGS:
        cmd += [flag, str(getattr(args, name))]
    for name in args.served_model_name:
        cmd += ["--served-model-name", name]
    if args.chat_template is not None:
        cmd += ["--chat-template", os.path.abspath(args.chat_template)]
    cmd += ["--response-store", args.response_store]
    if getattr(args, "strict_max_tokens", False):
        cmd += ["--strict-max-tokens"]
    if getattr(args, "threads", None) is not None:
        cmd += ["--threads", str(args.threads)]
    return cmd


def _say(msg: str) -> None:
    from serving import logs
    logs.say("serve", msg)


class Child:
    """One supervised child: its own process group, dies with us, restarted with backoff."""

    def __init__(self, name: str, cmd: list[str], env: dict):
        self.name, self.cmd, self.env = name, cmd, env
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.failures = 0
        self.restart_at: float | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, env=self.env, process_group=0)
        self.started = time.monotonic()
        self.restart_at = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def schedule_restart(self) -> float:
        if time.monotonic() - self.started > STABLE_S:
            self.failures = 0
        delay = BACKOFF_S[min(self.failures, len(BACKOFF_S) - 1)]
        self.failures += 1
        self.restart_at = time.monotonic() + delay
        return delay

    def stop(self, grace_s: float, force=lambda: False) -> None:
        """SIGTERM, up to `grace_s` to exit, then SIGKILL of its whole process group."""
        from serving.process import kill_group
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while self.proc.poll() is None and time.monotonic() < deadline and not force():
                time.sleep(0.05)
        kill_group(self.proc.pid, signal.SIGKILL)     # what is left of it (e.g. workers)
        if self.proc.poll() is None:
            self.proc.wait()


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
            if link.healthy(timeout_s=1.0):
                return True
            time.sleep(POLL_S)
    finally:
        link.close()
    raise ValueError(f"the engine did not become healthy within {timeout_s:.0f} s")


def wait_http(proc: subprocess.Popen, host: str, port: int, timeout_s: float,
              stopping=lambda: False) -> bool:
    """True once the front end accepts connections (the port was free before it started,
    so whatever answers is ours)."""
    from serving.process import can_connect
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stopping():
            return False
        if proc.poll() is not None:
            raise ValueError(f"the http front end exited with status {proc.returncode} "
                             "while starting (see its log above)")
        if can_connect(host, port):
            return True
        time.sleep(POLL_S)
    raise ValueError(f"the http front end did not listen within {timeout_s:.0f} s")


def run(args) -> int:
    from serving.http.auth import ENV_VAR, load_keys
    from serving.http.main import limits_from_args
    from serving.process import PARENT_ENV, check_port_free

    for name in ("port", "grpc_port", "workers"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    limits_from_args(args)                            # flag errors before anything starts
    from serving import logs
    logs.set_format(getattr(args, "log_format", None))
    if getattr(args, "warmup_only", False):    # fill the compilation cache, serve nothing
        return subprocess.call(engine_command(args))
    check_port_free(args.host, args.port, "--port")
    check_port_free("127.0.0.1", args.grpc_port, "--grpc-port")
    if args.port == args.grpc_port:
        raise ValueError("--port and --grpc-port must differ")
    keys = load_keys(args.api_key, args.api_key_file)
    # the engine's gRPC port takes a token that only our two children (and this process's
    # health checks) know, so other users of the host cannot bypass the HTTP API keys
    import secrets
    os.environ.setdefault("FLAXSERVE_GRPC_TOKEN", secrets.token_urlsafe(32))
    signals = []

    def on_signal(signum, frame):
        signals.append(signum)

    def stopping() -> bool:
        return bool(signals)

    def forced() -> bool:
        return len(signals) > 1

    watched = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, on_signal) for s in watched}
    env = dict(os.environ)
    env[PARENT_ENV] = str(os.getpid())
    http_env = dict(env)
    if keys:
        http_env[ENV_VAR] = ",".join(keys)
    address = f"127.0.0.1:{args.grpc_port}"
    engine = Child("engine", engine_command(args), env)
    http = Child("http front end", http_command(args), http_env)
    try:
        # both at once: the front end imports and forks while the engine loads and
        # compiles (it answers 503 until the engine is healthy), so a restart costs the
        # slower of the two, not their sum
        engine.start()
        http.start()
        if not wait_engine(engine.proc, address, args.engine_start_timeout, stopping):
            return 0
        if not wait_http(http.proc, args.host, args.port, HTTP_START_TIMEOUT_S, stopping):
            return 0
        _say(f"serving on http://{args.host}:{args.port} (engine on {address})")
        while not stopping():
            for child in (engine, http):
                if child.restart_at is None and not child.alive():
                    # what is left of its process group (a SIGKILLed gunicorn master's
                    # workers) goes now: an orphaned worker would keep the port, answer
                    # for a while and make the new master's bind fail
                    from serving.process import kill_group
                    kill_group(child.proc.pid, signal.SIGKILL)
                    delay = child.schedule_restart()
                    _say(f"the {child.name} exited with status {child.proc.returncode}; "
                         f"restarting it in {delay:.0f} s")
                elif child.restart_at is not None and time.monotonic() >= child.restart_at:
                    child.start()
                    if child is engine:
                        try:
                            if wait_engine(engine.proc, address, args.engine_start_timeout,
                                           stopping):
                                _say("the engine is back")
                        except ValueError as e:
                            _say(str(e))
            time.sleep(0.1)
        _say(f"stopping ({signal.Signals(signals[0]).name}): the front end drains "
             f"(up to {args.drain_timeout:g} s), then the engine stops")
        return 0
    finally:
        http.stop(args.drain_timeout + 15.0, forced)
        engine.stop(args.drain_timeout + 15.0, forced)
        for s, h in old.items():
            signal.signal(s, h)
