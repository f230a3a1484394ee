"""One model over several processes (hosts): JAX's own distributed runtime.

`initialize` joins this process to the others through `jax.distributed` (a coordinator at
HOST:PORT, or the environment JAX detects itself on TPU pods and SLURM); after it,
`jax.devices()` lists every process's devices and a `model.sharding.make_mesh` over them
spans all hosts. Every process must then run the same jitted programs on global arrays
built from the same host values (`global_put`); results come back with `to_host`.

On CPU, cross-process collectives need gloo (set here). A lost peer is the whole mesh lost:
the coordination service stops the survivors after `heartbeat_s` without a heartbeat.

`flaxserve engine --coordinator HOST:PORT --num-processes N --process-id I` joins through
`join` before anything touches JAX; process 0 leads (scheduler, gRPC) and the others
replay its device calls (serving/engine/lockstep.py). See docs/scale-out.md.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

HEARTBEAT_S = 10


@dataclass
class Cluster:
    coordinator: str | None = None     # HOST:PORT of process 0's coordination service
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_s: int = HEARTBEAT_S

    def validate(self) -> "Cluster":
        given = [v is not None for v in (self.coordinator, self.num_processes,
                                         self.process_id)]
        if any(given) and not all(given):
            raise ValueError("--coordinator, --num-processes and --process-id go together "
                             "(or none of them, where JAX detects the cluster itself)")
        if self.coordinator is not None and ":" not in self.coordinator:
            raise ValueError(f"--coordinator must be HOST:PORT, got {self.coordinator!r}")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError("--num-processes must be >= 1")
        if self.process_id is not None and not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"--process-id must be in [0, {self.num_processes}), "
                             f"got {self.process_id}")
        if self.heartbeat_s < 1:
            raise ValueError("the heartbeat timeout must be >= 1 s")
        return self


def initialize(cluster: Cluster) -> None:
    """Join the cluster; call before anything touches a JAX device."""
    import jax
    cluster.validate()
    # only the CPU backend reads it; GPU/TPU collectives are their own (NCCL, ICI)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(cluster.coordinator, cluster.num_processes, cluster.process_id,
                               heartbeat_timeout_seconds=cluster.heartbeat_s)
    # the runtime's preemption notifier takes SIGTERM over (and only logs it): give it back,
    # so a supervisor can stop a process that is still loading or warming up
    import signal
    import threading
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def is_leader() -> bool:
    import jax
    return jax.process_index() == 0


def global_put(tree, shardings):
    """Host values (the same on every process) -> global arrays with these shardings; each
    process fills only its own devices' shards."""
    import jax
    import numpy as np

    def put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree, shardings)


def to_host(x):
    """A global array's full value on every process (gathered if it is not replicated)."""
    import numpy as np
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def add_arguments(parser) -> None:
    """`flaxserve engine`'s cluster flags."""
    parser.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                        help="one engine over several processes (hosts): process 0's address "
                             "and a free port for JAX's coordination service (with "
                             "--num-processes and --process-id; docs/scale-out.md)")
    parser.add_argument("--num-processes", type=int, default=None, metavar="N",
                        help="processes in the engine (one per host)")
    parser.add_argument("--process-id", type=int, default=None, metavar="I",
                        help="this process's index: 0 leads (scheduler and gRPC), the "
                             "others follow")
    parser.add_argument("--lockstep-port", type=int, default=None, metavar="PORT",
                        help="the leader's port for its device calls to the followers "
                             "(default: the coordinator's port + 1)")
    parser.add_argument("--heartbeat-timeout", type=int, default=HEARTBEAT_S, metavar="S",
                        help="seconds without a heartbeat before JAX's coordination service "
                             f"stops the survivors of a lost process (default {HEARTBEAT_S})")


class Role:
    """This process's part in a multi-process engine."""

    def __init__(self, cluster: Cluster, lockstep_port: int | None, say):
        from serving.engine import lockstep
        self.cluster = cluster
        self.process_id = cluster.process_id
        self.leader = cluster.process_id == 0
        self.address = lockstep.channel_address(cluster.coordinator, lockstep_port)
        self._say = say
        self.channel = None
        if self.leader:   # listen before loading: followers connect once they are warm
            self.channel = lockstep.LeaderChannel("" if self.address[0] in ("0.0.0.0", "")
                                                  else self.address[0], self.address[1],
                                                  cluster.num_processes)

    def check_mesh(self, mesh) -> None:
        import jax
        if mesh is None or mesh.devices.size != jax.device_count():
            have = "none" if mesh is None else f"{mesh.devices.size} devices"
            raise ValueError(f"--mesh must span every process's devices ({jax.device_count()} "
                             f"over {jax.process_count()} processes), got {have}: e.g. "
                             f"--mesh data=1,model={jax.device_count()}")

    def lead(self, engine):
        """Wait for the followers; the engine the scheduler drives."""
        from serving.engine import lockstep
        self._say(f"leader: waiting for {self.cluster.num_processes - 1} follower(s) on "
                  f"{self.address[0]}:{self.address[1]}")
        self.channel.accept()
        self._say("leader: every follower is connected")
        return lockstep.LeaderEngine(engine, self.channel)

    @property
    def lost(self) -> str | None:
        return self.channel.lost if self.channel is not None else None

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()

    def follow(self, engine) -> int:
        from serving.engine import lockstep
        status = lockstep.follow(engine, self.address[0] or "127.0.0.1", self.address[1],
                                 self.process_id, say=self._say)
        if status:   # the leader is gone: JAX's shutdown barrier would wait for it
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        return status


def join(args, say) -> Role | None:
    """`flaxserve engine`'s cluster flags -> join the cluster (None: one process)."""
    cluster = Cluster(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                      getattr(args, "process_id", None),
                      getattr(args, "heartbeat_timeout", HEARTBEAT_S)).validate()
    if cluster.coordinator is None or cluster.num_processes == 1:
        return None
    role = Role(cluster, getattr(args, "lockstep_port", None), say)
    say(f"joining the cluster at {cluster.coordinator} as process {cluster.process_id} of "
        f"{cluster.num_processes}")
    initialize(cluster)
    import jax
    say(f"joined: {jax.device_count()} devices over {jax.process_count()} processes "
        f"({jax.local_device_count()} here)")
    return role
