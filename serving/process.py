"""Process lifecycle helpers: die with the parent, check a port before loading anything.

`flaxserve serve` runs the engine and the front end as children in their own process
groups (a terminal's Ctrl-C or hang-up reaches `serve` alone, which then stops them in
order). So that no child outlives a `serve` killed with SIGKILL, each child asks Linux for
a parent-death signal (`prctl(PR_SET_PDEATHSIG)`) as its first act, and exits at once if
the parent is already gone. Linux only; elsewhere these are no-ops.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
import sys

PARENT_ENV = "FLAXSERVE_PARENT_PID"    # set by `serve` in its children's environment
_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(sig: int = signal.SIGTERM, parent_pid: int | None = None) -> None:
    """Bind this process's life to its parent's: a parent-death signal, and `sig` to
    itself now if the parent already died (the signal is only sent on a later death).

    `parent_pid` defaults to $FLAXSERVE_PARENT_PID (removed from the environment, so that
    grandchildren do not read it); without either, nothing is done."""
    if parent_pid is None:
        value = os.environ.pop(PARENT_ENV, None)
        if not value:
            return
        parent_pid = int(value)
    if set_parent_death_signal(sig) and os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)


def check_port_free(host: str, port: int, flag: str) -> None:
    """A ValueError naming the flag when `host:port` cannot be bound (another server has
    it). Binds with SO_REUSEADDR like the real servers, so a socket in TIME_WAIT is free."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ValueError(f"{flag} {port}: {host}:{port} is already in use "
                                 "(another server is running there?)") from None
            raise ValueError(f"{flag} {port}: cannot listen on {host}:{port}: "
                             f"{e.strerror}") from None


def can_connect(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """True when something accepts TCP connections on host:port."""
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def kill_group(pid: int, sig: int) -> None:
    """`sig` to the process group led by `pid` (a child started with process_group=0)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def rss_mib(pid: int | str = "self") -> float:
    """Resident memory of a process in MiB (Linux /proc; 0.0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        return 0.0


def trim_memory() -> bool:
    """Hand the heap's free pages back to the system (glibc `malloc_trim`): the XLA
    compiler frees tens of MiB per program that would otherwise stay resident."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False
