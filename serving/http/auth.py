"""API keys: where they come from, how a request presents one, and which paths need one.

Keys come from `--api-key-file` (one per line, `#` comments), the `FLAXSERVE_API_KEYS`
environment variable (comma-separated) and `--api-key` flags (which every local user can
read in `ps`: a warning says so). A request may send `Authorization: Bearer K`,
`Authorization: Api-Key K` or `x-api-key: K`.

Rules (docs/reliability.md):
- Every path needs a key except an explicit allow-list (`/health`, `/openapi.json`, and
  `/metrics` unless the server keys it too with `--metrics-auth`). The decision is made on the normalised path: percent-decoded,
  `//` collapsed, `.` and `..` resolved, trailing slash dropped, so `//v1/...`,
  `/v1/../v1/...`, `%2F` or `/v1/models/` need the key like their plain forms. Anything
  unknown needs the key too (a 401 comes before a 404: no probing the routes).
- Several headers: the request is accepted when ANY key it presents is valid. A wrong key
  next to a right one gives no access the right one does not already give, and SDKs add
  headers from the environment (the Anthropic SDK sends `x-api-key` and `Authorization`
  when both are configured), so rejecting would break honest clients and stop no one.
- Comparison is constant time: SHA-256 of each side, `hmac.compare_digest` against every
  configured key with no early exit. Keys are never logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import posixpath
from pathlib import Path
from urllib.parse import unquote

ENV_VAR = "FLAXSERVE_API_KEYS"
# /openapi.json describes the API (no data): tools and SDK generators read it before
# they hold a key
PUBLIC_PATHS = frozenset({"/health", "/openapi.json"})
METRICS_PATH = "/metrics"

log = logging.getLogger("flaxserve.http")


def load_keys(flags: list[str] | None = None, key_file: str | None = None,
              environ: dict | None = None) -> list[str]:
    environ = os.environ if environ is None else environ
    keys = [k.strip() for k in (flags or []) if k and k.strip()]
    if keys:
        log.warning("--api-key on the command line is visible to every local user (ps, "
                    "/proc/*/cmdline); prefer --api-key-file or %s", ENV_VAR)
    keys += [k.strip() for k in environ.get(ENV_VAR, "").split(",") if k.strip()]
    if key_file:
        path = Path(key_file)
        if not path.is_file():
            raise ValueError(f"--api-key-file: no such file: {key_file}")
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    return list(dict.fromkeys(keys))


def normalize_path(path: str) -> str:
    """The path a request names, as the router will see it: percent-decoded (twice, so
    `%252F` cannot hide a slash either), `//` collapsed, dot segments resolved, no
    trailing slash."""
    for _ in range(2):
        path = unquote(path)
    path = path.replace("\\", "/")
    normal = posixpath.normpath("/" + path.lstrip("/"))
    if normal.startswith("//"):
        normal = "/" + normal.lstrip("/")
    return normal


def needs_key(path: str, metrics_public: bool = True) -> bool:
    """Whether `path` (raw, as received) is outside the allow-list."""
    normal = normalize_path(path)
    if normal in PUBLIC_PATHS:
        return False
    return not (metrics_public and normal == METRICS_PATH)


def presented_keys(authorization: str | None, x_api_key: str | None) -> list[str]:
    """Every key a request presents, from any of the three accepted header forms."""
    keys = []
    if x_api_key and x_api_key.strip():
        keys.append(x_api_key.strip())
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() in ("bearer", "api-key") and value.strip():
            keys.append(value.strip())
    return keys


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    """The first presented key (kept for callers that take one)."""
    keys = presented_keys(authorization, x_api_key)
    return keys[0] if keys else None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class KeyChecker:
    def __init__(self, keys: list[str]):
        self._keys = [_digest(k) for k in keys]

    @property
    def open(self) -> bool:
        return not self._keys

    def allows(self, key: str | list[str] | None) -> bool:
        """True when no key is configured, or when any presented key is a configured one."""
        if not self._keys:
            return True
        given = [key] if isinstance(key, str) else list(key or [])
        ok = False
        for g in given:
            d = _digest(g)
            for k in self._keys:  # no early exit: time does not depend on which key matched
                ok |= hmac.compare_digest(d, k)
        return ok
