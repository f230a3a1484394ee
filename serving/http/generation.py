"""What the protocol layers and the engine link exchange, independent of gRPC.

`GenRequest` goes down (prompt ids + validated `SamplingParams`); a generation comes back
as `Delta`s (per sample `index`: new text, the tokens behind it with their logprobs, and
at the end a finish reason) followed by one `Final` with usage. The OpenAI and Anthropic
builders only see these, so they are unit-testable without a server.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sampling.params import SamplingParams


@dataclass
class GenRequest:
    request_id: str
    model: str
    prompt_ids: list[int]
    sampling: SamplingParams
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    deadline_s: float | None = None
    # docs/research.md: paired variants (objects of SamplingParams fields over `sampling`;
    # the samples come back as index i*n + j) and activation steering entries
    variants: list | None = None
    steering: list | None = None


@dataclass
class TopEntry:
    token: str
    logprob: float
    bytes: list[int] | None
    id: int | None = None         # the token id (vLLM's prompt_logprobs key)


@dataclass
class TokenInfo:
    id: int
    text: str                     # this token's share of the text (joins to the content)
    logprob: float | None = None
    bytes: list[int] | None = None
    top: list[TopEntry] = field(default_factory=list)
    rank: int | None = None       # 1 = the most likely token
    # logprobs_mode "unconstrained" / "all": raw_logprob, constrained_logprob,
    # unconstrained_logprob, removed_mass (docs/research.md)
    counterfactual: dict | None = None


@dataclass
class Delta:
    index: int                    # sample index (0 .. n-1)
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None   # "stop" | "length" | None while running
    stop_sequence: str | None = None   # the matched stop string, when one ended the sample
    metrics: dict | None = None        # variants: the sample's, on its final delta


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    gpu_seconds: float = 0.0
    # ran speculative decoding: method, num_tokens, draft_tokens, accepted_tokens,
    # verify_steps (serving/engine/spec_jobs.py)
    speculative: dict | None = None


@dataclass
class Final:
    usage: Usage
    seed: int | None = None
    prompt_logprobs: list[TokenInfo | None] | None = None


def floor_logprob(x: float | None) -> float:
    """JSON has no -inf: the OpenAI convention is -9999.0."""
    if x is None or x != x or x < -9999.0:
        return -9999.0
    return float(x)


@dataclass
class Choice:
    """One sample's whole output, accumulated from its deltas."""
    index: int
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None
    stop_sequence: str | None = None
    metrics: dict | None = None        # variants (sampling/variants.py)


def accumulate(events, n: int) -> tuple[list[Choice], Final]:
    """Drain a generation: the `n` choices and its `Final` (usage)."""
    choices = [Choice(i) for i in range(n)]
    final = None
    for ev in events:
        if isinstance(ev, Final):
            final = ev
            continue
        c = choices[ev.index]
        c.text += ev.text
        c.tokens.extend(ev.tokens)
        if ev.finish_reason is not None:
            c.finish_reason = ev.finish_reason
            c.stop_sequence = ev.stop_sequence
        if ev.metrics is not None:
            c.metrics = ev.metrics
    if final is None:
        raise RuntimeError("the engine's stream ended without usage")
    return choices, final


@dataclass
class ModelInfo:
    """What a worker knows about the served model: its names, tokenizer and context."""
    served_names: list[str]
    tokenizer: object             # serving.http.prompt.PromptTokenizer
    max_model_len: int | None = None
    created: int = 0
    vocab_size: int | None = None
    # --strict-max-tokens: prompt + max_tokens over the context is a 400 (OpenAI) instead of
    # max_tokens clamped to what the context leaves (Baseten, vLLM's default for None)
    strict_max_tokens: bool = False

    def resolve(self, name) -> str:
        """The model a request names; another name is a 404 model_not_found."""
        from serving.http.errors import APIError, bad_request
        if name is None:          # no model named: the one this server serves
            return self.served_names[0]
        if not isinstance(name, str) or not name:
            raise bad_request("`model` must be a non-empty string", "model")
        if name not in self.served_names:
            raise APIError(404, f"The model `{name}` does not exist; this server serves "
                                f"{', '.join(self.served_names)}", param="model",
                           code="model_not_found")
        return name
