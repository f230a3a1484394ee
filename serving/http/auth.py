"""API keys: where they come from and how a request presents one.

Keys come from `--api-key` flags, `--api-key-file` (one per line, `#` comments) and the
`FLAXSERVE_API_KEYS` environment variable (comma-separated). A request may send
`Authorization: Bearer K`, `Authorization: Api-Key K` or `x-api-key: K`. Comparison uses
`hmac.compare_digest` over every configured key; keys are never logged or echoed.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

ENV_VAR = "FLAXSERVE_API_KEYS"


def load_keys(flags: list[str] | None = None, key_file: str | None = None,
              environ: dict | None = None) -> list[str]:
    environ = os.environ if environ is None else environ
    keys = [k.strip() for k in (flags or []) if k and k.strip()]
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


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key a request presents, from any of the three accepted header forms."""
    if x_api_key:
        return x_api_key.strip()
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() in ("bearer", "api-key") and value.strip():
            return value.strip()
    return None


class KeyChecker:
    def __init__(self, keys: list[str]):
        self._keys = [k.encode() for k in keys]

    @property
    def open(self) -> bool:
        return not self._keys

    def allows(self, key: str | None) -> bool:
        if not self._keys:
            return True
        if key is None:
            return False
        given = key.encode()
        ok = False
        for k in self._keys:  # no early exit: time does not depend on which key matched
            ok |= hmac.compare_digest(given, k)
        return ok
