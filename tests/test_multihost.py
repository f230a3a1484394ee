"""One mesh over two processes (serving/engine/multihost.py, docs/scale-out.md).

Two real processes on loopback, each with 4 simulated CPU devices, joined by
`jax.distributed` (gloo collectives): the decoder's logits on a data=2,model=4 mesh spanning
both equal one process on 1 device and on 8 devices; a follower killed -> the leader stops,
non-zero, within seconds, naming the lost process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.http_fixtures import ROOT, _env, free_port

pytestmark = pytest.mark.timeout(300)

_FORWARD = r"""
import json, os, sys
pid, n, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=" + ("8" if pid < 0 else "4")
import jax
import numpy as np
from serving.engine import multihost
if pid >= 0:
    multihost.initialize(multihost.Cluster(f"127.0.0.1:{port}", n, pid, heartbeat_s=5))
from jax.sharding import NamedSharding, PartitionSpec as P
from model.config import named_config
from model.decoder import forward, init_cache, init_params
from model.sharding import cache_shardings, make_mesh, param_shardings
cfg = named_config("tiny", dtype="float32")
params = jax.tree.map(np.asarray, jax.device_get(init_params(cfg, seed=3)))
tokens = np.array([[5, 9, 2, 7, 1, 3, 8, 4], [4, 4, 6, 1, 0, 2, 9, 3]], np.int32)
positions = np.tile(np.arange(8, dtype=np.int32), (2, 1))
cache = jax.tree.map(np.asarray, init_cache(cfg, 2, 16))

def run(mesh):
    rep = NamedSharding(mesh, P())
    p = multihost.global_put(params, param_shardings(cfg, mesh))
    c = multihost.global_put(cache, cache_shardings(cfg, mesh, 2, 16))
    t, pos = multihost.global_put((tokens, positions), (rep, rep))
    logits, _ = jax.jit(lambda p, c, t, pos: forward(cfg, p, c, t, pos))(p, c, t, pos)
    return multihost.to_host(logits).tolist()

res = {"devices": jax.device_count(), "processes": jax.process_count()}
if pid < 0:
    res["one"], res["eight"] = run(make_mesh("data=1,model=1")), run(make_mesh("data=2,model=4"))
else:
    res["mesh"] = run(make_mesh("data=2,model=4"))
json.dump(res, open(out, "w"))
"""

_LOST = r"""
import os, sys, time
pid, port = int(sys.argv[1]), sys.argv[2]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
from serving.engine import multihost
multihost.initialize(multihost.Cluster(f"127.0.0.1:{port}", 2, pid, heartbeat_s=3))
from jax.experimental import multihost_utils
multihost_utils.sync_global_devices("up")
print("joined", pid, flush=True)
if pid == 1:
    os.kill(os.getpid(), 9)          # the follower is lost
while True:                          # the leader keeps stepping until the runtime stops it
    time.sleep(0.2)
"""


def _spawn(script, *args, log):
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=ROOT,
                            env=_env(), stdout=log, stderr=subprocess.STDOUT)


def test_two_process_mesh_computes_as_one_process(tmp_path):
    port = free_port()
    with open(tmp_path / "log", "w") as log:
        procs = [_spawn(_FORWARD, pid, 2, port, tmp_path / f"{pid}.json", log=log)
                 for pid in (0, 1)]
        ref = _spawn(_FORWARD, -1, 1, 0, tmp_path / "ref.json", log=log)
        codes = [p.wait(240) for p in (*procs, ref)]
    assert codes == [0, 0, 0], (tmp_path / "log").read_text()[-3000:]
    r = json.loads((tmp_path / "ref.json").read_text())
    outs = [json.loads((tmp_path / f"{pid}.json").read_text()) for pid in (0, 1)]
    assert all(o["devices"] == 8 and o["processes"] == 2 for o in outs)
    one, eight = np.array(r["one"]), np.array(r["eight"])
    for o in outs:
        mesh = np.array(o["mesh"])
        np.testing.assert_allclose(mesh, one, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(mesh, eight, atol=1e-5, rtol=1e-5)
        assert (mesh.argmax(-1) == one.argmax(-1)).all()      # greedy picks identical
    print(f"\nmax |2 processes - 1 device| = {np.abs(np.array(outs[0]['mesh']) - one).max():.2e}")


def test_follower_lost_stops_the_leader_naming_it(tmp_path):
    port = free_port()
    with open(tmp_path / "leader.log", "w") as llog, open(tmp_path / "f.log", "w") as flog:
        leader = _spawn(_LOST, 0, port, log=llog)
        follower = _spawn(_LOST, 1, port, log=flog)
        follower.wait(120)
        lost_at = time.monotonic()
        try:
            code = leader.wait(60)
        finally:
            leader.kill()
        took = time.monotonic() - lost_at
    text = (tmp_path / "leader.log").read_text()
    print(f"\nleader exited {code} {took:.1f} s after the follower was lost")
    assert code != 0 and took < 30
    assert "stopped sending heartbeats" in text and "joined 0" in text
    tail = text.split("stopped sending heartbeats")[1][:40]
    assert "1" in tail, tail                               # names the lost process: 1
