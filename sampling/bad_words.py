"""`bad_words` as strings: each word becomes the token sequences the sampler bans.

vLLM's rule: a word is banned both at the start of the text and in the middle of it, so it
is tokenized twice, as `word` and as ` word` (leading space; the word's own leading
whitespace is stripped first), without special tokens, and each tokenization is banned as
a sequence (the sampler masks its last token whenever the output ends with the rest; a
one-token word is a plain -inf bias). vLLM keeps the spaced form only when it has the same
length as the bare one; here both are kept whenever they differ, so a word whose spaced
form splits differently (byte-level BPE) is banned in the middle of text too.

What is not banned: other tokenizations of the same text (e.g. a word spelled out piece
by piece), and the word glued inside a longer token. That is vLLM's behaviour as well.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from sampling.params import MAX_BAD_WORD_LEN, MAX_BAD_WORD_SEQUENCES, SamplingParams


def word_sequences(word: str, encode: Callable[[str], list[int]]) -> list[list[int]]:
    """The distinct tokenizations of `word` and ` word` (`encode` adds no special tokens)."""
    out: list[list[int]] = []
    bare = word.lstrip()
    for text in (bare, " " + bare):
        ids = [int(t) for t in encode(text)]
        if not ids:
            raise ValueError(f"bad_words: {word!r} tokenizes to nothing")
        if len(ids) > MAX_BAD_WORD_LEN:
            raise ValueError(f"bad_words: {text!r} is {len(ids)} tokens, at most "
                             f"{MAX_BAD_WORD_LEN}")
        if ids not in out:
            out.append(ids)
    return out


def resolve_bad_words(params: SamplingParams, encode: Callable[..., list[int]]
                      ) -> SamplingParams:
    """A copy of `params` with `bad_words` turned into `bad_words_ids` (appended to the
    ones given) and `bad_words` emptied. `encode(text, add_special_tokens=False)`."""
    if not params.bad_words:
        return params
    sequences = [list(w) for w in params.bad_words_ids]
    for word in params.bad_words:
        for ids in word_sequences(word, lambda t: encode(t, add_special_tokens=False)):
            if ids not in sequences:
                sequences.append(ids)
    if len(sequences) > MAX_BAD_WORD_SEQUENCES:
        raise ValueError(f"bad_words: {len(sequences)} banned sequences with bad_words_ids, "
                         f"at most {MAX_BAD_WORD_SEQUENCES}")
    return dataclasses.replace(params, bad_words_ids=sequences, bad_words=[])
