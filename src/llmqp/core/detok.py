"""Incremental detokenizing with stop strings: each new piece of text is produced once, in O(new tokens).

Token ids become bytes (`tokenizer.token_bytes`, b"" for special tokens); an incremental UTF-8 decoder turns
them into text, holding back an incomplete multi-byte character until its last byte arrives, so a delta never
ends in half a character. Stop strings: text that could still grow into a stop string is held back; when one
matches, the text ends just before it and the request stops. The concatenation of every delta equals `text`.
"""

from __future__ import annotations

import codecs


class IncrementalDetokenizer:
    """Feed token ids with `add`; read deltas from its return value. Not thread-safe."""

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self._token_bytes = tokenizer.token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(stop or ())
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self.text = ""  # everything decoded so far (cut at a matched stop string)
        self._emitted = 0  # how much of `text` has been handed out
        self.stopped = False  # a stop string matched

    def add(self, token_ids) -> str:
        """Decode more tokens; returns the text delta that is safe to show now (may be "")."""
        if self.stopped:
            return ""
        piece = self._decoder.decode(b"".join(self._token_bytes(int(t)) for t in token_ids))
        if not piece:
            return ""
        search_from = max(0, len(self.text) - self._longest_stop + 1)
        self.text += piece
        if self._stop:
            hits = [i for i in (self.text.find(s, search_from) for s in self._stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self._take(len(self.text))
            return self._take(len(self.text) - self._held_back())
        return self._take(len(self.text))

    def finish(self) -> str:
        """The rest of the text at the end of the request (a held-back stop-string prefix, or bytes of an
        incomplete character, shown as U+FFFD as `bytes.decode(errors="replace")` would)."""
        if not self.stopped:
            self.text += self._decoder.decode(b"", final=True)
        return self._take(len(self.text))

    def _held_back(self) -> int:
        # The longest suffix of the text that is a proper prefix of a stop string may still become one.
        text = self.text
        for n in range(min(self._longest_stop - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0

    def _take(self, upto: int) -> str:
        upto = max(upto, self._emitted)
        delta = self.text[self._emitted : upto]
        self._emitted = upto
        return delta
