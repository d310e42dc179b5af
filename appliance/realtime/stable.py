"""Early, stable text from a model that is not a streaming one: local agreement over successive passes.

While a turn is open, Whisper transcribes the growing audio again and again. Each pass gives a
hypothesis; the words two successive passes agree on (the same characters, punctuation included) are
stable, and only those go out as deltas, so no word is ever taken back. The last word of each pass is
never taken: the audio may end inside it, and Whisper often changes its punctuation when more follows.
(LocalAgreement-2, as in whisper_streaming and WhisperLive.)

At the end of the turn the final pass decides: it is the same transcription an upload of the turn's
audio gets, and the last delta is whatever it adds to the text already sent.
"""

from __future__ import annotations

import re

# A word with the whitespace before it: joining a text's pieces gives the text back exactly.
_PIECE = re.compile(r"\s*\S+")


def pieces(text: str) -> list[str]:
    return _PIECE.findall(text)


class StablePrefix:
    """The text already sent for a turn, and the previous pass's hypothesis."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self._previous: list[str] | None = None

    @property
    def text(self) -> str:
        return "".join(self.sent)

    def update(self, hypothesis: str) -> str:
        """The delta this pass makes stable ("" when none)."""
        current = pieces(hypothesis)
        previous, self._previous = self._previous, current
        if previous is None:
            return ""
        agreed = _common_prefix(previous[:-1], current[:-1])
        if len(agreed) <= len(self.sent) or agreed[: len(self.sent)] != self.sent:
            return ""  # nothing new, or the passes have left what was sent: wait for them to come back
        new = agreed[len(self.sent) :]
        self.sent = agreed
        return self._delta(new)

    def finish(self, final: str) -> str | None:
        """The last delta, given the final transcript; None when the final pass reads an already-sent
        word differently (then the completed event's transcript is the one to show)."""
        sent = self.text
        if not final.startswith(sent):
            return None
        rest = final[len(sent) :]
        return rest if sent else rest.lstrip()

    def _delta(self, new: list[str]) -> str:
        text = "".join(new)
        return text if len(self.sent) > len(new) else text.lstrip()


def _common_prefix(a: list[str], b: list[str]) -> list[str]:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return a[:n]
