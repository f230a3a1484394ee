"""vLLM's request extensions on the OpenAI routes, as aliases of ours.

RL trainers and eval harnesses written against vLLM send fields the OpenAI API does not
have. Each maps onto something this server already does, so nothing here reaches the
engine by a new path:
- `structured_outputs: {json | regex | choice | grammar | json_object}` -> our guided_*;
- `return_token_ids: true` -> `prompt_token_ids` and per-choice `token_ids` in the body
  (and in streamed chunks);
- `prompt_logprobs: k` (already a sampling field: the engine scores the prompt once at
  admission) -> vLLM's shape: a list per prompt token, `None` first, then
  `{token_id: {logprob, rank, decoded_token}}` with the prompt's own token and its top k;
- `stream_options.continuous_usage_stats: true` -> usage (so far) on every chunk.
`translate` takes these off a request body before the OpenAI checks run (they stay
strict about everything else); the `*_extras` functions add the answers to a body.
"""

from __future__ import annotations

from dataclasses import dataclass

from serving.http.errors import bad_request
from serving.http.generation import Final, TokenInfo, floor_logprob

STRUCTURED = {"json": "guided_json", "regex": "guided_regex", "choice": "guided_choice",
              "grammar": "guided_grammar", "json_object": "guided_json_object"}
STREAM_OPTIONS = ("include_usage", "continuous_usage_stats", "include_obfuscation")


@dataclass
class VllmOptions:
    return_token_ids: bool = False
    prompt_logprobs: int | None = None
    continuous_usage: bool = False


def translate(body) -> tuple[dict, VllmOptions]:
    """(the body with vLLM's aliases replaced by our fields, what to add to the answer)."""
    if not isinstance(body, dict):
        return body, VllmOptions()
    body = dict(body)
    opts = VllmOptions()
    so = body.pop("structured_outputs", None)
    if so is not None:
        if not isinstance(so, dict):
            raise bad_request("`structured_outputs` must be an object with one of "
                              f"{', '.join(STRUCTURED)}", "structured_outputs")
        unknown = sorted(set(so) - set(STRUCTURED))
        if unknown:
            raise bad_request(f"`structured_outputs.{unknown[0]}` is not supported (supported: "
                              f"{', '.join(STRUCTURED)})", f"structured_outputs.{unknown[0]}")
        given = [k for k in STRUCTURED if so.get(k) not in (None, False)]
        if len(given) != 1:
            raise bad_request("`structured_outputs` takes exactly one of "
                              f"{', '.join(STRUCTURED)}", "structured_outputs")
        field = STRUCTURED[given[0]]
        if body.get(field) is not None:
            raise bad_request(f"`structured_outputs.{given[0]}` and `{field}` are the same "
                              "constraint; give one", "structured_outputs")
        body[field] = so[given[0]]
    rti = body.pop("return_token_ids", None)
    if rti is not None:
        if not isinstance(rti, bool):
            raise bad_request("`return_token_ids` must be a boolean", "return_token_ids")
        opts.return_token_ids = rti
    k = body.get("prompt_logprobs")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k < -1:
            raise bad_request(f"`prompt_logprobs` must be an integer >= 0, got {k!r}",
                              "prompt_logprobs")
        if k == -1:        # vLLM's "the whole vocabulary": more than JSON can carry here
            raise bad_request("`prompt_logprobs: -1` (every token) is not supported; give "
                              "k <= 20", "prompt_logprobs")
        opts.prompt_logprobs = k
    so_opts = body.get("stream_options")
    if isinstance(so_opts, dict) and "continuous_usage_stats" in so_opts:
        cus = so_opts["continuous_usage_stats"]
        if not isinstance(cus, bool):
            raise bad_request("`stream_options.continuous_usage_stats` must be a boolean",
                              "stream_options.continuous_usage_stats")
        opts.continuous_usage = cus
    return body, opts


def check_stream_options(opts: dict) -> None:
    unknown = sorted(set(opts) - set(STREAM_OPTIONS))
    if unknown:
        raise bad_request(f"unknown field `stream_options.{unknown[0]}` (known: "
                          f"{', '.join(STREAM_OPTIONS)})", f"stream_options.{unknown[0]}")
    for name in STREAM_OPTIONS:
        if name in opts and not isinstance(opts[name], bool):
            raise bad_request(f"`stream_options.{name}` must be a boolean",
                              f"stream_options.{name}")


def prompt_logprobs_body(prompt: list[TokenInfo] | None, k: int) -> list | None:
    """vLLM's prompt_logprobs: [None, {id: {logprob, rank, decoded_token}}, ...]."""
    if prompt is None:
        return None
    out: list = [None]
    for t in prompt[1:]:
        entry = {str(t.id): {"logprob": floor_logprob(t.logprob), "rank": t.rank,
                             "decoded_token": t.text}}
        for rank, e in enumerate(t.top[:k], start=1):
            if e.id is not None and str(e.id) not in entry:
                entry[str(e.id)] = {"logprob": floor_logprob(e.logprob), "rank": rank,
                                    "decoded_token": e.token}
        out.append(entry)
    return out


def chat_extras(opts: VllmOptions, body: dict, prompt_ids: list[int], choices,
                final: Final) -> dict:
    """Add the answers to a chat.completion body (non-streaming)."""
    if opts.return_token_ids:
        body["prompt_token_ids"] = list(prompt_ids)
        for out, c in zip(body["choices"], choices):
            out["token_ids"] = [t.id for t in c.tokens]
    if opts.prompt_logprobs is not None:
        body["prompt_logprobs"] = prompt_logprobs_body(final.prompt_logprobs,
                                                      opts.prompt_logprobs)
    return body


def completion_extras(opts: VllmOptions, body: dict, prompt_ids: list[list[int]],
                      results, n: int) -> dict:
    """Add the answers to a text_completion body (non-streaming); choice i*n+j is prompt
    i's sample j."""
    for p, (choices, final) in enumerate(results):
        for c in choices:
            out = body["choices"][p * n + c.index]
            if opts.return_token_ids:
                out["prompt_token_ids"] = list(prompt_ids[p])
                out["token_ids"] = [t.id for t in c.tokens]
            if opts.prompt_logprobs is not None:
                out["prompt_logprobs"] = prompt_logprobs_body(final.prompt_logprobs,
                                                             opts.prompt_logprobs)
    return body


class StreamExtras:
    """The streamed side: token ids on the chunks, usage so far, prompt logprobs at the end."""

    def __init__(self, opts: VllmOptions, prompt_tokens: int):
        self.opts = opts
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0

    def count(self, ev) -> None:
        self.completion_tokens += len(getattr(ev, "tokens", ()) or ())

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def decorate(self, chunk: dict, include_usage: bool) -> dict:
        if self.opts.continuous_usage and include_usage and chunk.get("choices"):
            chunk["usage"] = self.usage()
        return chunk

    def token_ids(self, choice: dict, ev) -> dict:
        if self.opts.return_token_ids:
            choice["token_ids"] = [t.id for t in ev.tokens]
        return choice

    def final_fields(self, final: Final) -> dict:
        """Fields for a last chunk (choices []), when any."""
        if self.opts.prompt_logprobs is None:
            return {}
        return {"prompt_logprobs": prompt_logprobs_body(final.prompt_logprobs,
                                                        self.opts.prompt_logprobs)}
