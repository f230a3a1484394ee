"""`flaxserve http --engine HOST:PORT`: the HTTP front end alone, under gunicorn.

gunicorn runs in this process (its `BaseApplication` API), so the settings built from the
flags reach the forked workers as Python objects and API keys never travel through the
environment or a command line. Each worker builds its Falcon app after the fork (one gRPC
channel per worker). The model directory, for the tokenizer and chat template, comes from
the engine's ListModels answer unless `--model DIR` overrides it (a front end on another
host than the engine needs `--model`).
"""

from __future__ import annotations

import logging
import sys
import os
import tempfile

log = logging.getLogger("flaxserve.http")
RESPONSE_STORE = "~/.cache/flaxserve/responses.sqlite"   # = response_store.DEFAULT_PATH


def add_arguments(parser) -> None:
    from serving.logs import add_arguments as add_log_arguments
    add_log_arguments(parser)
    parser.add_argument("--engine", required=True, action="append", metavar="HOST:PORT",
                        help="the batch server's gRPC address; repeat it to route over "
                             "several engines (docs/scale-out.md)")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP interface")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn worker processes")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per worker (default: --max-inflight + --max-waiting "
                             "+ 16)")
    add_limit_arguments(parser)
    parser.add_argument("--api-key", action="append", default=[], metavar="K",
                        help="accepted API key (repeatable); also FLAXSERVE_API_KEYS")
    parser.add_argument("--api-key-file", default=None, metavar="F",
                        help="file with one API key per line")
    parser.add_argument("--metrics-auth", action="store_true",
                        help="/metrics needs an API key too (default: open, like /health)")
    parser.add_argument("--served-model-name", action="append", default=[], metavar="NAME",
                        help="model names requests may use (default: the engine's)")
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="model directory for the tokenizer (default: the engine's)")
    parser.add_argument("--chat-template", default=None, metavar="FILE",
                        help="a Jinja chat template file that replaces the model's")
    parser.add_argument("--strict-max-tokens", action="store_true",
                        help="prompt + max_tokens over the context is a 400 (OpenAI's rule); "
                             "default: max_tokens is clamped to what the context leaves")
    parser.add_argument("--response-store", default=RESPONSE_STORE, metavar="FILE",
                        help="SQLite file of stored /v1/responses (store: true)")


def add_limit_arguments(parser) -> None:
    """Admission, slow-client and shutdown limits (per worker); `serve` has them too."""
    from serving.http.admission import Limits
    d = Limits()
    parser.add_argument("--max-inflight", type=int, default=d.max_inflight, metavar="N",
                        help="POST requests running at once per worker "
                             f"(default {d.max_inflight})")
    parser.add_argument("--max-waiting", type=int, default=d.max_waiting, metavar="N",
                        help="POST requests waiting for a place per worker; beyond, an "
                             f"immediate 429/529 (default {d.max_waiting})")
    parser.add_argument("--queue-timeout", type=float, default=d.queue_timeout_s,
                        metavar="S", help="longest wait for a place before a 429/529 "
                                          f"(default {d.queue_timeout_s:g} s)")
    parser.add_argument("--header-timeout", type=float, default=d.header_timeout_s,
                        metavar="S", help="a request's line and headers must arrive within "
                                          f"this, or it is closed (default "
                                          f"{d.header_timeout_s:g} s)")
    parser.add_argument("--body-timeout", type=float, default=d.body_timeout_s, metavar="S",
                        help="its body within this after the headers (default "
                             f"{d.body_timeout_s:g} s)")
    parser.add_argument("--max-connections", type=int, default=d.max_connections,
                        metavar="N", help="open connections per worker (default "
                                          f"{d.max_connections})")
    parser.add_argument("--drain-timeout", type=float, default=d.drain_timeout_s,
                        metavar="S", help="on SIGTERM/SIGINT, how long running requests may "
                                          "finish before they end with an error event "
                                          f"(default {d.drain_timeout_s:g} s)")


def limits_from_args(args):
    from serving.http.admission import Limits
    return Limits(max_inflight=args.max_inflight, max_waiting=args.max_waiting,
                  queue_timeout_s=args.queue_timeout, header_timeout_s=args.header_timeout,
                  body_timeout_s=args.body_timeout, max_connections=args.max_connections,
                  drain_timeout_s=args.drain_timeout).validate()


def settings_from_args(args):
    from serving.http.app import Settings
    from serving.http.auth import load_keys

    engines = [args.engine] if isinstance(args.engine, str) else list(args.engine)
    for engine in engines:
        if ":" not in engine:
            raise ValueError(f"--engine must be HOST:PORT, got {engine!r}")
    if len(set(engines)) != len(engines):
        raise ValueError(f"--engine: an address is given twice: {engines}")
    for name in ("port", "workers"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be >= 1")
    if args.model is not None and not os.path.isdir(args.model):
        raise ValueError(f"--model: no such directory: {args.model}")
    keys = load_keys(args.api_key, args.api_key_file)
    template = None
    if getattr(args, "chat_template", None) is not None:
        try:
            with open(args.chat_template, encoding="utf-8") as f:
                template = f.read()
        except OSError as e:
            raise ValueError(f"--chat-template: cannot read {args.chat_template}: "
                             f"{e.strerror}") from None
        from serving.http.prompt import check_template
        check_template(template, "--chat-template")
    return Settings(engine=engines[0], engines=engines, api_keys=keys,
                    served_model_names=list(dict.fromkeys(args.served_model_name)),
                    model_dir=args.model, chat_template=template,
                    strict_max_tokens=getattr(args, "strict_max_tokens", False),
                    response_store=getattr(args, "response_store", None) or RESPONSE_STORE,
                    metrics_public=not getattr(args, "metrics_auth", False))


def run_gunicorn(settings, host: str, port: int, workers: int, threads: int | None,
                 limits=None) -> int:
    from gunicorn.app.base import BaseApplication

    from serving.http import gunicorn_conf, worker
    from serving.http.admission import Admission, Limits
    from serving.http.app import create_app
    limits = limits or Limits()
    worker.LIMITS = limits                # read by the workers after the fork
    opts = gunicorn_conf.options(host, port, workers, limits)
    if threads:
        opts["threads"] = threads

    class _Application(BaseApplication):
        def load_config(self):
            for k, v in opts.items():
                self.cfg.set(k, v)

        def load(self):
            return Admission(create_app(settings), limits)

    _Application().run()
    return 0


def run(args) -> int:
    from serving.process import die_with_parent
    die_with_parent()             # started by `flaxserve serve`: never outlive it
    # Before prometheus_client is imported: it picks its multiprocess storage at import,
    # and every worker must share one directory.
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        import atexit
        import shutil
        metrics_dir = tempfile.mkdtemp(prefix="flaxserve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        master = os.getpid()     # workers are forked: only the master removes it
        atexit.register(lambda: os.getpid() == master and shutil.rmtree(metrics_dir, True))
    from serving import logs
    logs.set_format(getattr(args, "log_format", None))
    handler = logging.StreamHandler()
    handler.setFormatter(logs.Formatter("http"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    settings = settings_from_args(args)
    limits = limits_from_args(args)
    if args.threads is not None and args.threads <= limits.max_inflight + limits.max_waiting:
        raise ValueError("--threads must exceed --max-inflight + --max-waiting (spare threads "
                         "answer /health, /metrics and refusals under load)")
    if not settings.api_keys:
        log.warning("no API key configured (--api-key, --api-key-file, FLAXSERVE_API_KEYS): "
                    "the API is open to anyone who can reach %s:%d", args.host, args.port)
    return run_gunicorn(settings, args.host, args.port, args.workers, args.threads, limits)


def main(argv=None) -> int:
    """`python -m serving.http.main ...`: the same command without the `flaxserve`
    dispatcher, which imports every subcommand's module (and some import JAX)."""
    import argparse
    from serving.cli import HelpFormatter
    parser = argparse.ArgumentParser(prog="flaxserve http", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except ValueError as e:
        print(f"flaxserve http: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
