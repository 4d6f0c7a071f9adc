"""One generation, split by concern and by owner.

- ``GenerationRequest``: what the client asked for (immutable; built by app/validation.py).
- ``StopMatcher``: the text so far, the length limit and the stop strings. It turns sampled
  characters into events; the decode thread owns it.
- ``TextRun``, ``Done``, ``Failed``: the events, in the order a client receives them.
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


@dataclass
class TextRun:
    """Newly released characters: ``text[k]`` is character ``index + k`` of the generated text.
    One event per character on the wire; one object per run here, so the decode thread and
    the event loop handle a run, not each character."""

    index: int
    text: str


@dataclass
class Done:
    generated_text: str
    finish_reason: FinishReason


@dataclass
class Failed:
    message: str
    type: str


Event = TextRun | Done | Failed


class StopMatcher:
    """The generated text and when it ends: at ``max_new`` characters, or where a stop string
    first ends (the stop string is not kept). Characters that may be the start of a stop
    string are held back until that is clear, so a streamed text never contains one."""

    def __init__(self, request: GenerationRequest):
        self.max_new = request.max_new
        self.stop = request.stop
        self.stream = request.stream
        self.chars: list[str] = []
        self.emitted = 0
        self.finished = False
        self._longest = max(map(len, self.stop), default=0)

    def __len__(self) -> int:
        return len(self.chars)

    def push(self, text: str) -> list[Event]:
        """Add generated characters; returns the events they release: the released run as
        one ``TextRun``, then the final event. Characters after the end are dropped."""
        if self.finished:
            return []
        reason = self._append_until_stop(text) if self.stop else self._append(text)
        upto = len(self.chars)
        if reason is None and self.stop:
            upto -= self._held_back(self._tail())
        out: list[Event] = []
        if self.stream and upto > self.emitted:
            out.append(TextRun(self.emitted, "".join(self.chars[self.emitted : upto])))
        self.emitted = max(self.emitted, upto)
        if reason is not None:
            self.finished = True
            out.append(Done("".join(self.chars), reason))
        return out

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
