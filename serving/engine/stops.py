"""Stop strings over streamed text: hold back what may still become a stop, cut on a match.

Text arrives in pieces (one per token, from the incremental detokenizer). A stop string can
straddle pieces, so the tail of the text that is a prefix of some stop string is held back
until the next piece decides it. On a match the output ends at the match (or just after it
with `include_stop_str_in_output`); what follows is dropped. The earliest match in the text
wins, as in vLLM and the OpenAI API.
"""

from __future__ import annotations


class StopStrings:
    def __init__(self, stops: list[str], include_in_output: bool = False):
        self.stops = [s for s in stops if s]
        self.include = include_in_output
        self._held = ""
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        """The text that is safe to emit now; sets `matched` when a stop string appears."""
        if self.matched is not None:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        best: tuple[int, int, str] | None = None
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (best is None or (i, -len(s)) < (best[0], best[1])):
                best = (i, -len(s), s)
        if best is not None:
            i, _, s = best
            self.matched = s
            self._held = ""
            return buf[:i + len(s)] if self.include else buf[:i]
        hold = self._hold_length(buf)
        self._held = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold]

    def _hold_length(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), longest, -1):
                if buf.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def flush(self) -> str:
        """At the end of the sample (no more text comes): release what was held."""
        held, self._held = self._held, ""
        return "" if self.matched is not None else held
