"""`flaxserve serve` as a real process for the reliability tests, and what they measure.

`Serve` starts the command (bundled default model, small slots and context, free loopback
ports, its own session so a test can signal its process group like a terminal would),
waits for its "serving on" line, and knows its descendants (from /proc) so that a test
can check that none is left behind. Figures are printed, never asserted on speed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.http_fixtures import ROOT, free_port, one_prompt_prefill

GRPC_TOKEN = "reliability-test-token"


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("FLAXSERVE_API_KEYS", None)
    e["JAX_PLATFORMS"] = "cpu"
    e["FLAXSERVE_GRPC_TOKEN"] = GRPC_TOKEN
    return e


def children_of(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc)."""
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                parent[int(entry.name)] = int(fields[1])
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait_until(check, timeout_s: float, step_s: float = 0.05) -> float | None:
    """Seconds until check() was true, or None after timeout_s."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if check():
            return time.monotonic() - t0
        time.sleep(step_s)
    return None


class Serve:
    def __init__(self, root: Path, *extra: str, max_model_len: int = 256,
                 max_slots: int = 4):
        self.port, self.grpc_port = free_port(), free_port()
        while self.grpc_port == self.port:
            self.grpc_port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = root / f"serve-{self.port}.log"
        self.log = open(self.log_path, "w")
        cmd = [sys.executable, "-m", "serving.cli", "serve", "--port", str(self.port),
               "--grpc-port", str(self.grpc_port), "--max-slots", str(max_slots),
               "--max-model-len", str(max_model_len), *one_prompt_prefill(extra)]
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        if wait_until(lambda: "serving on" in self.text() or self.proc.poll() is not None,
                      300, 0.2) is None or self.proc.poll() is not None:
            tail = self.text()[-3000:]
            self.close()
            raise RuntimeError(f"flaxserve serve did not come up:\n{tail}")
        self.startup_s = time.monotonic() - t0

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def engine_pid(self) -> int:
        for pid in children_of(self.proc.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"engine" in cmdline and b"serving.cli" in cmdline:
                return pid
        raise RuntimeError("no engine process under serve")

    def slots_in_use(self) -> float:
        import re
        import urllib.request
        with urllib.request.urlopen(self.base_url + "/metrics", timeout=5) as r:
            text = r.read().decode()
        m = re.search(r"^flaxserve_engine_slots_in_use (\S+)", text, re.M)
        return float(m.group(1)) if m else -1.0

    def close(self) -> None:
        kids = children_of(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in kids:          # never leave a process behind, whatever the test did
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.log.close()


def quantiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    v = sorted(values)
    q = lambda p: v[min(len(v) - 1, int(p * len(v)))]   # noqa: E731
    return f"p50 {q(0.5) * 1000:.1f} ms, p99 {q(0.99) * 1000:.1f} ms (n={len(v)})"
