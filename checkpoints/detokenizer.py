"""Streaming detokenization: one token in, only the new text out, never half a character.

A token can carry part of a UTF-8 character (byte-level BPE, sentencepiece byte fallback)
and a sentencepiece token's leading space depends on what precedes it, so decoding tokens
one by one is wrong and re-decoding the whole sequence each step is quadratic. As in vLLM
and transformers' TextStreamer, we decode a short window: the tokens of the last emitted
chunk (the context that fixes spaces) plus the tokens not yet emitted, and emit the part of
that text past the context once it no longer ends in U+FFFD (an incomplete character). The
chunks join to exactly `tokenizer.decode(ids)` (or, with a prompt, to
`decode(prompt + ids)[len(decode(prompt)):]`).
"""

from __future__ import annotations

from checkpoints.tokenizer import Tokenizer

PROMPT_CONTEXT = 5      # prompt tokens kept as the first window's context
MAX_HELD = 16           # a character spans at most 4 tokens; past this the bytes are invalid


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids=None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        ids = [int(i) for i in (prompt_ids or ())]
        if skip_special_tokens:
            ids = [i for i in ids if i not in tokenizer.skip_ids]
        self._window: list[int] = ids[-PROMPT_CONTEXT:]   # context + pending tokens
        self._read = len(self._window)                    # window[:_read] is context
        self._context_text = self._decode(self._window)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def add(self, token_id: int) -> str:
        """The text `token_id` completes ("" while a character is still incomplete)."""
        token_id = int(token_id)
        if self.skip_special_tokens and token_id in self.tokenizer.skip_ids:
            return ""                    # decode drops it: it changes neither text nor spacing
        self._window.append(token_id)
        text = self._decode(self._window)
        held = len(self._window) - self._read
        if len(text) <= len(self._context_text) or (text.endswith("\ufffd") and held < MAX_HELD):
            return ""
        return self._emit(text)

    def _emit(self, text: str) -> str:
        delta = text[len(self._context_text):]
        self._window = self._window[self._read:]          # the emitted tokens become context
        self._read = len(self._window)
        self._context_text = self._decode(self._window)
        return delta

    def flush(self) -> str:
        """Whatever is still held at the end (invalid bytes come out as U+FFFD)."""
        if self._read == len(self._window):
            return ""
        text = self._decode(self._window)
        if len(text) <= len(self._context_text):
            self._read = len(self._window)
            return ""
        return self._emit(text)
