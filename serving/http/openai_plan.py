"""`OpenAIPlan`: an OpenAI request once validated, the one thing both halves share.

The request modules (openai_chat_request, openai_completion_request) build it from a body;
the route hands its `GenRequest`s to the engine and the shapes (openai_shapes) read it to
write the answer. Keeping it apart from both halves lets each import it without the other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from serving.http.chat_output import OutputSpec
from serving.http.generation import GenRequest
from serving.http import vllm_ext


@dataclass
class OpenAIPlan:
    kind: str                       # "chat" | "completion"
    request_id: str
    model: str
    requests: list[GenRequest]      # one per prompt (chat: exactly one)
    prompt_texts: list[str]
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    echo: bool
    echo_text: str = ""             # chat echo: the final assistant message, prepended
    output: OutputSpec = dataclasses.field(default_factory=OutputSpec)
    named_tool: bool = False        # tool_choice named one function: finish_reason "stop"
    compacted_tokens: int | None = None
    max_tokens: list = dataclasses.field(default_factory=list)   # effective, per prompt
    vllm: vllm_ext.VllmOptions = dataclasses.field(default_factory=vllm_ext.VllmOptions)
    stop_ids: frozenset = frozenset()   # chat: a final stop token has no logprobs entry

    @property
    def n(self) -> int:
        """Choices per prompt: n, times the number of variants when there are some."""
        r = self.requests[0]
        return r.sampling.n * (len(r.variants) if r.variants else 1)
