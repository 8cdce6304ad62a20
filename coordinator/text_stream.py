"""Incremental detokenization with stop strings: emit only text that can no longer change."""

from __future__ import annotations

from typing import Sequence

# Tokens decoded before the ones not yet settled, so that those read as they do in the whole text
# (a word's leading space, a character whose bytes span tokens, a tokenizer's clean-up of spaces).
CONTEXT_TOKENS = 8


class TextStream:
    """Feed it the growing list of generated ids; it returns the new, settled text.

    Text is held back while it ends in an incomplete UTF-8 sequence (decoded as U+FFFD) or
    could still be the start of a stop string.

    Each call decodes only the ids after the settled ones (whose text is sent and can no longer
    change), with CONTEXT_TOKENS before them, not the whole answer: a round's text costs the same
    at the 5,000th token as at the 5th.
    """

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.emitted = 0  # characters of the whole text sent
        self._settled = 0  # ids[:_settled] are settled: their text is the whole text's first _settled_chars
        self._settled_chars = 0
        self._head: tuple[int, str] | None = None  # _window's answer while _settled is _head_at
        self._head_at = -1

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def find_stop(self, text: str) -> int:
        """Index where the earliest stop string starts, or -1."""
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else -1

    def _window(self, ids: Sequence[int]) -> tuple[int, str]:
        """Where the decoding starts (an index into ids) and the text of the ids from there to the
        last settled one, whose characters the window's text begins with."""
        if self._head_at != self._settled:  # (settled ids never change: decoded once a mark)
            start = max(0, self._settled - CONTEXT_TOKENS)
            self._head, self._head_at = (start, self.decode(ids[start : self._settled])), self._settled
        return self._head

    def _rest(self, ids: Sequence[int], end: int | None = None) -> str | None:
        """The whole text of ids[:end] past its first _settled_chars characters, or None where the
        window does not read the settled ids as before (then the caller decodes everything)."""
        start, head = self._window(ids)
        text = self.decode(ids[start:end])
        return text[len(head) :] if text.startswith(head) else None

    def stop_cut(self, ids: Sequence[int], first_new: int) -> int | None:
        """If the text of `ids` contains a stop string, the number of ids up to the one that
        completes it (at least first_new + 1); otherwise None. A stop string cannot start in the
        settled text (it would have been found before that text was sent)."""
        if not self.stop or self.find_stop(self._whole_rest(ids)[1]) < 0:
            return None
        for end in range(first_new + 1, len(ids) + 1):
            rest = self._rest(ids, end)
            if self.find_stop(self.decode(ids[:end]) if rest is None else rest) >= 0:
                return end
        return len(ids)

    def _whole_rest(self, ids: Sequence[int]) -> tuple[int, str]:
        """(offset, rest): the whole text of ids is `offset` characters, then `rest`."""
        rest = self._rest(ids)
        if rest is None:  # never seen with the tokenizers tested; decoding everything is always right
            self._settled = self._settled_chars = 0
            return 0, self.decode(ids)
        return self._settled_chars, rest

    def feed(self, ids: Sequence[int], final: bool) -> str:
        offset, rest = self._whole_rest(ids)
        stop_at = self.find_stop(rest)
        if stop_at >= 0:
            end = offset + stop_at
        elif final:
            end = offset + len(rest)
        else:
            end = offset + len(rest) - self.hold
            while end > self.emitted and rest[end - offset - 1] == "\ufffd":
                end -= 1
        if end <= self.emitted:
            return ""
        new, self.emitted = rest[self.emitted - offset : end - offset], end
        self._settle(ids, rest)
        return new

    def _settle(self, ids: Sequence[int], rest: str) -> None:
        """Mark more ids settled, every CONTEXT_TOKENS new ones: up to CONTEXT_TOKENS from the end,
        or further back where text is held (a stop string's length), as far as their text is sent
        and ends on a whole character."""
        candidate = len(ids) - CONTEXT_TOKENS
        for _ in range(4):  # each try steps back at least as many tokens as characters were held
            if candidate < self._settled + CONTEXT_TOKENS:
                return
            text = self._rest(ids, candidate)
            if text is None or not rest.startswith(text) or text.endswith("\ufffd"):
                return
            held = self._settled_chars + len(text) - self.emitted
            if held <= 0:
                self._settled, self._settled_chars = candidate, self._settled_chars + len(text)
                return
            candidate -= held
