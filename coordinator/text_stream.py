"""Incremental detokenization with stop strings: emit only text that can no longer change."""

from __future__ import annotations

from typing import Sequence


class TextStream:
    """Feed it the growing list of generated ids; it returns the new, settled text.

    Text is held back while it ends in an incomplete UTF-8 sequence (decoded as U+FFFD) or
    could still be the start of a stop string.
    """

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.emitted = 0

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def find_stop(self, text: str) -> int:
        """Index where the earliest stop string starts, or -1."""
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else -1

    def stop_cut(self, ids: Sequence[int], first_new: int) -> int | None:
        """If the text of `ids` contains a stop string, the number of ids up to the one that
        completes it (at least first_new + 1); otherwise None."""
        if not self.stop or self.find_stop(self.decode(ids)) < 0:
            return None
        for end in range(first_new + 1, len(ids) + 1):
            if self.find_stop(self.decode(ids[:end])) >= 0:
                return end
        return len(ids)

    def feed(self, ids: Sequence[int], final: bool) -> str:
        text = self.decode(ids)
        stop_at = self.find_stop(text)
        if stop_at >= 0:
            end = stop_at
        elif final:
            end = len(text)
        else:
            end = len(text) - self.hold
            while end > self.emitted and text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.emitted:
            return ""
        new, self.emitted = text[self.emitted : end], end
        return new
