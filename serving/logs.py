"""One log format for the whole process tree (serve, engine, http workers).

Every line carries a UTC timestamp, a level and the component that wrote it. Text by
default (`2026-12-01T10:00:00.123Z INFO engine: loaded in 1.7 s`), JSON lines with
`--log-format json` (`{"ts": ..., "level": ..., "component": ..., "msg": ..., ...}`). The
format travels to child processes in FLAXSERVE_LOG_FORMAT, so `serve` sets it once.
Access lines (`access`) hold the request id, route, status, tokens and latency: never a
prompt, a body or a key. Progress (`Progress`): a bar with ETA on a terminal, timed lines
(at most one per few seconds, and the last) otherwise.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import sys
import threading
import time

FORMAT_ENV = "FLAXSERVE_LOG_FORMAT"
FORMATS = ("text", "json")


def add_arguments(parser) -> None:
    parser.add_argument("--log-format", choices=FORMATS, default=None,
                        help="text or json lines (default: $FLAXSERVE_LOG_FORMAT, else text)")


def set_format(fmt: str | None) -> str:
    """Use `fmt` here and in every child started from now on; None keeps the inherited one."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"--log-format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        os.environ[FORMAT_ENV] = fmt
    return current_format()


def current_format() -> str:
    fmt = os.environ.get(FORMAT_ENV, "text")
    return fmt if fmt in FORMATS else "text"


def _ts() -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def line(component: str, msg: str, level: str = "info", **fields) -> str:
    if current_format() == "json":
        return json.dumps({"ts": _ts(), "level": level, "component": component, "msg": msg,
                           **fields}, default=str)
    extra = "".join(f" {k}={v}" for k, v in fields.items())
    return f"{_ts()} {level.upper()} {component}: {msg}{extra}"


_WRITE = threading.Lock()


def say(component: str, msg: str, level: str = "info", **fields) -> None:
    # one write per line, under a lock: `print` writes the text and its newline apart, so
    # two threads (warm-up in the background, the main thread) could join two lines in one
    text = line(component, msg, level, **fields) + "\n"
    with _WRITE:
        sys.stderr.write(text)
        sys.stderr.flush()


class Formatter(logging.Formatter):
    """Python logging records (gunicorn's, library warnings) in the same format."""

    def __init__(self, component: str = "http"):
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return line(getattr(record, "component", self.component), msg,
                    record.levelname.lower(), **getattr(record, "fields", {}))


def gunicorn_logconfig(component: str = "http") -> dict:
    """A gunicorn `logconfig_dict`: its error log in our format, its own access log off
    (the app writes one line per request, `access`)."""
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"flaxserve": {"()": Formatter, "component": component}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "flaxserve",
                                "stream": "ext://sys.stderr"}},
        "loggers": {"gunicorn.error": {"handlers": ["stderr"], "level": "INFO",
                                       "propagate": False},
                    "gunicorn.access": {"handlers": [], "level": "CRITICAL",
                                        "propagate": False}},
        "root": {"handlers": ["stderr"], "level": "WARNING"},
    }


def access(request_id: str, method: str, route: str, status: int, latency_s: float,
           prompt_tokens=None, completion_tokens=None) -> None:
    """One line per HTTP request: what was asked of which route and how it went."""
    say("access", f"{method} {route} {status}", request_id=request_id, method=method,
        route=route, status=status, latency_ms=round(latency_s * 1000, 1),
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


_COUNTED = re.compile(r"^(?P<label>[^:]+): .*?\b(?P<done>\d+)/(?P<total>\d+)\b")


class Progress:
    """A `say`-like callable for start-up phases that report "label: ... done/total ...".

    On a terminal (text format), each label gets a tqdm bar with rate and ETA on stderr,
    closed with its last message as a normal line; elsewhere (a pipe, a file, JSON lines)
    counted messages become timed lines, at most one per `every_s` seconds per label plus
    the one that completes it. Other messages are said as they are."""

    def __init__(self, component: str, tty: bool | None = None, every_s: float = 5.0):
        self.component, self.every_s = component, every_s
        if tty is None:
            tty = sys.stderr.isatty() and current_format() == "text"
        self.tty = tty
        self._bars: dict = {}
        self._last: dict = {}

    def __call__(self, msg: str) -> None:
        m = _COUNTED.match(msg)
        if m is None:
            say(self.component, msg)
            return
        label, done, total = m["label"], int(m["done"]), int(m["total"])
        finished = done >= total
        if self.tty:
            bar = self._bars.get(label)
            if bar is None:
                bar = self._bars[label] = self._bar(label, total)
            if bar is not None:
                bar.update(done - bar.n)
                if finished:
                    bar.close()
                    del self._bars[label]
                    say(self.component, msg)
                return
        now = time.monotonic()
        if finished or now - self._last.get(label, -1e9) >= self.every_s:
            self._last[label] = now
            say(self.component, msg)

    def _bar(self, label: str, total: int):
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(total=total, desc=f"{self.component}: {label}", unit="program",
                    file=sys.stderr, leave=False, dynamic_ncols=True)
