"""The native int8 LSTM kernels (``csrc/lstm_int8.cpp``), built and loaded on first use.

They register ``torch.ops.charrnn.lstm_step`` and ``torch.ops.charrnn.lstm_prime``, drop-in
replacements for the int8 LSTM paths of ``charrnn/kernels.py`` with the cell fused into one
pass: about half the time per position of the prime, and less per decode step.

The library is built by torch's own extension builder (a C++ compiler and ``ninja``) once per
source, torch version and flags, into ``$CHARRNN_NATIVE_DIR`` (default
``~/.cache/charrnn/native``); a library already there is loaded without a compiler, which is
how the Docker image ships it prebuilt. Where it can be neither loaded nor built, ``load``
says why once and returns False, and the decoder runs the TorchScript kernels instead.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("charrnn.native")

SOURCE = Path(__file__).with_name("csrc") / "lstm_int8.cpp"
# No -march: a prebuilt library runs on any CPU of its architecture. No FMA contraction: the
# cell's numbers are then the same on every CPU and at every vector width. No trapping math
# (FP exceptions are never looked at): without it GCC keeps the clamps as branches and does
# not vectorise the cell; it changes no result.
CFLAGS = ["-O3", "-ffp-contract=off", "-fno-trapping-math"]


def cache_dir() -> Path:
    return Path(os.environ.get("CHARRNN_NATIVE_DIR") or Path.home() / ".cache/charrnn/native")


def library_name() -> str:
    """Names the build: a changed source, torch or flag set gets a new library."""
    key = SOURCE.read_bytes() + torch.__version__.encode() + " ".join(CFLAGS).encode()
    return "charrnn_native_" + hashlib.sha256(key).hexdigest()[:16]


@functools.cache
def load() -> bool:
    """Whether ``torch.ops.charrnn`` is available in this process (built here if need be)."""
    name = library_name()
    folder = cache_dir() / name
    library = folder / f"{name}.so"
    try:
        if library.exists():
            torch.ops.load_library(str(library))
        else:
            from torch.utils.cpp_extension import load as build

            log.info("building the native int8 LSTM kernels into %s", folder)
            folder.mkdir(parents=True, exist_ok=True)
            build(
                name=name,
                sources=[str(SOURCE)],
                extra_cflags=CFLAGS,
                build_directory=str(folder),
                is_python_module=False,
            )
    except Exception as exc:  # no compiler, no ninja, an unwritable folder: still correct
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning(
            "native int8 LSTM kernels unavailable (%s); running the TorchScript ones", reason
        )
        return False
    return True


if __name__ == "__main__":  # python -m charrnn.native: build now (the Docker image does)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(0 if load() else 1)
