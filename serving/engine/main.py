"""`flaxserve engine`: load a model, warm up every compiled program, serve gRPC until told to stop.

The only process that imports JAX and holds the device. Warm-up compiles every prefill
bucket, the first-token sampler and the decode step before the health check says SERVING,
so no request ever waits for a compilation; with a persistent compilation cache dir
(`--compile-cache` or JAX_COMPILATION_CACHE_DIR) a restart loads them from disk. SIGTERM or
SIGINT: health goes NOT_SERVING, new requests are refused, running ones finish, then exit.
If the device loop breaks for good (see serving/engine/scheduler.py), the process exits
with status 1 within seconds, so a supervisor restarts it. The gRPC port binds to
127.0.0.1 unless `--host` says otherwise; give remote front ends a shared token
(FLAXSERVE_GRPC_TOKEN or `--grpc-token-file`) and they must send it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="default",
                        help="model reference: default (bundled), smollm2, a Hugging Face or orbax "
                             "dir, a .gguf file, or a Hub id org/name[@revision]")
    parser.add_argument("--grpc-port", type=int, default=50051, help="gRPC port")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface of the gRPC port (default loopback only; anything "
                             "else should come with a shared token)")
    parser.add_argument("--grpc-token-file", default=None, metavar="F",
                        help="file whose first line is the shared token every gRPC call "
                             "must send (default: $FLAXSERVE_GRPC_TOKEN; none: no token)")
    parser.add_argument("--grpc-reflection", action="store_true",
                        help="enable gRPC server reflection (off by default)")
    parser.add_argument("--max-slots", type=int, default=None,
                        help="concurrent sequences on the device (default 32 on CPU, 64 else)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="context length: prompt + output (default: the model's, "
                             "capped at 2048)")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="requests waiting for a slot before RESOURCE_EXHAUSTED")
    parser.add_argument("--prefill-budget", type=int, default=None,
                        help="prompt tokens prefilled per scheduler iteration "
                             "(default: the largest prefill bucket; with --prefill-batch > 1 "
                             "at least 512 on CPU, 2048 on GPU/TPU)")
    parser.add_argument("--prefill-batch", type=int, default=16, metavar="N",
                        help="fresh prompts prefilled together in one program, at most "
                             "(batched prefill; 1: one program per prompt)")
    parser.add_argument("--no-prefix-cache", action="store_true",
                        help="turn the prefix cache off (on by default)")
    add_steering_arguments(parser)
    add_kv_arguments(parser)
    parser.add_argument("--mesh", default=None, metavar="data=1,model=1",
                        help="device mesh, e.g. data=1,model=2 (default: one device)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: per platform)")
    from serving.flags import add_decode_steps_argument, add_quantize_argument
    add_quantize_argument(parser)
    add_decode_steps_argument(parser)
    from serving.flags import add_cpu_matmul_argument
    add_cpu_matmul_argument(parser)
    parser.add_argument("--compile-cache", default=None, metavar="DIR",
                        help="persistent XLA compilation cache (default: "
                             "$JAX_COMPILATION_CACHE_DIR, else ~/.cache/flaxserve/xla; "
                             "'' turns it off)")
    parser.add_argument("--served-model-name", default=None, metavar="NAME",
                        help="the name ListModels reports (default: the model reference)")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds running requests get to finish on shutdown")
    add_warmup_arguments(parser)
    from serving.engine import spec_jobs
    spec_jobs.add_arguments(parser)      # --speculative, --draft-model (docs/speed.md)
    from serving.engine import multihost
    multihost.add_arguments(parser)
    from serving.logs import add_arguments as add_log_arguments
    add_log_arguments(parser)


def add_warmup_arguments(parser) -> None:
    """Start-up flags (shared with `flaxserve serve`)."""
    parser.add_argument("--warmup-only", action="store_true",
                        help="compile every program into the compilation cache, then exit "
                             "(e.g. in a container build)")
    parser.add_argument("--full-warmup", action="store_true",
                        help="compile every program before serving (default: serve once the "
                             "programs a first request needs are ready, compile the rest in "
                             "the background)")
    parser.add_argument("--lazy-compile", action="store_true",
                        help="compile nothing ahead: each program compiles when a request "
                             "first needs it (start-up in seconds; the first request of each "
                             "shape waits for its compile), for development and tests; one "
                             "process only")


def check_warmup_arguments(args, processes: int = 1) -> None:
    """--lazy-compile excludes the other start-up flags and a multi-process engine (every
    process must run the same programs, which a full or background warm-up fixes)."""
    if not getattr(args, "lazy_compile", False):
        return
    for flag, name in (("--full-warmup", "full_warmup"), ("--warmup-only", "warmup_only")):
        if getattr(args, name, False):
            raise ValueError(f"--lazy-compile and {flag} exclude each other")
    if processes > 1:
        raise ValueError("--lazy-compile: a multi-process engine compiles ahead "
                         f"(--num-processes {processes})")


def add_steering_arguments(parser) -> None:
    """Activation steering (shared with `flaxserve serve`); see docs/research.md."""
    parser.add_argument("--steering-vectors", default=None, metavar="FILE.npz",
                        help="turn per-request activation steering on, with the vectors of "
                             "this .npz registered by name ([hidden] or [layers, hidden] "
                             "each); off by default (the programs are then unchanged)")


def add_kv_arguments(parser) -> None:
    """The KV cache flags (shared with `flaxserve serve`); see docs/kv-cache.md."""
    parser.add_argument("--kv-layout", choices=("dense", "paged"), default="paged",
                        help="paged: a pool of blocks shared by every request, prefix cache "
                             "across requests, preemption when full; dense: [max-slots, "
                             "max-model-len] per layer, allocated whole (default paged)")
    parser.add_argument("--block-size", type=int, default=16,
                        help="paged: tokens per KV block, a power of two (default 16)")
    parser.add_argument("--kv-cache-memory", default=None, metavar="SIZE",
                        help="paged: the KV pool's size, e.g. 1GiB, 512MiB, or a fraction of "
                             "device memory such as 0.5 (default: room for every slot at "
                             "max-model-len, capped at 1GiB)")
    parser.add_argument("--paged-attention", choices=("auto", "gather", "pallas"),
                        default=None,
                        help="paged: decode attention; pallas: the Pallas paged-attention "
                             "kernel of the platform (GPU or TPU, one device); gather: the "
                             "pure-JAX path; auto (default): pallas on a single GPU/TPU, "
                             "gather on CPU and on a mesh")


def kv_engine_args(args, config, max_slots: int, max_len: int) -> dict:
    """DeviceEngine keyword arguments for the KV flags (paged unless --kv-layout dense)."""
    layout = getattr(args, "kv_layout", None) or "paged"
    if layout == "dense":
        if getattr(args, "kv_cache_memory", None):
            raise ValueError("--kv-cache-memory sizes the paged pool; it does not apply to "
                             "--kv-layout dense")
        if getattr(args, "paged_attention", None):
            raise ValueError("--paged-attention chooses the paged pool's attention; it does "
                             "not apply to --kv-layout dense")
        return {"kv_layout": "dense"}
    from serving.engine.paged_kv import pool_args
    return dict(pool_args(config, max_slots, max_len, getattr(args, "block_size", 16),
                          getattr(args, "kv_cache_memory", None)),
                attention=getattr(args, "paged_attention", None) or "auto")


def load_steering(path: str | None, config) -> dict | None:
    """--steering-vectors: name -> vector, each checked against the model's shape."""
    if not path:
        return None
    from model.steering import load_vectors
    try:
        vectors = load_vectors(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"--steering-vectors: cannot read {path}: {e}") from None
    shapes = ((config.hidden_size,), (config.num_layers, config.hidden_size))
    for name, v in vectors.items():
        if v.shape not in shapes:
            raise ValueError(f"--steering-vectors: {name!r} has shape {v.shape}; expected "
                             f"{shapes[0]} or {shapes[1]}")
    _say(f"steering on: {len(vectors)} named vector(s) ({', '.join(sorted(vectors))})")
    return vectors


def parse_mesh(spec: str | None):
    """'data=1,model=2' -> a jax Mesh over the local devices (None: no mesh)."""
    if not spec:
        return None
    from model import sharding
    return sharding.make_mesh(spec)


def _say(msg: str) -> None:
    from serving import logs
    logs.say("engine", msg)


def _engine_server(args, engine, tokenizer, vectors, speculative, model_dir, token):
    """The scheduler over `engine` behind a gRPC server (not started yet)."""
    from checkpoints.resolve import served_name
    from serving.engine.scheduler import Scheduler
    from serving.engine.server import EngineServer
    scheduler = Scheduler(engine, tokenizer, max_queue=args.max_queue,
                          prefill_budget=args.prefill_budget,
                          prefix_cache=not args.no_prefix_cache, steering_vectors=vectors,
                          speculative=speculative)
    name = args.served_model_name or served_name(args.model, model_dir)
    return EngineServer(scheduler, name, model_dir, tokenizer, token=token,
                        reflection=getattr(args, "grpc_reflection", False))


def _exit_soon(status: int, after_s: float = 10.0) -> None:
    """Exit with `status` after `after_s` even if the shutdown hangs (a broken engine must
    not keep its port and its supervisor waiting)."""
    timer = threading.Timer(after_s, lambda: (sys.stderr.flush(), os._exit(status)))
    timer.daemon = True
    timer.start()


def run(args) -> int:
    from serving.process import die_with_parent
    die_with_parent()             # started by `flaxserve serve`: never outlive it
    from serving import logs
    logs.set_format(getattr(args, "log_format", None))
    for name in ("grpc_port", "max_slots", "max_model_len", "max_queue", "prefill_budget",
                 "prefill_batch", "decode_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    from serving.engine.server import load_token
    token = load_token(getattr(args, "grpc_token_file", None))
    if args.host not in ("127.0.0.1", "localhost", "::1") and not token:
        _say(f"warning: the gRPC port listens on {args.host} without a shared token: anyone "
             "who reaches it can generate, bypassing the HTTP API keys "
             "(set FLAXSERVE_GRPC_TOKEN or --grpc-token-file)")
    check_warmup_arguments(args, getattr(args, "num_processes", None) or 1)
    from serving.warmup import configure_compile_cache
    cache_dir = configure_compile_cache(args.compile_cache)
    from serving.engine import multihost
    role = multihost.join(args, _say)       # several processes: before any JAX device use
    import jax

    from checkpoints.loader import load_model
    from checkpoints.tokenizer import load_tokenizer
    from serving.engine.device import DeviceEngine

    t0 = time.monotonic()
    mesh = parse_mesh(args.mesh)
    if role is not None:
        role.check_mesh(mesh)
    _say(f"loading {args.model}")
    config, params, model_dir = load_model(args.model, mesh=mesh, dtype=args.dtype,
                                           quantize=getattr(args, "quantize", None))
    try:
        tokenizer = load_tokenizer(model_dir)
    except (ValueError, OSError) as e:
        _say(f"no tokenizer ({e}); token-id prompts only, no text or stop strings")
        tokenizer = None
    on_cpu = jax.default_backend() == "cpu"
    max_slots = args.max_slots or (32 if on_cpu else 64)
    max_len = args.max_model_len or min(config.max_position_embeddings, 2048)
    if max_len > config.max_position_embeddings:
        raise ValueError(f"--max-model-len {max_len} exceeds the model's "
                         f"max_position_embeddings {config.max_position_embeddings}")
    eos_ids = set(config.eos_token_ids or ())
    if tokenizer is not None:
        eos_ids |= set(tokenizer.stop_ids)
    kv = kv_engine_args(args, config, max_slots, max_len)
    vectors = load_steering(getattr(args, "steering_vectors", None), config)
    from serving.engine.spec_jobs import config_from_args
    speculative = config_from_args(args, dtype=args.dtype)
    from serving.engine.cpu_matmul import kept_path, label, resolve
    matmul = resolve(getattr(args, "cpu_matmul", None) or "auto", config, params, max_slots,
                     mesh=mesh, say=_say, cache_path=kept_path(cache_dir))
    engine = DeviceEngine(config, params, max_slots=max_slots, max_len=max_len, mesh=mesh,
                          eos_ids=tuple(sorted(eos_ids)),
                          token_limit=tokenizer.vocab_size if tokenizer else None,
                          steering=vectors is not None, prefill_batch=args.prefill_batch,
                          decode_steps=getattr(args, "decode_steps", None) or 1,
                          cpu_matmul=matmul, **kv)
    from serving.process import rss_mib, trim_memory
    _say(f"loaded in {time.monotonic() - t0:.1f} s: {max_slots} slots, max_model_len "
         f"{max_len}, prefill buckets {list(engine.prefill_buckets)}; decode matmuls "
         f"{label(engine.cpu_matmul)}; RSS {rss_mib():.0f} MiB")
    if engine.paged:
        from serving.engine.sizing import kv_bytes_per_token
        pool = engine.num_blocks * engine.block_size * kv_bytes_per_token(config)
        _say(f"KV cache: paged, {engine.num_blocks} blocks of {engine.block_size} tokens "
             f"({pool / 2 ** 30:.2f} GiB; dense would take "
             f"{max_slots * max_len * kv_bytes_per_token(config) / 2 ** 30:.2f} GiB); "
             f"decode attention: {engine.attention}"
             + (f" ({engine.paged_kernel} kernel)" if engine.paged_kernel else ""))
    early = None
    if role is None and not getattr(args, "warmup_only", False):
        # listen while the first programs compile: serve and the front end connect and
        # read the model's card (the front end loads its tokenizer) meanwhile, so they see
        # SERVING at once; until then Generate is UNAVAILABLE (a 503 over HTTP)
        early = _engine_server(args, engine, tokenizer, vectors, speculative, model_dir,
                               token)
        early.start(args.host, args.grpc_port, serving=False)
    t1 = time.monotonic()
    full = getattr(args, "warmup_only", False) or getattr(args, "full_warmup", False)
    from serving.logs import Progress
    try:
        background = None
        if not getattr(args, "lazy_compile", False):
            background = engine.warmup(Progress("engine"), background=not full)
    except BaseException:
        if early is not None:
            early.server.stop(grace=None)
        raise
    if early is not None:
        early.serve_now()
    trim_memory()                # the compiler's freed heap back to the system
    if getattr(args, "lazy_compile", False):
        _say("--lazy-compile: nothing compiled ahead, each program compiles when a request "
             "first needs it")
    else:
        _say(f"warm-up took {time.monotonic() - t1:.1f} s"
             + (f" (compilation cache: {cache_dir})" if cache_dir else "")
             + f"; RSS {rss_mib():.0f} MiB")
    if background is not None:
        def report(thread=background):
            thread.join()
            trim_memory()
            _say(f"every program compiled; RSS {rss_mib():.0f} MiB")
        threading.Thread(target=report, name="flaxserve-rss", daemon=True).start()
    if getattr(args, "warmup_only", False):
        _say("--warmup-only: every program is compiled" +
             (f" into {cache_dir}" if cache_dir else " (no compilation cache: nothing kept)"))
        return 0
    if role is not None and not role.leader:
        return role.follow(engine)          # replays the leader's device calls
    if role is not None:
        engine = role.lead(engine)

    server = early or _engine_server(args, engine, tokenizer, vectors, speculative,
                                     model_dir, token)
    scheduler, name = server.scheduler, server.servicer.model_name
    stop = threading.Event()
    old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        port = server.port if early is not None else server.start(args.host, args.grpc_port)
        _say(f"serving {name} on {args.host}:{port} (gRPC)")
        while not stop.wait(0.5):
            if role is not None and role.lost:
                _say(f"{role.lost}; the engine is lost, exiting with status 1")
                _exit_soon(1, after_s=3.0)
                return 1
            if scheduler.failed is not None:
                _say(f"the device loop failed ({scheduler.failed}); exiting with status 1")
                _exit_soon(1)
                return 1
        _say("stopping: finishing running requests")
        return 0
    finally:
        # a broken engine has nothing left to drain
        lost = role is not None and role.lost
        server.stop(grace_s=args.drain_timeout if scheduler.failed is None and not lost
                    else 1.0)
        if role is not None:
            role.stop()
        for s, h in old.items():
            signal.signal(s, h)
        _say("stopped")
        if background is not None and background.is_alive():
            # the compile pool's threads would hold the exit until every program is done
            sys.stderr.flush()
            os._exit(1 if scheduler.failed is not None or lost else 0)
