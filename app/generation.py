"""One generation, split by concern and by owner.

- ``GenerationRequest``: what the client asked for (immutable; built by app/validation.py).
- ``StopMatcher``: the text so far, the length limit and the stop strings. It turns sampled
  characters into events; the decode thread owns it.
- ``Scored``, ``TextRun``, ``Done``, ``Failed``: the events, in the order a client receives
  them (``Scored`` only for a request that scores its prime).
- ``Logprobs``: log-probabilities of characters and their likeliest alternatives.
- ``Timings``: when the request was submitted, admitted, warmed up and finished.

The event channel a client reads lives in app/channel.py and belongs to the event loop."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from charrnn.sampling import SamplingParams

FinishReason = Literal["length", "stop"]


@dataclass(frozen=True)
class GenerationRequest:
    prime: str
    max_new: int
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    # False for whole-text (non-streaming) requests: only the final event is produced.
    stream: bool = True
    # Log-probabilities of the generated characters and this many alternatives (None: none).
    logprobs: int | None = None
    # Score the prime's characters from this position on (None: the prime is not scored):
    # ``/score`` (after its context) and OpenAI's ``echo`` with ``logprobs``. A scored prime
    # runs in full (never from the prime cache) and its logprobs come as a ``Scored`` event.
    score_from: int | None = None
    # Alternatives per scored prime character.
    score_top: int = 0


# One character's alternatives, likeliest first: (character, logprob).
Top = list[tuple[str, float]]


@dataclass
class Logprobs:
    """Per character, its log-probability under the model's own distribution (softmax of
    the logits at temperature 1; None for a character with nothing before it) and, when
    asked for, its likeliest alternatives."""

    tokens: str
    token_logprobs: list[float | None]
    top: list[Top | None] | None = None


@dataclass
class Scored:
    """The scored part of the prime, ``prime[start:]``, when its pass has run."""

    start: int
    logprobs: Logprobs


@dataclass
class TextRun:
    """Newly released characters: ``text[k]`` is character ``index + k`` of the generated text.
    One event per character on the wire; one object per run here, so the decode thread and
    the event loop handle a run, not each character."""

    index: int
    text: str
    logprobs: list[float] | None = None  # one per character, when the request asked
    top: list[Top] | None = None


@dataclass
class Done:
    generated_text: str
    finish_reason: FinishReason
    logprobs: Logprobs | None = None  # of generated_text, when the request asked
    prime: Scored | None = None  # the prime's scores, when the request asked


@dataclass
class Failed:
    message: str
    type: str


Event = Scored | TextRun | Done | Failed


class StopMatcher:
    """The generated text and when it ends: at ``max_new`` characters, or where a stop string
    first ends (the stop string is not kept). Characters that may be the start of a stop
    string are held back until that is clear, so a streamed text never contains one."""

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

    def __len__(self) -> int:
        return len(self.chars)

    def push(
        self, text: str, logprobs: list[float] | None = None, top: list[Top] | None = None
    ) -> list[Event]:
        """Add generated characters (with their logprobs and alternatives, when asked for);
        returns the events they release: the released run as one ``TextRun``, then the
        final event. Characters after the end are dropped."""
        if self.finished:
            return []
        before = len(self.chars)
        reason = self._append_until_stop(text) if self.stop else self._append(text)
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
            lp = None
            if self.logprobs is not None and not self.stream:  # a stream's runs carried them
                alts: list[Top | None] | None = list(self.top) if self.top is not None else None
                lp = Logprobs(text, list(self.logprobs), alts)
            out.append(Done(text, reason, lp, self.scored))
        return out

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


@dataclass
class Timings:
    """Moments in a generation's life (``time.perf_counter``). ``submitted`` is set on the
    event loop; the others by the decode thread, and read by the event loop only after the
    final event, which the hand-over orders after them."""

    submitted: float = field(default_factory=time.perf_counter)
    started: float = 0.0  # admitted: its prime starts
    warmed: float = 0.0  # its prime is done
    ended: float = 0.0

    def as_dict(self, generated: int) -> dict[str, float]:
        end = self.ended or time.perf_counter()
        gen_s = max(end - self.warmed, 1e-9) if self.warmed else 0.0
        return {
            "queue_ms": round(max(self.started - self.submitted, 0) * 1e3, 3),
            "warmup_ms": round(max(self.warmed - self.started, 0) * 1e3, 3),
            "generate_ms": round(gen_s * 1e3, 3),
            "chars_per_s": round(generated / gen_s, 1) if gen_s else 0.0,
        }
