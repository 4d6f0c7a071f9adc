"""The generated text and when it ends: the decode thread's side of one generation, with its
constraint's matcher when it has one."""

from __future__ import annotations

from app.engine.request import (
    Done,
    Event,
    FinishReason,
    GenerationRequest,
    Logprobs,
    Scored,
    TextRun,
)
from app.runner import Top


class StopMatcher:
    """The generated text and when it ends: at ``max_new`` characters, or where a stop string
    first ends (the stop string is not kept). Characters that may be the start of a stop
    string are held back until that is clear, so a streamed text never contains one.

    A constrained generation also ends, with "stop", where its row drew "end" or its text is
    a complete match that cannot go on; ``constraint`` is its matcher, which the runner
    advances, and the final event says whether the text kept is a complete match."""

    def __init__(self, request: GenerationRequest):
        self.max_new = request.max_new
        self.stop = request.stop
        self.stream = request.stream
        self.chars: list[str] = []
        # Parallel to ``chars`` when the request asked for logprobs.
        self.logprobs: list[float] | None = [] if request.logprobs is not None else None
        self.top: list[Top] | None = [] if request.logprobs else None
        self.scored: Scored | None = None  # the prime's scores, set when its pass ends
        self.emitted = 0
        self.finished = False
        self._longest = max(map(len, self.stop), default=0)
        grammar = request.constraint
        self.constraint = grammar.matcher() if grammar is not None else None
        self._pushed = 0  # characters given to ``push``: what the matcher has consumed

    def __len__(self) -> int:
        return len(self.chars)

    def push(
        self,
        text: str,
        logprobs: list[float] | None = None,
        top: list[Top] | None = None,
        ended: bool = False,
    ) -> list[Event]:
        """Add generated characters (with their logprobs and alternatives, when asked for;
        ``ended``: a constrained row drew "end" after them); returns the events they
        release: the released run as one ``TextRun``, then the final event. Characters
        after the end are dropped."""
        if self.finished:
            return []
        before = len(self.chars)
        self._pushed += len(text)
        reason = self._append_until_stop(text) if self.stop else self._append(text)
        if ended or (self.constraint is not None and self.constraint.done):
            reason = "stop"  # the match is over, or the bans left no character
        self._keep_logprobs(before, logprobs, top)
        upto = len(self.chars)
        if reason is None and self.stop:
            upto -= self._held_back(self._tail())
        out: list[Event] = []
        if self.stream and upto > self.emitted:
            lps = self.logprobs[self.emitted : upto] if self.logprobs is not None else None
            top = self.top[self.emitted : upto] if self.top is not None else None
            out.append(TextRun(self.emitted, "".join(self.chars[self.emitted : upto]), lps, top))
        self.emitted = max(self.emitted, upto)
        if reason is not None:
            self.finished = True
            text = "".join(self.chars)
            lp, score = None, None
            if self.logprobs:
                score = sum(self.logprobs) / len(self.logprobs)
            if self.logprobs is not None and not self.stream:  # a stream's runs carried them
                alts: list[Top | None] | None = list(self.top) if self.top is not None else None
                lp = Logprobs(text, list(self.logprobs), alts)
            out.append(Done(text, reason, lp, self.scored, self._matched(), score))
        return out

    def _matched(self) -> bool | None:
        """Whether the text kept (without a stop string) is a complete match."""
        if self.constraint is None:
            return None
        self.constraint.rollback(self._pushed - len(self.chars))
        return self.constraint.matched

    def _keep_logprobs(
        self, before: int, logprobs: list[float] | None, top: list[Top] | None
    ) -> None:
        """The logprobs of the characters kept (a stop string's were cut with it)."""
        if self.logprobs is None:
            return
        kept = len(self.chars) - before
        if kept > 0 and logprobs is not None:
            self.logprobs.extend(logprobs[:kept])
            if self.top is not None and top is not None:
                self.top.extend(top[:kept])
        elif kept < 0:  # a stop string that began in an earlier run was removed
            del self.logprobs[len(self.chars) :]
            if self.top is not None:
                del self.top[len(self.chars) :]

    def _append(self, text: str) -> FinishReason | None:
        self.chars.extend(text[: self.max_new - len(self.chars)])
        return "length" if len(self.chars) >= self.max_new else None

    def _append_until_stop(self, text: str) -> FinishReason | None:
        for ch in text:
            self.chars.append(ch)
            tail = self._tail()
            for s in self.stop:
                if tail.endswith(s):
                    del self.chars[len(self.chars) - len(s) :]
                    return "stop"
            if len(self.chars) >= self.max_new:
                return "length"
        return None

    def _tail(self) -> str:
        """The end of the text, as long as the longest stop string."""
        return "".join(self.chars[len(self.chars) - self._longest :])

    def _held_back(self, tail: str) -> int:
        """Characters at the end of the text that may be the start of a stop string."""
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(tail)), hold, -1):
                if tail.endswith(s[:k]):
                    hold = k
                    break
        return hold
