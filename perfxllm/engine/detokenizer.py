"""Incremental detokenization with stop strings.

Text is released as it is produced, except (1) an incomplete multi-byte character (the decoder shows it as
U+FFFD until its last byte arrives) and (2) a tail that could still grow into a stop string: neither is ever
emitted early. A stop string ends the output and is not part of it.

Output ids are decoded behind the last few prompt ids: SentencePiece decoders drop the leading space of a
text's first token, which would turn the answer " Paris" into "Paris".
"""

from __future__ import annotations

from perfxllm.model.tokenizer import Tokenizer


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: list[str], prompt_ids: list[int] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.prefix = list(prompt_ids[-4:])
        self.prefix_text = tokenizer.decode(self.prefix)
        if self.prefix_text.endswith("\ufffd"):  # the prompt ends inside a character: no clean boundary
            self.prefix, self.prefix_text = [], ""
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far
        self.emitted = 0  # characters of self.text already released

    def add(self, token_id: int) -> tuple[str, bool]:
        """Feed one token; returns (new text to release, whether a stop string was hit)."""
        self.ids.append(token_id)
        # An incomplete last character waits for its other bytes; what comes before it is complete, and a
        # stop string in it must be found now (the generation may end with this token).
        text = self._decode().rstrip("\ufffd")
        search_from = max(0, self.emitted - max((len(s) for s in self.stop), default=0))
        self.text = text
        hits = [i for i in (text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            end = min(hits)
            delta = text[self.emitted : end] if end > self.emitted else ""
            self.text, self.emitted = text[:end], max(end, self.emitted)
            return delta, True
        end = len(text) - self._held_back(text)
        delta = text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(end, self.emitted)
        return delta, False

    def _decode(self) -> str:
        text = self.tokenizer.decode(self.prefix + self.ids)
        if text.startswith(self.prefix_text):
            return text[len(self.prefix_text) :]
        return self.tokenizer.decode(self.ids)

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
        text = self._decode() if self.ids else self.text
        delta = text[self.emitted :]
        self.text, self.emitted = text, len(text)
        return delta
