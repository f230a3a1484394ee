"""The front end's engine-health watcher (serving/http/engine_link.py) against a real gRPC
health service on a loopback port: a check that times out (an engine starved of CPU under
overload) does not flip /health to 503 at once; several in a row do; a refused connection
or NOT_SERVING counts at once; a recovered engine is healthy again."""
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.http.engine_link import SLOW_CHECKS_UNHEALTHY, EngineLink
from tests.http_fixtures import free_port


class Health(health_pb2_grpc.HealthServicer):
    def __init__(self):
        self.mode, self.slow_calls = "ok", 0

    def Check(self, request, context):
        if self.mode == "slow":
            self.slow_calls += 1
            time.sleep(1.3)          # past the watcher's 1 s deadline
        status = (health_pb2.HealthCheckResponse.NOT_SERVING if self.mode == "not serving"
                  else health_pb2.HealthCheckResponse.SERVING)
        return health_pb2.HealthCheckResponse(status=status)


def _until(pred, timeout_s):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_slow_checks_tolerated_then_unhealthy_down_at_once():
    port = free_port()
    servicer = Health()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    link = EngineLink(f"127.0.0.1:{port}")
    try:
        # the very first check opens the channel: on a loaded CI machine that alone can
        # pass its 1 s deadline, and the watcher then finds the engine within 50 ms
        assert _until(lambda: link.healthy_cached() is True, 10)
        servicer.mode = "slow"
        seen_while_tolerated = []
        while servicer.slow_calls < SLOW_CHECKS_UNHEALTHY:   # the first checks time out
            if servicer.slow_calls >= 1:
                seen_while_tolerated.append(link.healthy_cached())
            time.sleep(0.05)
        assert seen_while_tolerated and all(seen_while_tolerated)
        assert _until(lambda: link.healthy_cached() is False, 10)   # stuck: unhealthy
        servicer.mode = "ok"
        assert _until(lambda: link.healthy_cached() is True, 10)    # back
        servicer.mode = "not serving"
        assert _until(lambda: link.healthy_cached() is False, 3)
        servicer.mode = "ok"
        assert _until(lambda: link.healthy_cached() is True, 3)
        server.stop(0)                                     # refused: down at once
        assert _until(lambda: link.healthy_cached() is False, 3)
    finally:
        link.close()
        server.stop(0)
