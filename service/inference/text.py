"""Text out of tokens: the incremental detokenizer and the stop-sequence scanner.

Both sit between the model's token ids and what a client reads, and both hold text back on purpose:
the detokenizer until a UTF-8 character is whole, the scanner until no stop sequence can begin in
it. Pure Python over a tokenizer's `decode`, so they are tested without a model.
"""

from __future__ import annotations

from typing import Any


class StopScanner:
    """Cuts the text at the first stop sequence, holding back what might be the start of one.

    Text is released only once no stop sequence can begin in it, so a client never sees part of a
    stop sequence that is then withdrawn.
    """

    def __init__(self, stops: tuple[str, ...]):
        self._stops = [s for s in stops if s]
        self._text = ""
        self._released = 0
        self.hit = False

    def push(self, delta: str) -> str:
        if not self._stops:
            return delta
        self._text += delta
        longest = max(len(s) for s in self._stops)
        start = max(0, self._released - longest + 1)
        found = [i for i in (self._text.find(s, start) for s in self._stops) if i >= 0]
        if found:
            self.hit = True
            end = min(found)
        else:
            end = len(self._text)
            for s in self._stops:
                for k in range(min(len(s) - 1, len(self._text)), 0, -1):
                    if self._text.endswith(s[:k]):
                        end = min(end, len(self._text) - k)
                        break
        out = self._text[self._released : max(end, self._released)]
        self._released = max(end, self._released)
        return out

    def flush(self) -> str:
        """At the end, a held-back tail that never became a stop sequence is released."""
        if self.hit or not self._stops:
            return ""
        out = self._text[self._released :]
        self._released = len(self._text)
        return out


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting a UTF-8 character.

    Byte-level BPE tokens can end in the middle of a multi-byte character; decoding such a prefix gives
    U+FFFD, so a delta is only released once the text decodes cleanly. Only a short window of ids is
    decoded each step, keeping the cost per token constant.
    """

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back when generation ends (an incomplete character shows as U+FFFD)."""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return after[len(before) :]
