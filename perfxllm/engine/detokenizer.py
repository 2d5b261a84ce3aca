"""Incremental detokenization with stop strings.

Text is released as it is produced, except (1) an incomplete multi-byte character (the decoder shows it as
U+FFFD until its last byte arrives) and (2) a tail that could still grow into a stop string: neither is ever
emitted early. A stop string ends the output and is not part of it.

Output ids are decoded behind the last few prompt ids: SentencePiece decoders drop the leading space of a
text's first token, which would turn the answer " Paris" into "Paris".

Each token costs two decodes of a few ids, not one of all the ids so far. The text is that of the settled
ids (those up to the last point where the text ended on a whole character: later ids do not change it) plus
that of the ids after them, decoded behind the last settled stretch of ids, their context, for the same
reason as behind the prompt's tail. Where new ids do change the text before them (a byte-fallback run that
turns out invalid UTF-8), everything is decoded again from the prompt's tail.
"""

from __future__ import annotations

from perfxllm.model.tokenizer import Tokenizer


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: list[str], prompt_ids: list[int] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.longest_stop = max((len(s) for s in stop), default=0)
        self.prefix = list(prompt_ids[-4:])
        self.prefix_text = tokenizer.decode(self.prefix)
        if self.prefix_text.endswith("\ufffd"):  # the prompt ends inside a character: no clean boundary
            self.prefix, self.prefix_text = [], ""
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far, an incomplete last character left out
        self.emitted = 0  # characters of self.text already released
        self._full = ""  # everything decoded so far, an incomplete last character included
        self._restart()

    def _restart(self) -> None:
        """Decode all output ids behind the prompt's tail again, as after __init__."""
        # The window: the context ids, whose text is _context_text, then the ids not settled yet. _settled is
        # the text of the output ids before those.
        self._window = self.prefix + self.ids
        self._context_len, self._context_text = len(self.prefix), self.prefix_text
        self._settled, self._from_prompt = "", True

    def add(self, token_id: int) -> tuple[str, bool]:
        """Feed one token; returns (new text to release, whether a stop string was hit)."""
        self.ids.append(token_id)
        self._window.append(token_id)
        self._full = self._decode()
        # An incomplete last character waits for its other bytes; what comes before it is complete, and a
        # stop string in it must be found now (the generation may end with this token).
        text = self.text = self._full.rstrip("\ufffd")
        end, hit = self._releasable(text)
        if hit:
            self.text = text[:end]
        delta = text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(end, self.emitted)
        return delta, hit

    def _releasable(self, text: str) -> tuple[int, bool]:
        """(where the text that may be released ends, whether a stop string starts there)."""
        if not self.stop:
            return len(text), False
        search_from = max(0, self.emitted - self.longest_stop)
        hits = [i for i in (text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            return min(hits), True
        return len(text) - self._held_back(text), False

    def _decode(self) -> str:
        """What decoding the prompt's tail and all output ids at once gives, after the tail's own text."""
        window_text = self.tokenizer.decode(self._window)
        if window_text.startswith(self._context_text):
            text = self._settled + window_text[len(self._context_text) :]
            if not text.endswith("\ufffd"):
                self._settle(text)
            return text
        if not self._from_prompt:  # the new ids changed the text before them (an invalid byte-fallback run)
            self._restart()
            return self._decode()
        return self.tokenizer.decode(self.ids)

    def _settle(self, text: str) -> None:
        """The text ends on a whole character: the unsettled ids become the context of those after them, if
        they decode to something (special tokens or a lone space do not, and would lose a leading space)."""
        unsettled = self._window[self._context_len :]
        unsettled_text = self.tokenizer.decode(unsettled)
        if unsettled_text:
            self._from_prompt, self._settled, self._window = False, text, unsettled
            self._context_len, self._context_text = len(unsettled), unsettled_text

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        """At the end of generation for a reason other than a stop string: release what was held back."""
        delta = self._full[self.emitted :]
        self.text, self.emitted = self._full, len(self._full)
        return delta
