"""gunicorn settings for the HTTP front end (threaded workers, `serving.http.worker`).

Threads, not async: a request spends its life blocked on the gRPC stream, which a thread
does well, and the worker's main loop keeps heart-beating while threads stream, so a long
generation never trips `timeout`. The worker class buffers each request in its event loop
before it takes a thread (slow clients hold no thread). Threads and connections come from
the admission `Limits`; `graceful_timeout` is the drain timeout plus time to write the
final error events. SIGINT of the master drains like SIGTERM (`when_ready`), workers die
with their master (`post_fork`), and `child_exit` drops a dead worker's live metrics.
"""

from __future__ import annotations

from serving.http import metrics

DEFAULTS = {
    "worker_class": "serving.http.worker.BufferingWorker",
    "threads": 32,
    "timeout": 120,             # worker heartbeat, not request duration (gthread)
    "graceful_timeout": 10,
    # idle keep-alive connections live in the worker's selector (no thread) for longer than
    # httpx's 5 s pool expiry (the openai and anthropic SDKs): at an equal 5 s, a client
    # reused a connection the server was closing at that moment and got "Server
    # disconnected without sending a response" (tests/test_router.py saw it)
    "keepalive": 15,
    "accesslog": None,          # no access log by default: never a header, never a key
    "errorlog": "-",
    "loglevel": "info",
    "proc_name": "flaxserve-http",
    "control_socket_disable": True,   # one shared ~/.gunicorn/gunicorn.ctl per user otherwise
}
FINAL_WRITE_S = 5               # after the drain timeout: the error events get written


def child_exit(server, worker) -> None:
    metrics.mark_dead(worker.pid)


def when_ready(server) -> None:
    server.handle_int = server.handle_term     # Ctrl-C: graceful, like SIGTERM


def post_fork(server, worker) -> None:
    from serving.process import die_with_parent
    die_with_parent(parent_pid=server.pid)


def options(host: str, port: int, workers: int, limits=None) -> dict:
    from serving.logs import gunicorn_logconfig
    opts = {**DEFAULTS, "bind": f"{host}:{port}", "workers": workers,
            "logconfig_dict": gunicorn_logconfig("http"),
            "child_exit": child_exit, "when_ready": when_ready, "post_fork": post_fork}
    if limits is not None:
        opts.update(threads=limits.threads, worker_connections=limits.max_connections,
                    graceful_timeout=int(limits.drain_timeout_s + FINAL_WRITE_S + 0.999))
    return opts
