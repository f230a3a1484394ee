"""One engine over two processes (serving/engine/multihost.py, lockstep.py, docs/scale-out.md).

Two real `flaxserve engine` processes on loopback, each with 2 simulated CPU devices, joined
by `jax.distributed` (gloo collectives) into one data=2,model=2 mesh (the data axis across
the processes, the model axis within each): process 0 serves gRPC and runs the scheduler,
process 1 replays its device calls. Greedy and seeded outputs through gRPC equal one
process on 1 device (a one-process mesh is checked against one device in
test_paged_kv.py and test_orbax_sharding.py);
the follower SIGKILLed -> the leader exits non-zero within seconds, naming process 1.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.http_fixtures import ROOT, _env, _stop, _wait, free_port, write_model_dir

pytestmark = pytest.mark.timeout(900)

PROMPTS = [[5, 9, 2, 7, 1, 3, 8, 4], [4, 4, 6, 1, 0, 2, 9, 3, 17, 40, 2]]
SAMPLINGS = [{"temperature": 0.0, "max_tokens": 8, "ignore_eos": True},
             {"temperature": 1.0, "top_p": 0.9, "seed": 7, "max_tokens": 8,
              "ignore_eos": True},
             {"temperature": 0.8, "seed": 11, "n": 2, "max_tokens": 6, "ignore_eos": True}]


def _engine(model_dir, grpc_port, devices, log, *extra):
    env = _env()
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                        + f" --xla_force_host_platform_device_count={devices}")
    return subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "engine", "--model", str(model_dir),
         "--grpc-port", str(grpc_port), "--max-slots", "4", "--max-model-len", "32", "--prefill-batch", "1", *extra],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _outputs(port, what: str) -> list:
    from serving.client import EngineClient
    t0 = time.monotonic()
    with EngineClient(f"127.0.0.1:{port}") as client:
        out = [[c.token_ids for c in client.generate(p, s, timeout=240).choices]
               for s in SAMPLINGS for p in PROMPTS]
    print(f"\n{what}: {sum(len(c) for o in out for c in o)} tokens in "
          f"{time.monotonic() - t0:.1f} s (one request at a time; may include compiling)")
    return out


def test_two_process_engine_serves_as_one_and_dies_with_its_follower(tmp_path):
    from serving.client import EngineClient
    model_dir = write_model_dir(tmp_path)
    coordinator, lead_port, one_port = (free_port() for _ in range(3))
    cluster = ["--mesh", "data=2,model=2", "--coordinator", f"127.0.0.1:{coordinator}",
               "--num-processes", "2", "--heartbeat-timeout", "5"]
    logs = {k: open(tmp_path / f"{k}.log", "w") for k in ("leader", "follower", "one")}
    procs = {}
    try:
        procs["leader"] = _engine(model_dir, lead_port, 2, logs["leader"], *cluster,
                                  "--process-id", "0")
        procs["follower"] = _engine(model_dir, lead_port, 2, logs["follower"], *cluster,
                                    "--process-id", "1")
        procs["one"] = _engine(model_dir, one_port, 1, logs["one"])
        for name, port in (("leader", lead_port), ("one", one_port)):
            with EngineClient(f"127.0.0.1:{port}") as c:
                _wait(lambda: c.healthy(timeout=1.0), procs[name], name, 600)
        assert procs["follower"].poll() is None

        two = _outputs(lead_port, "2 processes x 2 devices")
        assert two == _outputs(one_port, "1 process x 1 device"), "2 x 2 != 1 device"
        assert all(len(c) == 8 for c in two[0]) and two[0] != two[len(PROMPTS)]

        procs["follower"].send_signal(signal.SIGKILL)      # a host lost
        procs["follower"].wait(10)
        lost_at = time.monotonic()
        code = procs["leader"].wait(60)
        took = time.monotonic() - lost_at
    finally:
        for p in procs.values():
            _stop(p)
        for f in logs.values():
            f.close()
    text = (tmp_path / "leader.log").read_text()
    print(f"\nleader exited {code} {took:.1f} s after its follower was SIGKILLed")
    assert code != 0 and took < 20, text[-2000:]
    assert "process 1 (follower) lost" in text, text[-2000:]


def test_cluster_flags_are_checked():
    from serving.engine.multihost import Cluster
    with pytest.raises(ValueError, match="go together"):
        Cluster("127.0.0.1:1234", 2, None).validate()
    with pytest.raises(ValueError, match="HOST:PORT"):
        Cluster("localhost", 2, 0).validate()
    with pytest.raises(ValueError, match=r"--process-id must be in \[0, 2\)"):
        Cluster("127.0.0.1:1234", 2, 2).validate()
