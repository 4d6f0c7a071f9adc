"""A fake model runner for the decode loop's tests: the real executor over a two-character
device whose every prime favours 'b' and whose every step samples it."""

from __future__ import annotations

import numpy as np
import torch

from app.engine.handle import Generation
from app.engine.loop import DecodeLoop
from app.engine.policy import Policy
from app.engine.request import GenerationRequest
from app.metrics import Metrics
from app.runner import NO_LOGPROBS, Batch, Output, Plan, Sampled
from app.runner.execute import Executor
from charrnn import SamplingParams, Vocabulary
from charrnn.sampling import SamplingBatch


class FakeRunner:
    """The runner's interface over a two-character vocabulary: every prime leaves logits that
    favour 'b', every step samples it. Counts the calls."""

    vocab = Vocabulary("ab")
    device = torch.device("cpu")
    prime_align = 1
    exact_steps = False
    multi_step = True
    splits_early = True

    def __init__(self) -> None:
        self.primed: list[int] = []
        self.calls = 0
        self._executor = Executor(self)  # the real one, over this fake device

    def worker(self):  # type: ignore[no-untyped-def]
        return torch.inference_mode()

    def encode(self, prime: str) -> torch.Tensor:
        return torch.tensor(self.vocab.encode(prime))

    def cached_prime(self, prime: str) -> None:
        return None

    def cache_prime(self, *args: object) -> None:
        pass

    def prime(self, ids: torch.Tensor, state: object) -> tuple[torch.Tensor, tuple]:
        self.primed.append(len(ids))
        return torch.tensor([[0.0, 5.0]]), (torch.zeros(1, 1, 1),)

    def new_row(
        self, logits, state, sampling, logprobs=None, constraint=None, controls=None, prime=""
    ):  # type: ignore[no-untyped-def]
        return Batch(logits, state, SamplingBatch.of([sampling], 2, self.device), np.array([-1]))

    def decode(self, batch: Batch, positions: np.ndarray, steps: int) -> tuple[Sampled, Batch]:
        self.calls += 1
        ids = torch.ones(steps, len(batch), dtype=torch.long)
        return Sampled(ids, [NO_LOGPROBS] * len(batch)), batch

    def sample(self, batch: Batch, positions: np.ndarray) -> Sampled:
        return self.decode(batch, positions, 1)[0]

    def read(self, batch: Batch, chars: torch.Tensor) -> Batch:
        return batch

    def execute(self, plan: Plan) -> Output:
        return self._executor.execute(plan)


def make_loop(runner: FakeRunner, results: list) -> DecodeLoop:
    policy = Policy(max_concurrent=4, prime_budget=64, prime_slice_s=1.0)
    return DecodeLoop("fake", runner, Metrics(), policy, lambda r, failing: results.extend(r))  # type: ignore[arg-type]


def make_gen(prime: str = "ab", max_new: int = 5) -> Generation:
    return Generation(GenerationRequest(prime, max_new, SamplingParams(seed=1)), 10_000)
