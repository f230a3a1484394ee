"""One model over several processes (hosts): JAX's own distributed runtime.

`initialize` joins this process to the others through `jax.distributed` (a coordinator at
HOST:PORT, or the environment JAX detects itself on TPU pods and SLURM); after it,
`jax.devices()` lists every process's devices and a `model.sharding.make_mesh` over them
spans all hosts. Every process must then run the same jitted programs on global arrays
built from the same host values (`global_put`); results come back with `to_host`.

On CPU, cross-process collectives need gloo (set here). A lost peer is the whole mesh lost:
the coordination service stops the survivors after `heartbeat_s` without a heartbeat.

Status (docs/scale-out.md): this module and its test (the 2-process data=2,model=4 mesh
computes the decoder exactly as 1 process) are the landed piece; the engine's leader /
follower step loop (`flaxserve engine --coordinator ...`) is not built yet.
"""

from __future__ import annotations

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
