"""gunicorn settings for the HTTP front end (threaded `gthread` workers).

Threads, not async: a request spends its life blocked on the gRPC stream, which a thread
does well, and the worker's main loop keeps heart-beating while threads stream, so a long
generation never trips `timeout`. `child_exit` drops a dead worker's live metrics.
"""

from __future__ import annotations

from serving.http import metrics

DEFAULTS = {
    "worker_class": "gthread",
    "threads": 32,              # concurrent requests per worker (each mostly waits on gRPC)
    "timeout": 120,             # worker heartbeat, not request duration (gthread)
    "graceful_timeout": 10,
    "keepalive": 5,
    "accesslog": None,          # no access log by default: never a header, never a key
    "errorlog": "-",
    "loglevel": "info",
    "proc_name": "flaxserve-http",
}


def child_exit(server, worker) -> None:
    metrics.mark_dead(worker.pid)


def options(host: str, port: int, workers: int) -> dict:
    return {**DEFAULTS, "bind": f"{host}:{port}", "workers": workers,
            "child_exit": child_exit}
