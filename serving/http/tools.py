"""Tools on the request side: validated tool specs, and grammars that force a call.

Both protocols' tool lists become `ToolSpec`s (name, description, JSON-schema parameters);
the chat template sees them in the Hugging Face convention (`{"type": "function",
"function": {...}}`). A forced call (OpenAI `tool_choice: required` or a named tool,
Anthropic `any` or `tool`) is a `guided_grammar` in llguidance's Lark syntax:
`<tool_call>` + a JSON object {"name": const, "arguments": that tool's parameters} +
`</tool_call>`, an alternation over the allowed tools, repeated when parallel calls are
allowed. So even a tiny model emits a call that parses and whose arguments validate.
The tool's schema is embedded as the `arguments` property of the call object, so its
`$defs` / `definitions` are hoisted to the root and its local `$ref`s rewritten (nested
pydantic models refer to `#/$defs/...`), and the JSON has a fixed layout (`", "` and
`": "`, no free whitespace: a model cannot spend its tokens on blanks inside a call).
Schemas (tool parameters, response formats) are checked here, so a bad one is a 400
naming its field before anything reaches the engine.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from serving.http.errors import bad_request

MAX_PARALLEL = 8           # calls one forced turn may hold (a bound, so a model cannot loop)
NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass
class ToolSpec:
    name: str
    description: str | None
    parameters: dict

    def for_template(self) -> dict:
        fn = {"name": self.name, "parameters": self.parameters}
        if self.description:
            fn = {"name": self.name, "description": self.description,
                  "parameters": self.parameters}
        return {"type": "function", "function": fn}


def check_schema(schema, param: str) -> dict:
    """A JSON schema (an object, valid under its own draft's meta-schema)."""
    import jsonschema
    if not isinstance(schema, dict):
        raise bad_request(f"{param} must be a JSON schema (an object)", param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.exceptions.SchemaError as e:
        raise bad_request(f"{param} is not a valid JSON schema: {e.message}", param) from None
    return schema


def _spec(name, description, parameters, where: str, params_field: str) -> ToolSpec:
    if not isinstance(name, str) or not NAME.match(name):
        raise bad_request("a tool needs a `name` of 1-64 letters, digits, '_', '.' or '-', "
                          f"got {name!r}", f"{where}.name")
    if description is not None and not isinstance(description, str):
        raise bad_request("`description` must be a string", f"{where}.description")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    check_schema(parameters, f"{where}.{params_field}")
    return ToolSpec(name, description, parameters)


def _unique(specs: list[ToolSpec], param: str) -> list[ToolSpec]:
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise bad_request(f"tool names must be unique; {dup[0]!r} appears twice", param)
    return specs


def openai_tools(tools) -> list[ToolSpec]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise bad_request("`tools` must be a list", "tools")
    specs = []
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            raise bad_request("a tool must be {\"type\": \"function\", \"function\": {...}}",
                              f"{where}.type")
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise bad_request("a tool needs a `function` object", f"{where}.function")
        strict = fn.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise bad_request("`strict` must be a boolean", f"{where}.function.strict")
        specs.append(_spec(fn.get("name"), fn.get("description"), fn.get("parameters"),
                           f"{where}.function", "parameters"))
    return _unique(specs, "tools")


def anthropic_tools(tools) -> list[ToolSpec]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise bad_request("tools: must be a list", "tools")
    specs = []
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict):
            raise bad_request(f"{where}: a tool must be an object", where)
        kind = t.get("type")
        if kind not in (None, "custom"):
            raise bad_request(f"{where}.type: server tools ({kind!r}) are not supported; "
                              "give custom tools with `input_schema`", f"{where}.type")
        if "input_schema" not in t:
            raise bad_request(f"{where}.input_schema: required", f"{where}.input_schema")
        specs.append(_spec(t.get("name"), t.get("description"), t.get("input_schema"),
                           where, "input_schema"))
    return _unique(specs, "tools")


def _literal(text: str, special: set[str]) -> str:
    """A marker as a grammar item: the special token itself when the vocabulary has it."""
    return text if text in special else json.dumps(text)


# llguidance's JSON options: the layout of json.dumps, nothing else between the tokens
CALL_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_DEFS = ("$defs", "definitions")


def _rebase(node, prefix: str, defs: dict[str, set[str]]):
    """`node` with its local `$ref`s valid once it sits at `prefix` inside another schema:
    refs to hoisted definitions stay as they are, every other local ref gets the prefix."""
    if isinstance(node, list):
        return [_rebase(x, prefix, defs) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k == "$ref" and isinstance(v, str) and v.startswith("#"):
            parts = v[1:].split("/")
            hoisted = len(parts) >= 3 and parts[0] == "" and parts[2] in defs.get(parts[1], ())
            out[k] = v if hoisted else "#" + prefix + v[1:]
        else:
            out[k] = _rebase(v, prefix, defs)
    return out


def embed_schema(schema: dict, prefix: str) -> tuple[dict, dict]:
    """(the schema to place at JSON pointer `prefix`, the definitions to put at the root).

    `$defs` and `definitions` move to the root (their pointers keep resolving), other local
    refs (`#`, `#/properties/x`) are rebased under `prefix`; `$schema` / `$id` are dropped
    (only a root may carry them)."""
    defs = {k: schema[k] for k in _DEFS if isinstance(schema.get(k), dict)}
    names = {k: set(v) for k, v in defs.items()}
    body = {k: v for k, v in schema.items() if k not in _DEFS and k not in ("$schema", "$id")}
    return (_rebase(body, prefix, names),
            {k: _rebase(v, prefix, names) for k, v in defs.items()})


def call_object_schema(spec: ToolSpec) -> dict:
    """The JSON schema of one call: {"name": const, "arguments": the tool's parameters}."""
    arguments, defs = embed_schema(spec.parameters, "/properties/arguments")
    return {"x-guidance": CALL_JSON_LAYOUT, "type": "object",
            "properties": {"name": {"const": spec.name}, "arguments": arguments},
            "required": ["name", "arguments"], "additionalProperties": False, **defs}


def call_grammar(specs: list[ToolSpec], parallel: bool, special: set[str]) -> str:
    """An llguidance Lark grammar: one (or, `parallel`, one or more) forced tool calls."""
    open_, close = _literal("<tool_call>", special), _literal("</tool_call>", special)
    repeat = f' ("\\n" call){{0,{MAX_PARALLEL - 1}}}' if parallel else ""
    lines = [f"start: call{repeat}",
             "call: " + " | ".join(f"call_{i}" for i in range(len(specs)))]
    for i, s in enumerate(specs):
        lines.append(f'call_{i}: {open_} "\\n" body_{i} "\\n" {close}')
        lines.append(f"body_{i}: %json {json.dumps(call_object_schema(s))}")
    return "\n".join(lines) + "\n"
