"""The API key cannot be walked around (issue 11).

Through a real gunicorn front end (raw `http.client`, so every path goes on the wire as
written: no client-side normalisation): each spelling of a protected path needs the key,
the allow-list does not, several auth headers follow the stated rule (any valid key
passes), and `/metrics` can be keyed by a flag. The engine's gRPC port: a shared token
checked by an interceptor, the client sending it, reflection off by default.
"""

from __future__ import annotations

import http.client
import json
import logging

import grpc
import pytest

from serving.http.auth import KeyChecker, load_keys, needs_key, normalize_path
from tests.http_fixtures import API_KEY

pytestmark = pytest.mark.timeout(600)

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}

# Spellings of protected paths a router may resolve to a real route (or to a 404: still
# no route discovery without a key).
PROTECTED = [
    "/v1/chat/completions", "//v1/chat/completions", "///v1/chat/completions",
    "/v1//chat/completions", "/v1/chat//completions", "/v1/chat/completions/",
    "/v1/chat/completions//", "/v1/../v1/chat/completions", "/./v1/chat/completions",
    "/v1/./chat/completions", "/health/../v1/chat/completions", "/%76%31/chat/completions",
    "/v1%2Fchat%2Fcompletions", "/v1/chat/completions%2F", "/v1%252Fchat%252Fcompletions",
    "/v1/chat/completions?x=1", "//v1/models", "/v1/models/", "/V1/models", "/nothing",
    "/v1/messages", "//v1/messages", "/v1/messages/count_tokens/",
]


def _request(servers, method: str, path: str, headers: dict | None = None, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", servers.port, timeout=60)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={
            "Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


@pytest.mark.parametrize("path", PROTECTED)
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"x-api-key": "wrong"}, {"Authorization": "Bearer "},
                                     {"Authorization": f"Basic {API_KEY}"}],
                         ids=["none", "wrong-bearer", "wrong-x-api-key", "empty-bearer",
                              "basic"])
def test_every_spelling_needs_the_key(keyed_servers, path, headers):
    method = "GET" if "models" in path or path == "/nothing" else "POST"
    status, body = _request(keyed_servers, method, path, headers,
                            CHAT if method == "POST" else None)
    assert status == 401, (path, status, body[:200])
    err = json.loads(body)
    if "/messages" in path:
        assert err["type"] == "error" and err["error"]["type"] == "authentication_error"
    else:
        assert err["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("path", ["/health", "/health/", "/metrics", "/openapi.json"])
def test_the_allow_list_needs_no_key(keyed_servers, path):
    status, _ = _request(keyed_servers, "GET", path)
    assert status == 200


@pytest.mark.parametrize("headers", [
    {"Authorization": f"Bearer {API_KEY}"},
    {"Authorization": f"bearer {API_KEY}"},
    {"Authorization": f"Api-Key {API_KEY}"},
    {"x-api-key": API_KEY},
    # the rule: a request passes when ANY key it presents is valid
    {"Authorization": f"Bearer {API_KEY}", "x-api-key": "wrong"},
    {"Authorization": "Bearer wrong", "x-api-key": API_KEY},
], ids=["bearer", "bearer-lowercase", "api-key", "x-api-key", "right-bearer-wrong-x",
        "wrong-bearer-right-x"])
def test_a_valid_key_passes(keyed_servers, headers):
    status, body = _request(keyed_servers, "POST", "/v1/chat/completions", headers, CHAT)
    assert status == 200, body[:300]
    status, _ = _request(keyed_servers, "POST", "//v1/chat/completions", headers, CHAT)
    assert status != 401


def test_two_wrong_keys_fail(keyed_servers):
    status, _ = _request(keyed_servers, "POST", "/v1/chat/completions",
                         {"Authorization": "Bearer a", "x-api-key": "b"}, CHAT)
    assert status == 401


def test_normalisation_and_rule_units(caplog):
    assert normalize_path("//v1/../v1/chat/completions/") == "/v1/chat/completions"
    assert normalize_path("/v1%252Fmodels") == "/v1/models"
    assert not needs_key("/health") and not needs_key("/metrics")
    assert needs_key("/metrics", metrics_public=False)
    assert needs_key("/health/../v1/models") and needs_key("//health/../../v1/models")
    checker = KeyChecker(["k1", "k2"])
    assert checker.allows(["bad", "k2"]) and not checker.allows(["bad", "worse"])
    assert not checker.allows([]) and not checker.allows(None)
    with caplog.at_level(logging.WARNING, logger="flaxserve.http"):
        load_keys(["k1"], None, {})
    assert "visible" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flaxserve.http"):
        assert load_keys([], None, {"FLAXSERVE_API_KEYS": "k9"}) == ["k9"]
    assert "visible" not in caplog.text


def test_metrics_can_need_the_key():
    import falcon.testing

    from serving.http.app import Settings, create_app
    from tests.http_fixtures import free_port
    app = create_app(Settings(engine=f"127.0.0.1:{free_port()}", api_keys=[API_KEY],
                              metrics_public=False))
    client = falcon.testing.TestClient(app)
    assert client.simulate_get("/metrics").status_code == 401
    assert client.simulate_get("/metrics", headers={"x-api-key": API_KEY}).status_code == 200
    assert client.simulate_get("/health").status_code == 503     # open; the engine is down


# ---- the engine's gRPC port ------------------------------------------------------------------

@pytest.fixture(scope="module")
def token_engine():
    from model.config import named_config
    from model.decoder import init_params
    from serving.engine.server import start_in_process
    cfg = named_config("tiny", dtype="float32")
    srv = start_in_process(cfg, init_params(cfg, seed=0), max_slots=2, max_len=64,
                           prefill_buckets=(8,), token="s3cret-token", warmup=False)
    yield srv
    srv.stop(grace_s=5)


def test_grpc_token(token_engine, monkeypatch):
    from serving.client import EngineClient
    monkeypatch.delenv("FLAXSERVE_GRPC_TOKEN", raising=False)
    address = f"127.0.0.1:{token_engine.port}"
    for token in (None, "wrong"):
        with EngineClient(address, token=token) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.generate([1, 2], {"max_tokens": 1}, timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as e:
                c.list_models()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert c.healthy()            # health checks need no token (probes, `serve`)
    with EngineClient(address, token="s3cret-token") as c:
        assert len(c.generate([1, 2], {"max_tokens": 2}, timeout=30).choices[0].token_ids) == 2
    monkeypatch.setenv("FLAXSERVE_GRPC_TOKEN", "s3cret-token")
    with EngineClient(address) as c:      # the front end's way: the environment
        assert c.list_models()[0].max_slots == 2


def test_grpc_reflection_is_off_by_default(token_engine):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    with grpc.insecure_channel(f"127.0.0.1:{token_engine.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as e:
            list(stub.ServerReflectionInfo(iter([request]), timeout=10,
                                           metadata=(("authorization",
                                                      "Bearer s3cret-token"),)))
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_grpc_token_file_and_default_host(tmp_path):
    from serving.cli import build_parser
    from serving.engine.server import load_token
    f = tmp_path / "token"
    f.write_text("from-file\n")
    assert load_token(str(f), {}) == "from-file"
    assert load_token(None, {"FLAXSERVE_GRPC_TOKEN": " env "}) == "env"
    assert load_token(None, {}) is None
    with pytest.raises(ValueError, match="grpc-token-file"):
        load_token(str(tmp_path / "missing"), {})
    args = build_parser().parse_args(["engine"])
    assert args.host == "127.0.0.1" and not args.grpc_reflection
