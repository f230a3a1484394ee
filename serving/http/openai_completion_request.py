"""A legacy `/v1/completions` body -> `OpenAIPlan`: what only that route checks.

`prompt` (a string, strings, token ids or lists of them; one `GenRequest` each), `suffix`
(refused), `logprobs` as a count, `echo` (with `logprobs`: the scoring path, prompt-token
logprobs) and the default `max_tokens` of 16. The fields the routes share are checked in
openai_fields; the answer is shaped in openai_shapes. Pure functions: no Falcon, no gRPC.
"""

from __future__ import annotations

import secrets

from serving.http.errors import bad_request
from serving.http.generation import GenRequest, ModelInfo
from serving.http.limits import MAX_PROMPTS
from serving.http.openai_fields import (COMPLETION_FIELDS, GUIDED, MAX_LEGACY_LOGPROBS,
                                        MAX_STOP_COMPLETIONS, _bool, _check_known,
                                        _check_streamable, _detok_options, _is_int, _opt_int,
                                        _research, _response_format, _sampling, _stop,
                                        _stream_flags, _unsupported, fit_max_tokens)
from serving.http.openai_plan import OpenAIPlan
from serving.http.prompt import truncate
from serving.http import vllm_ext


def _prompts(prompt, tok, add_special: bool) -> tuple[list[list[int]], list[str]]:
    """Legacy `prompt`: a string, strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad_request("`prompt` must be a string, a list of strings, a list of token "
                          "ids or a list of such lists", "prompt")
    if all(_is_int(t) for t in prompt):
        prompt = [prompt]
    if len(prompt) > MAX_PROMPTS:
        raise bad_request(f"`prompt` takes at most {MAX_PROMPTS} prompts per request, got "
                          f"{len(prompt)}", "prompt")
    ids, texts = [], []
    for p in prompt:
        if isinstance(p, str):
            ids.append(tok.encode(p, add_special_tokens=add_special))
            texts.append(p)
        elif isinstance(p, list) and p and all(_is_int(t) for t in p):
            vocab = tok.vocab_size
            bad = [t for t in p if t < 0 or (vocab is not None and t >= vocab)]
            if bad:
                raise bad_request(f"token ids {bad[:5]} are outside the vocabulary", "prompt")
            ids.append(list(p))
            texts.append(tok.decode(p))
        else:
            raise bad_request("each prompt must be a string or a non-empty list of token ids",
                              "prompt")
    return ids, texts


def _echo_text(tok, ids: list[int], given: str) -> str:
    """The echoed prompt: as given, unless its tokens hold special tokens (a BOS the
    tokenizer added, `<|im_start|>` in token ids), whose text is then shown too, so that
    `text`, `tokens` and `text_offset` agree."""
    full = tok.decode(ids, skip_special_tokens=False)
    return given if full == tok.decode(ids, skip_special_tokens=True) else full


def parse_completion(body, info: ModelInfo, request_id: str | None = None) -> OpenAIPlan:
    body, ext = vllm_ext.translate(body)
    _check_known(body, COMPLETION_FIELDS)
    model = info.resolve(body.get("model"))
    _unsupported(body)
    guided = {**{g: body[g] for g in GUIDED if body.get(g) is not None},
              **_response_format(body)}
    if body.get("suffix") not in (None, ""):
        raise bad_request("`suffix` (insertion) is not supported", "suffix")
    stream, include_usage = _stream_flags(body)
    k = _opt_int(body, "logprobs", 0, MAX_LEGACY_LOGPROBS)
    echo = _bool(body, "echo", False)
    max_tokens = body.get("max_tokens", 16)
    if max_tokens is None:
        max_tokens = 16
    if not _is_int(max_tokens) or max_tokens < 1:
        raise bad_request(f"`max_tokens` must be an integer >= 1, got {max_tokens!r}",
                          "max_tokens")
    if echo and k is not None and stream:
        raise bad_request("`echo` with `logprobs` (prompt-token logprobs, the scoring path) "
                          "is answered without streaming; set stream to false", "echo")
    tok = info.tokenizer
    ids, texts = _prompts(body.get("prompt"), tok, _bool(body, "add_special_tokens", True))
    keep = _opt_int(body, "truncate_prompt_tokens", 1)
    ids = [truncate(p, keep) for p in ids]
    sampling = _sampling(body, {"max_tokens": max_tokens,
                                "stop": _stop(body, MAX_STOP_COMPLETIONS),
                                "logprobs": k is not None, "top_logprobs": k or 0,
                                **({"prompt_logprobs": k} if echo and k is not None else {}),
                                **guided},
                         tok.vocab_size, tok.encode)
    _check_streamable(stream, sampling)
    fitted = [fit_max_tokens(sampling, len(p), info, "prompt") for p in ids]
    rid = request_id or "cmpl-" + secrets.token_hex(12)
    detok = _detok_options(body)
    research = _research(body, sampling, tok.vocab_size, stream)
    reqs = [GenRequest(f"{rid}-{i}" if len(ids) > 1 else rid, model, p, fitted[i][0], **detok,
                       **research) for i, p in enumerate(ids)]
    if echo:   # the echoed prompt is its tokens' text, special tokens included, so that
        texts = [_echo_text(tok, p, t) for p, t in zip(ids, texts)]  # text_offset agrees
    return OpenAIPlan("completion", rid, model, reqs, texts, stream, include_usage,
                      k is not None, k or 0, echo, max_tokens=[m for _, m in fitted], vllm=ext)
