"""What the engine is asked and what it answers.

- ``GenerationRequest``: what a client asked for (immutable; built by the API's adapters).
- ``Scored``, ``TextRun``, ``Done``, ``Failed``: the events, in the order a client receives
  them (``Scored`` only for a request that scores its prime).
- ``Logprobs``: log-probabilities of characters and their likeliest alternatives.
- ``Timings``: when the request was submitted, admitted, warmed up and finished.

The text so far and when it ends is app/engine/stops.py; the event channel a client reads,
app/engine/channel.py."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from app.runner import Top
from charrnn.controls import DEFAULT, Controls
from charrnn.sampling import SamplingParams
from charrnn.structured import Grammar

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
    # The compiled constraint the generated text must match (None: free text).
    constraint: Grammar | None = None
    # The generation controls (biases, penalties, DRY, bans, min-p, typical-p).
    controls: Controls = DEFAULT


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
    prime_scores: Scored | None = None  # when the request asked
    matched: bool | None = None  # whether the text matches its constraint (None: none)
    # The mean logprob per generated character (with logprobs, and a character or more): a
    # sample's score, which ``best_of`` ranks by. A stream's runs carry the logprobs, so
    # its final event carries only this.
    score: float | None = None


@dataclass
class Failed:
    message: str
    type: str


Event = Scored | TextRun | Done | Failed


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
