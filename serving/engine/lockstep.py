"""One engine over several processes: the leader's device calls, replayed by the followers.

Over a mesh that spans several processes (serving/engine/multihost.py) every process must
run the same compiled programs on the same global inputs, in the same order. The leader
(process 0) runs the scheduler and the gRPC server as on one host, but its DeviceEngine is
wrapped in `LeaderEngine`: each device-calling method (`CALLS`) first sends its name and
host-side arguments (numpy arrays, ints, SamplingParams) to every follower over a TCP
channel of our own, then runs. A follower (`follow`) makes the same call on its own
DeviceEngine, so its programs and its host mirrors (positions, block tables) stay in step.
Only the leader reads results (the sampled ids come back replicated, see
DeviceEngine._on_every_process); followers never talk to clients.

A lost process is the engine lost: the leader notices a follower's channel closing at once
and reports it (`lost`), `flaxserve engine` then exits non-zero naming it; a follower
exits non-zero when the leader's channel closes. (JAX's coordination service would stop
the survivors too, after its heartbeat timeout.)

The channel carries pickles, read back with an unpickler that builds only numpy arrays,
builtin containers and `sampling` dataclasses: like the coordinator's port, it belongs on
the cluster's private network.
"""

from __future__ import annotations

import io
import pickle
import select
import socket
import struct
import sys
import threading
import time

# every DeviceEngine method that runs a program or changes what the next one sees
CALLS = ("prefill_chunk", "insert", "insert_many", "copy_prefix", "forward_step",
         "sample_step", "step", "multi_step", "release", "set_blocks", "copy_block",
         "set_steering")
CONNECT_TIMEOUT_S = 600.0
_HEADER = struct.Struct("!Q")


def channel_address(coordinator: str, port: int | None = None) -> tuple[str, int]:
    """The leader's channel: the coordinator's host, its port + 1 unless given."""
    host, _, cport = coordinator.rpartition(":")
    return host.strip("[]"), int(port if port is not None else int(cport) + 1)


class _SafeUnpickler(pickle.Unpickler):
    _BUILTINS = {"tuple", "list", "dict", "set", "frozenset", "slice", "complex",
                 "bytearray", "bytes", "str", "int", "float", "bool"}

    def find_class(self, module, name):
        if (module == "builtins" and name in self._BUILTINS) or module == "numpy" or \
                module.startswith(("numpy.", "sampling.")) or module == "collections":
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"lockstep channel: refusing {module}.{name}")


def _send(sock: socket.socket, obj) -> None:
    data = pickle.dumps(obj, protocol=5)
    sock.sendall(_HEADER.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket):
    """The next message, or None when the other side is gone."""
    header = _recv_exact(sock, _HEADER.size)
    if header is None:
        return None
    data = _recv_exact(sock, _HEADER.unpack(header)[0])
    return None if data is None else _SafeUnpickler(io.BytesIO(data)).load()


class LeaderChannel:
    """Process 0's side: listens early (followers connect when they are ready), then sends
    every call to every follower and watches for one going away."""

    def __init__(self, host: str, port: int, num_processes: int):
        self.num_followers = num_processes - 1
        self.address = (host, port)
        self._listener = socket.create_server((host, port), reuse_port=False)
        self._followers: dict[int, socket.socket] = {}
        self._lock = threading.Lock()
        self.lost: str | None = None          # why the engine is lost, once it is
        self.on_lost = None                   # called once, from the watcher thread

    def accept(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Wait for every follower's hello (its process id)."""
        deadline = time.monotonic() + timeout_s
        while len(self._followers) < self.num_followers:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(1, self.num_followers + 1)) - set(self._followers))
                raise TimeoutError(f"lockstep: process(es) {missing} did not connect to "
                                   f"{self.address[0]}:{self.address[1]} within {timeout_s:.0f} s")
            self._listener.settimeout(left)
            sock, peer = self._listener.accept()
            sock.settimeout(timeout_s)
            hello = _recv(sock)
            if not (isinstance(hello, tuple) and len(hello) == 2 and hello[0] == "follower"
                    and hello[1] in range(1, self.num_followers + 1)
                    and hello[1] not in self._followers):
                sock.close()
                continue
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._followers[hello[1]] = sock
        self._listener.close()
        threading.Thread(target=self._watch, name="lockstep-watch", daemon=True).start()

    def _lose(self, pid: int, why: str) -> None:
        with self._lock:
            if self.lost is not None:
                return
            self.lost = f"process {pid} (follower) lost: {why}"
        if self.on_lost is not None:
            self.on_lost(self.lost)

    def _watch(self) -> None:
        """Followers never send after their hello: readable means closed (or broken)."""
        socks = {s: pid for pid, s in self._followers.items()}
        while self.lost is None and socks:
            ready, _, _ = select.select(list(socks), [], [], 0.5)
            for s in ready:
                try:
                    data = s.recv(1)
                except OSError as e:
                    data, why = b"", str(e)
                else:
                    why = "its channel closed"
                if not data:
                    self._lose(socks[s], why)
                    return

    def send(self, message) -> None:
        if self.lost is not None:
            raise RuntimeError(f"the engine is lost: {self.lost}")
        for pid, sock in self._followers.items():
            try:
                _send(sock, message)
            except OSError as e:
                self._lose(pid, f"sending to it failed ({e})")
                raise RuntimeError(f"the engine is lost: {self.lost}") from e

    def close(self) -> None:
        """A clean stop: the followers exit 0."""
        for sock in self._followers.values():
            try:
                if self.lost is None:
                    _send(sock, ("stop", (), {}))
                sock.close()
            except OSError:
                pass


class LeaderEngine:
    """The leader's DeviceEngine: every call in CALLS goes to the followers first; every
    other attribute is the engine's own."""

    def __init__(self, engine, channel: LeaderChannel):
        self._engine = engine
        self._channel = channel

    def __getattr__(self, name):
        value = getattr(self._engine, name)
        if name not in CALLS:
            return value

        def call(*args, **kwargs):
            self._channel.send((name, args, kwargs))
            return value(*args, **kwargs)
        return call

    def sample_step(self, forward, mask=None):
        # the Forward's logits live on the device: each follower uses the one its own
        # forward_step made
        self._channel.send(("sample_step", (), {"mask": mask}))
        return self._engine.sample_step(forward, mask)

    def score_prompt(self, prompt, k: int):
        """model.scoring.prompt_logprobs on every process (the scoring path)."""
        self._channel.send(("score_prompt", (prompt, k), {}))
        return score_prompt(self._engine, prompt, k)

    def sampler_carry(self, slot: int):
        self._channel.send(("sampler_carry", (slot,), {}))
        return sampler_carry(self._engine, slot)


def sampler_carry(engine, slot: int):
    """DeviceEngine.sampler_carry over several processes: the state's rows may live on
    other processes' devices, so every process gathers them (a collective, in step)."""
    import numpy as np

    from serving.engine.multihost import to_host
    sampler = engine.state["sampler"]
    return np.asarray([to_host(getattr(sampler, f))[slot]
                       for f in getattr(engine, "_carried", ())], np.float32)


def score_prompt(engine, prompt, k: int):
    from model.scoring import prompt_logprobs
    return prompt_logprobs(engine.config, engine.params, prompt, k)


def follow(engine, host: str, port: int, process_id: int, say=print,
           timeout_s: float = CONNECT_TIMEOUT_S) -> int:
    """A follower's life: connect to the leader, replay its calls until it goes. Returns
    the exit status (1: the leader is gone, the engine is lost)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=5)
            break
        except OSError as e:
            if time.monotonic() > deadline:
                say(f"cannot reach the leader's channel {host}:{port} ({e})")
                return 1
            time.sleep(0.2)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _send(sock, ("follower", process_id))
    say(f"process {process_id}: following the leader at {host}:{port}")
    forward = None
    calls = 0
    while True:
        try:
            message = _recv(sock)
        except OSError:
            message = None
        if message is None:
            say(f"process {process_id}: the leader (process 0) is gone after {calls} calls; "
                "the engine is lost, exiting with status 1")
            return 1
        name, args, kwargs = message
        if name == "stop":
            say(f"process {process_id}: the leader stopped after {calls} calls")
            return 0
        calls += 1
        try:
            if name == "score_prompt":
                score_prompt(engine, *args)
            elif name == "sampler_carry":
                sampler_carry(engine, *args)
            elif name == "sample_step":
                engine.sample_step(forward, **kwargs)
            elif name in CALLS:
                out = getattr(engine, name)(*args, **kwargs)
                if name == "forward_step":
                    forward = out
            else:
                say(f"process {process_id}: unknown call {name!r} from the leader; exiting")
                return 1
        except ValueError:
            # host-side validation the leader met too (the same inputs): nothing ran
            pass
        except Exception as e:  # noqa: BLE001 - the leader's scheduler decides what breaks
            print(f"lockstep follower {process_id}: {name} failed: {e!r}", file=sys.stderr)
