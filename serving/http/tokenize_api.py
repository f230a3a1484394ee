"""vLLM's `/tokenize`, `/detokenize` and `/version`, on the worker's own tokenizer.

Harnesses use them to count and align tokens without generating. A chat body is rendered
by the same `parse_chat` as a real request (template, tools, kwargs), so its count equals
the `prompt_tokens` that request would report; a `prompt` is encoded as
`/v1/completions` encodes it. Nothing here reaches the engine.
"""

from __future__ import annotations

from serving.http.errors import bad_request
from serving.http.generation import ModelInfo

PROMPT_FIELDS = {"model", "prompt", "add_special_tokens", "return_token_strs"}
CHAT_FIELDS = {"model", "messages", "add_generation_prompt", "continue_final_message",
               "add_special_tokens", "chat_template", "chat_template_kwargs", "tools",
               "documents", "return_token_strs", "reasoning_effort"}


def _flag(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, default)
    if not isinstance(v, bool):
        raise bad_request(f"`{name}` must be a boolean, got {v!r}", name)
    return v


def _check(body: dict, known: set[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise bad_request(f"unknown field `{unknown[0]}`", unknown[0])


def tokenize(body: dict, info: ModelInfo) -> dict:
    from serving.http import openai_chat_request

    tok = info.tokenizer
    if "messages" in body:
        _check(body, CHAT_FIELDS)
        chat = {k: v for k, v in body.items() if k != "return_token_strs"}
        ids = openai_chat_request.parse_chat(chat, info).requests[0].prompt_ids
    else:
        _check(body, PROMPT_FIELDS)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise bad_request("`prompt` must be a string (or send `messages`)", "prompt")
        info.resolve(body.get("model"))
        ids = tok.encode(prompt, add_special_tokens=_flag(body, "add_special_tokens", True))
    out = {"count": len(ids), "max_model_len": info.max_model_len, "tokens": list(ids)}
    if _flag(body, "return_token_strs", False):
        out["token_strs"] = [tok.decode([t], skip_special_tokens=False) for t in ids]
    return out


def detokenize(body: dict, info: ModelInfo) -> dict:
    _check(body, {"model", "tokens"})
    info.resolve(body.get("model"))
    ids = body.get("tokens")
    vocab = info.tokenizer.vocab_size
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                            for t in ids):
        raise bad_request("`tokens` must be a list of token ids", "tokens")
    bad = [t for t in ids if t < 0 or (vocab is not None and t >= vocab)]
    if bad:
        raise bad_request(f"token ids {bad[:5]} are outside the vocabulary", "tokens")
    return {"prompt": info.tokenizer.decode(ids, skip_special_tokens=False)}


def version() -> dict:
    from importlib.metadata import PackageNotFoundError, version as dist_version
    try:
        return {"version": dist_version("flaxserve")}
    except PackageNotFoundError:
        return {"version": "0.0.0+local"}


def tokenizer_info(info: ModelInfo) -> dict:
    """vLLM's GET /tokenizer_info (what lm-evaluation-harness's remote tokenizer reads)."""
    tok = info.tokenizer
    return {"tokenizer_class": type(getattr(tok, "tok", tok)).__name__,
            "bos_token": tok.bos_token or None, "eos_token": tok.eos_token or None,
            "pad_token": None, "model_max_length": info.max_model_len,
            "vocab_size": tok.vocab_size, "chat_template": tok.chat_template}
