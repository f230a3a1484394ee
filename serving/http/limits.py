"""The front end's cost limits, in one place (docs/reliability.md, "Limits and validation").

Each bounds what one request can make a worker spend before the engine sees it: bytes
read, JSON parsed, prompts sent, stop strings matched, template output rendered. Sampling
fields are bounded in `sampling/params.py` (its BOUNDS table), which the engine applies
too; the stop-string counts of the OpenAI routes live next to their parsers in
`serving/http/openai_fields.py` (MAX_STOP, MAX_STOP_COMPLETIONS) and must stay within
`sampling.params.MAX_STOP_STRINGS`.
"""

from __future__ import annotations

MAX_BODY_BYTES = 8 * 1024 * 1024       # a request body; larger is a 413
MAX_JSON_DEPTH = 64                    # nesting of arrays and objects in a body
MAX_PROMPTS = 64                       # prompts in one /v1/completions request
MAX_STOP_SEQUENCES = 128               # Anthropic stop_sequences (= MAX_STOP_STRINGS)
MAX_STOP_CHARS = 1024                  # characters per stop string, every route

# Chat templates (the model's or a request's `chat_template`), rendered in the worker:
MAX_TEMPLATE_CHARS = 64 * 1024         # a request's `chat_template` source
MAX_RENDER_CHARS = 4 * 1024 * 1024     # rendered prompt text, and any one string built
MAX_RENDER_SECONDS = 2.0               # wall time of one render
MAX_TEMPLATE_INT = 1_000_000           # an integer argument to a filter or method
