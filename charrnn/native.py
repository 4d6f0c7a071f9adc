"""The native kernels (``csrc/``), built and loaded on first use.

``lstm_int8.cpp`` registers ``torch.ops.charrnn.lstm_step`` (int8 or fp32 weights) and
``torch.ops.charrnn.lstm_prime`` (int8), drop-in replacements for the LSTM paths of
``charrnn/kernels.py`` with the cell fused into one pass: a fraction of their time per step
and per position of the prime, and no GIL held.
``decode.cpp`` registers ``torch.ops.charrnn.sample`` (``charrnn.sampling.sample_next`` for one
row in a microsecond or two) and ``torch.ops.charrnn.lstm_decode``, which samples and steps
many characters in one call.

The library is built by torch's own extension builder (a C++ compiler and ``ninja``) once per
source, torch build, machine and flags, into ``$CHARRNN_NATIVE_DIR`` (default
``~/.cache/charrnn/native``); a library already there is loaded without a compiler, which is
how the Docker image ships it prebuilt. Where it can be neither loaded nor built, ``load``
says why once and returns False, and the decoder runs the eager reference kernels instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger("charrnn.native")

SOURCES = [Path(__file__).with_name("csrc") / name for name in ("lstm_int8.cpp", "decode.cpp")]
# No -march: a prebuilt library runs on any CPU of its architecture. No FMA contraction: the
# cell's numbers are then the same on every CPU and at every vector width. No trapping math
# (FP exceptions are never looked at): without it GCC keeps the clamps as branches and does
# not vectorise the cell; it changes no result.
CFLAGS = ["-O3", "-ffp-contract=off", "-fno-trapping-math"]
# How long a process waits for another one's build of the same library (one takes ~10 s).
BUILD_WAIT_S = 300.0


def cache_dir() -> Path:
    return Path(os.environ.get("CHARRNN_NATIVE_DIR") or Path.home() / ".cache/charrnn/native")


def library_name() -> str:
    """Names the build: another source, torch build, machine, compiler or flag set gets a
    library of its own."""
    key = [
        *(source.read_bytes() for source in SOURCES),
        torch.__version__,
        torch.version.git_version,
        str(torch.compiled_with_cxx11_abi()),
        platform.machine(),
        os.environ.get("CXX", "c++"),
        *CFLAGS,
    ]
    digest = hashlib.sha256(b"\0".join(k if isinstance(k, bytes) else k.encode() for k in key))
    return "charrnn_native_" + digest.hexdigest()[:16]


@functools.cache
def load() -> bool:
    """Whether ``torch.ops.charrnn`` is available in this process (built here if need be)."""
    try:
        _load_or_build()
    except Exception as exc:  # no compiler, no ninja, an unwritable folder: still correct
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning(
            "native LSTM kernels unavailable (%s); running the eager reference kernels", reason
        )
        return False
    return True


def _load_or_build() -> None:
    name, folder = library_name(), cache_dir()
    library = folder / f"{name}.so"
    if not library.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with _exclusive(folder / f"{name}.lock"):
            if not library.exists():  # nobody built it while we waited
                _build(name, library)
                return  # torch's builder has loaded it
    torch.ops.load_library(str(library))


def _build(name: str, library: Path) -> None:
    """Build into a private folder, then move the library into place in one rename: a
    library at ``library`` is always a whole one, even if a build is killed half-way."""
    from torch.utils.cpp_extension import load as build

    log.info("building the native LSTM kernels into %s", library)
    with tempfile.TemporaryDirectory(prefix=f"{name}.", dir=library.parent) as tmp:
        build(
            name=name,
            sources=[str(source) for source in SOURCES],
            extra_cflags=CFLAGS,
            build_directory=tmp,
            is_python_module=False,
        )
        os.replace(Path(tmp) / f"{name}.so", library)


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """One builder at a time across processes. The kernel drops the lock when its holder
    dies, so a killed build leaves nothing that blocks the next one."""
    with open(path, "a") as fh:
        deadline = time.monotonic() + BUILD_WAIT_S
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    held = f"another build held {path} for {BUILD_WAIT_S:.0f} s"
                    raise TimeoutError(held) from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


if __name__ == "__main__":  # python -m charrnn.native: build now (the Docker image does)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(0 if load() else 1)
