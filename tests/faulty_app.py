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
from app.backend import ModelBackend

_prime_part = ModelBackend.prime_part
_advance = ModelBackend.advance
FAULT_FILE = Path(os.environ.get("CHARRNN_TEST_FAULT_FILE", "/nonexistent"))


def prime_part(self: ModelBackend, ids, state):  # type: ignore[no-untyped-def]
    if state is None and int(ids[0]) == self.vocab.encode("Q")[0]:
        raise RuntimeError("injected prime fault")
    return _prime_part(self, ids, state)


def advance(self: ModelBackend, *args, **kwargs):  # type: ignore[no-untyped-def]
    if FAULT_FILE.exists():
        raise RuntimeError("injected decode fault")
    return _advance(self, *args, **kwargs)


ModelBackend.prime_part = prime_part  # type: ignore[method-assign]
ModelBackend.advance = advance  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
