"""Errors as each protocol writes them.

Handlers raise one `APIError` (status, message, the offending `param`); the route's
protocol decides the body: OpenAI's `{"error": {message, type, param, code}}` or
Anthropic's `{"type": "error", "error": {type, message}}`. Keeping the status -> type
tables here means a handler never spells a protocol's error vocabulary itself.
"""

from __future__ import annotations

import re

# status -> (OpenAI type, OpenAI code)
_OPENAI = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "permission_denied"),
    404: ("invalid_request_error", "model_not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_exceeded", "rate_limit_exceeded"),
    500: ("server_error", None),
    503: ("server_error", "engine_unavailable"),
    504: ("server_error", "timeout"),
}
# status -> Anthropic error type
_ANTHROPIC = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
    429: "rate_limit_error", 500: "api_error", 503: "api_error", 504: "api_error",
    529: "overloaded_error",
}


class APIError(Exception):
    """A request that ends in an error response: status, message, and the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


# a field name; the research fields name their entry too (`steering[0].layer`)
_FIELD = re.compile(r"^((?:steering|variants)\[\d+\](?:\.[A-Za-z_]\w*)?|[A-Za-z_][A-Za-z0-9_]*)")


def from_value_error(e: ValueError, prefix: str = "") -> APIError:
    """A 400 from a `SamplingParams` ValueError, whose message starts with the field name."""
    message = str(e)
    param = None
    if message.startswith("unknown sampling parameter"):
        param = message.split(":", 1)[-1].strip().split(",")[0] or None
    else:   # the engine prefixes its sampling errors with "sampling: "
        m = _FIELD.match(message.removeprefix("sampling: "))
        param = m.group(1) if m else None
    return APIError(400, message, param=(prefix + param) if param else None)


def openai_body(err: APIError) -> dict:
    kind, code = _OPENAI.get(err.status, ("invalid_request_error" if err.status < 500
                                          else "server_error", None))
    return {"error": {"message": err.message, "type": kind, "param": err.param,
                      "code": err.code if err.code is not None else code}}


def anthropic_body(err: APIError) -> dict:
    kind = _ANTHROPIC.get(err.status, "invalid_request_error" if err.status < 500
                          else "api_error")
    message = err.message if err.param is None or err.param in err.message else (
        f"{err.param}: {err.message}")
    return {"type": "error", "error": {"type": kind, "message": message}}


def body_for(protocol: str, err: APIError) -> dict:
    return anthropic_body(err) if protocol == "anthropic" else openai_body(err)
