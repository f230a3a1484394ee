"""From a chat (or a raw prompt) to prompt token ids, inside the HTTP worker.

Rendering and tokenizing here, before any byte of the response is sent, is what lets a bad
streaming request get a 4xx and lets `count_tokens` equal a real request's prompt count.
Chat templates are Jinja run in `ImmutableSandboxedEnvironment` (a template comes from a
checkpoint or from the request, so it is untrusted), with the globals Hugging Face
templates expect (`raise_exception`, `strftime_now`, a non-ASCII-escaping `tojson`).
The sandbox stops what a template may touch, not what it may cost, so a render is also
bounded (serving/http/limits.py): every string or list that `*`, `+`, `%`, `~`, a filter
or a method builds, the integers given to filters and methods, the output, and the wall
time (a line tracer on the template's own frames, so loops of any shape stop).
No JAX here: the tokenizer is `checkpoints.tokenizer.load_tokenizer(model_dir)`.
"""

from __future__ import annotations

import datetime
import functools
import json
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache

import jinja2
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from serving.http.errors import APIError, bad_request
from serving.http.limits import (MAX_RENDER_CHARS, MAX_RENDER_SECONDS, MAX_TEMPLATE_CHARS,
                                 MAX_TEMPLATE_INT)


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False, separators=None):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys,
                      separators=separators)


class TemplateLimit(SecurityError):
    """A render went past one of the limits (a 400, like any sandbox refusal)."""


def _sized(value):
    """`value`, unless it is a string or sequence longer than the render limit."""
    if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > MAX_RENDER_CHARS:
        raise TemplateLimit(f"a value of {len(value)} items/characters exceeds the template "
                            f"limit of {MAX_RENDER_CHARS}")
    return value


def _small_ints(args, kwargs) -> None:
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_TEMPLATE_INT:
            raise TemplateLimit(f"an argument of {v} exceeds the template limit of "
                                f"{MAX_TEMPLATE_INT}")


def _limited(fn):
    """A filter or global with bounded integer arguments and result size."""
    skip = 2 if getattr(fn, "jinja_pass_arg", None) is not None else 1   # (context,) value

    @functools.wraps(fn)     # keeps jinja's pass_context / pass_environment marks
    def wrapper(*args, **kwargs):
        _small_ints(args[skip:], kwargs)
        return _sized(fn(*args, **kwargs))
    return wrapper


class _BoundedCodeGenerator(CodeGenerator):
    """`a ~ b` goes through the environment, so its result is bounded too."""

    def visit_Concat(self, node, frame) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "+", "%", "**"})

    @staticmethod
    def bounded_concat(values) -> str:
        return _sized("".join(map(str, values)))

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and \
                        len(seq) * max(n, 0) > MAX_RENDER_CHARS:
                    raise TemplateLimit(f"{len(seq)} * {n} exceeds the template limit of "
                                        f"{MAX_RENDER_CHARS}")
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64 and \
                isinstance(left, (int, float)) and abs(left) > 1:
            raise TemplateLimit(f"an exponent of {right} exceeds the template limit of 64")
        return _sized(super().call_binop(context, operator, left, right))

    def call(self, context, obj, /, *args, **kwargs):
        _small_ints(args, kwargs)
        return _sized(super().call(context, obj, *args, **kwargs))


def render_bounded(template: jinja2.Template, **context) -> str:
    """`template.render(**context)` within MAX_RENDER_CHARS and MAX_RENDER_SECONDS."""
    deadline = time.monotonic() + MAX_RENDER_SECONDS

    def on_line(frame, event, arg):
        if event == "line" and time.monotonic() > deadline:
            raise TemplateLimit(f"rendering took longer than {MAX_RENDER_SECONDS:g} s")
        return on_line

    def on_call(frame, event, arg):   # trace only the template's own code
        return on_line if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        out, size = [], 0
        for chunk in template.generate(**context):
            size += len(chunk)
            if size > MAX_RENDER_CHARS:
                raise TemplateLimit(f"the rendered prompt exceeds {MAX_RENDER_CHARS} "
                                    "characters")
            out.append(chunk)
    finally:
        sys.settrace(previous)
    return "".join(out)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True,
                              extensions=["jinja2.ext.loopcontrols"])
    env.filters = {name: _limited(f) for name, f in env.filters.items()}
    env.filters["tojson"] = _limited(_tojson)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


def check_template(source: str, where: str) -> None:
    """A ValueError naming `where` when `source` is not a Jinja template."""
    try:
        _compile(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"{where}: chat template syntax error: {e}") from None


@dataclass
class ChatOptions:
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None          # overrides the model's template
    chat_template_kwargs: dict = field(default_factory=dict)
    documents: list | None = None
    tools: list | None = None


def render_chat(template: str | None, messages: list[dict], options: ChatOptions,
                bos_token: str = "", eos_token: str = "") -> str:
    """The prompt text of `messages`; a template error is a 400 (the template or the chat
    is at fault, not the server)."""
    source = options.chat_template or template
    if not source:
        raise bad_request("this model has no chat template; pass `chat_template`, or use "
                          "/v1/completions with a raw prompt", "chat_template")
    if options.continue_final_message and options.add_generation_prompt:
        raise bad_request("continue_final_message and add_generation_prompt cannot both be "
                          "true", "continue_final_message")
    if options.continue_final_message and (not messages or messages[-1]["role"] != "assistant"):
        raise bad_request("continue_final_message needs a final assistant message",
                          "continue_final_message")
    which = ("the request's chat_template" if options.chat_template else
             "the model's chat template")
    if options.chat_template and len(options.chat_template) > MAX_TEMPLATE_CHARS:
        raise bad_request(f"chat_template: at most {MAX_TEMPLATE_CHARS} characters, got "
                          f"{len(options.chat_template)}", "chat_template")
    reserved = {"messages", "add_generation_prompt", "bos_token", "eos_token"}
    clash = sorted(reserved & set(options.chat_template_kwargs))
    if clash:
        raise bad_request(f"chat_template_kwargs may not set {', '.join(clash)}",
                          "chat_template_kwargs")
    try:
        text = render_bounded(
            _compile(source),
            **{"tools": options.tools, "documents": options.documents,
               **options.chat_template_kwargs},
            messages=messages, add_generation_prompt=options.add_generation_prompt,
            bos_token=bos_token, eos_token=eos_token)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise bad_request(f"{which}: syntax error: {e}", "chat_template") from None
    except jinja2.exceptions.SecurityError as e:
        raise bad_request(f"{which}: refused by the sandbox: {e}", "chat_template") from None
    except (jinja2.exceptions.TemplateError, TypeError, ValueError, AttributeError,
            KeyError, IndexError, OverflowError, RecursionError, MemoryError) as e:
        raise bad_request(f"{which} failed on these messages: {e}", "messages") from None
    if options.continue_final_message:
        final = messages[-1].get("content") or ""
        cut = text.rfind(final) if final else -1
        text = text[:cut + len(final)] if cut >= 0 else text.rstrip()
    return text


class PromptTokenizer:
    """The model's tokenizer as the HTTP worker uses it: encode, decode, token text."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.chat_template: str | None = getattr(tokenizer, "chat_template", None)
        self.bos_token: str = getattr(tokenizer, "bos_token", None) or ""
        self.eos_token: str = getattr(tokenizer, "eos_token", None) or ""
        self.vocab_size: int | None = getattr(tokenizer, "vocab_size", None)
        # Texts of the special tokens decode(skip_special_tokens=True) drops, and of all.
        skip = sorted(getattr(tokenizer, "skip_ids", ()) or ())
        special = sorted(getattr(tokenizer, "special_ids", ()) or skip)
        self.skip_texts = tuple(t for t in (self._piece(i) for i in skip) if t)
        self.special_texts = frozenset(t for t in (self._piece(i) for i in special) if t)

    def _piece(self, token_id: int) -> str:
        try:
            return self.tok.decode([token_id], skip_special_tokens=False)
        except (ValueError, IndexError, KeyError):
            return ""

    def single_token(self, text: str) -> int | None:
        """The id of `text` when it is one special token of this vocabulary."""
        if text not in self.special_texts:
            return None
        ids = self.encode(text, add_special_tokens=False)
        return ids[0] if len(ids) == 1 else None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return [int(i) for i in self.tok.encode(text, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        return self.tok.token_bytes(token_id)


def load_prompt_tokenizer(model_dir: str) -> PromptTokenizer:
    from checkpoints.tokenizer import load_tokenizer
    return PromptTokenizer(load_tokenizer(model_dir))


@dataclass
class FittedPrompt:
    text: str
    ids: list[int]
    compacted_tokens: int = 0       # tokens of dropped turns (auto_compact), else 0
    dropped_messages: int = 0


def _drop_groups(messages: list[dict]) -> list[tuple[int, int]]:
    """The turns auto_compact drops, oldest first, as [start, end) index ranges: each
    non-system turn but the last, with the tool results that follow it."""
    groups, i, last = [], 0, len(messages) - 1
    while i < last:
        if messages[i].get("role") == "system":
            i += 1
            continue
        j = i + 1
        while j < last and messages[j].get("role") == "tool":
            j += 1
        groups.append((i, j))
        i = j
    return groups


def fit_chat(encode_chat, messages: list[dict], max_tokens: int | None,
             max_model_len: int | None, auto_compact: bool) -> FittedPrompt:
    """Render + tokenize `messages` (via `encode_chat(messages) -> (text, ids)`); over the
    context it is a 400 `context_length_exceeded`, unless `auto_compact` drops the oldest
    non-system turns (a tool result goes with the call before it) until it fits."""
    text, ids = encode_chat(messages)
    first = len(ids)

    def fits(n: int) -> bool:
        return max_model_len is None or (n < max_model_len and (
            max_tokens is None or n + max_tokens <= max_model_len))

    if not auto_compact or fits(len(ids)):
        return FittedPrompt(text, ids)
    # Binary search on how many of the oldest turns to drop (fewer turns, fewer tokens):
    # O(log n) renders, not one per dropped turn (2000 short turns took 25 s that way).
    groups = _drop_groups(messages)
    if not groups:
        return FittedPrompt(text, ids)
    tried: dict[int, tuple[str, list[int]]] = {}

    def attempt(k: int) -> tuple[str, list[int]]:
        if k not in tried:
            gone = {i for a, b in groups[:k] for i in range(a, b)}
            tried[k] = encode_chat([m for i, m in enumerate(messages) if i not in gone])
        return tried[k]

    k = len(groups)                    # all dropped and still too long: as it is
    if fits(len(attempt(k)[1])):
        lo, hi = 0, k                  # dropping lo does not fit, dropping hi does
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(len(attempt(mid)[1])) else (mid, hi)
        k = hi
    text, ids = attempt(k)
    dropped = sum(j - i for i, j in groups[:k])
    return FittedPrompt(text, ids, first - len(ids) if dropped else 0, dropped)


def truncate(ids: list[int], keep_last: int | None) -> list[int]:
    """`truncate_prompt_tokens`: keep the last N tokens (asked for, never silent)."""
    if keep_last is None or len(ids) <= keep_last:
        return ids
    return ids[-keep_last:]


def check_context(prompt_len: int, max_tokens: int | None, max_model_len: int | None,
                  param: str = "messages") -> None:
    if prompt_len == 0:
        raise bad_request("the prompt is empty", param)
    if max_model_len is None:
        return
    if prompt_len >= max_model_len:
        raise APIError(400, f"the prompt is {prompt_len} tokens, the model's context is "
                            f"{max_model_len}; shorten it or set truncate_prompt_tokens",
                       param=param, code="context_length_exceeded")
    if max_tokens is not None and prompt_len + max_tokens > max_model_len:
        raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) "
                            f"exceeds the model's context of {max_model_len}",
                       param="max_tokens", code="context_length_exceeded")


def template_kwargs(body: dict) -> tuple[dict, bool]:
    """A request's `chat_template_kwargs` (a copy) and its `auto_compact` flag, which is
    ours, not the template's (both protocols)."""
    kwargs = body.get("chat_template_kwargs")
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, dict):
        raise bad_request("`chat_template_kwargs` must be an object", "chat_template_kwargs")
    kwargs = dict(kwargs)
    compact = kwargs.pop("auto_compact", False)
    if not isinstance(compact, bool):
        raise bad_request("`chat_template_kwargs.auto_compact` must be a boolean",
                          "chat_template_kwargs.auto_compact")
    return kwargs, compact
