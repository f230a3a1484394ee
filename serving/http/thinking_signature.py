"""Signatures of Anthropic `thinking` blocks: an HMAC the server can check later.

A client sends earlier turns' thinking back to the server; the signature proves the text
is what this server produced (so a client cannot put words in the model's reasoning).
The key is `FLAXSERVE_THINKING_SECRET` when set, else random bytes drawn once per front
end: `flaxserve http` draws them in the gunicorn master (Settings), before the fork, so
every worker signs and verifies with the same key. A restart without the variable set
invalidates earlier signatures (a 400, as a tampered block is).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets

ENV = "FLAXSERVE_THINKING_SECRET"
_DOMAIN = b"flaxserve-thinking-v1\x00"


def load_secret() -> bytes:
    value = os.environ.get(ENV)
    return value.encode("utf-8") if value else secrets.token_bytes(32)


def sign(secret: bytes, thinking: str) -> str:
    mac = hmac.new(secret, _DOMAIN + thinking.encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(mac).decode("ascii")


def verify(secret: bytes, thinking: str, signature) -> bool:
    return isinstance(signature, str) and hmac.compare_digest(sign(secret, thinking),
                                                              signature)
