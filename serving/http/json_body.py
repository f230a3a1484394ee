"""A request body from bytes to a checked JSON object, or a 400 that says what is wrong.

Python's `json` accepts what later code cannot handle: nesting deep enough to blow the
recursion limit (a 500 then), `NaN` / `Infinity` and numbers that overflow to inf (not
JSON, and not a valid value of any field), and lone UTF-16 surrogates such as "\\ud800"
(a 500 as soon as the text is encoded for the tokenizer). All three are refused here,
once, for every route, with the field's path named when there is one.
"""

from __future__ import annotations

import json
import math
import re

from serving.http.errors import APIError
from serving.http.limits import MAX_JSON_DEPTH

_SURROGATE = re.compile("[\ud800-\udfff]")


class _NotFinite(ValueError):
    pass


def _constant(name: str):
    raise _NotFinite(f"{name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotFinite(f"{text} is out of range for a number")
    return value


def parse(raw: bytes) -> dict:
    """The body as a dict; APIError(400) for anything that is not a plain JSON object."""
    try:
        body = json.loads(raw or b"null", parse_constant=_constant, parse_float=_float)
    except RecursionError:
        raise APIError(400, f"the request body nests arrays/objects deeper than "
                            f"{MAX_JSON_DEPTH} levels") from None
    except _NotFinite as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    check(body)
    return body


def _bad_text(s: str) -> bool:
    return not s.isascii() and _SURROGATE.search(s) is not None


def check(body) -> None:
    """Depth and text of a parsed body (iterative: no recursion to exhaust)."""
    stack = [(body, "", 1)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"{path or 'the body'}: nested deeper than {MAX_JSON_DEPTH} "
                                "levels", param=path or None)
        if isinstance(node, dict):
            items = node.items()
        else:
            items = enumerate(node)
        for key, value in items:
            if isinstance(key, str):
                where = f"{path}.{key}" if path else key
                if _bad_text(key):
                    raise APIError(400, f"{path or 'the body'}: a key holds a lone UTF-16 "
                                        "surrogate (not valid Unicode text)",
                                   param=path or None)
            else:
                where = f"{path}[{key}]"
            if isinstance(value, str):
                if _bad_text(value):
                    raise APIError(400, f"{where}: the text holds a lone UTF-16 surrogate "
                                        "(e.g. \\ud800), which is not valid Unicode",
                                   param=where)
            elif isinstance(value, (dict, list)):
                stack.append((value, where, depth + 1))
