"""``python -m tests.faulty_app``: the real service, with faults injected into its model
backend, for the tests of what the decode loop does when the model fails.

- A prime that starts with ``Q`` fails in its first prime part: one generation's fault.
- While the file named by ``CHARRNN_TEST_FAULT_FILE`` exists, every decode call fails: a
  persistent fault (from start-up on, the warm-up fails)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from app.__main__ import main
from app.runner import ModelRunner

_prime = ModelRunner.prime
_decode = ModelRunner.decode
_sample = ModelRunner.sample
FAULT_FILE = Path(os.environ.get("CHARRNN_TEST_FAULT_FILE", "/nonexistent"))


def prime(self: ModelRunner, ids, state):  # type: ignore[no-untyped-def]
    if state is None and int(ids[0]) == self.vocab.encode("Q")[0]:
        raise RuntimeError("injected prime fault")
    return _prime(self, ids, state)


def _faulty(call):  # type: ignore[no-untyped-def]
    def decode_call(self: ModelRunner, *args, **kwargs):  # type: ignore[no-untyped-def]
        if FAULT_FILE.exists():
            raise RuntimeError("injected decode fault")
        return call(self, *args, **kwargs)

    return decode_call


ModelRunner.prime = prime  # type: ignore[method-assign]
ModelRunner.decode = _faulty(_decode)  # type: ignore[method-assign]
ModelRunner.sample = _faulty(_sample)  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
