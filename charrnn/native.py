"""The native kernels (``csrc/``), built and loaded on first use.

``lstm_int8.cpp`` registers ``torch.ops.charrnn.lstm_step`` (int8 or fp32 weights) and
``torch.ops.charrnn.lstm_prime`` (int8), drop-in replacements for the LSTM paths of
``charrnn/kernels.py`` with the cell fused into one pass: a fraction of their time per step
and per position of the prime, and no GIL held. Their int8 matmuls are our own kernels
(``int8_gemm.cpp``: AVX512-VNNI, AVX-VNNI, AVX2 or portable C++, picked by the CPU, or
``CHARRNN_INT8_KERNEL``) on weights packed once at load (``pack_int8``).
``decode.cpp`` registers ``torch.ops.charrnn.sample`` (``charrnn.sampling.sample_next`` for one
row in a microsecond or two) and ``torch.ops.charrnn.lstm_decode``, which samples and steps
many characters in one call; both take a ``charrnn.controls.ControlsBatch``'s tensors as an
optional last argument and advance their state in place.

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

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / name for name in ("lstm_int8.cpp", "int8_gemm.cpp", "decode.cpp")]
HEADERS = [CSRC / "int8_gemm.h", CSRC / "lstm_int8.h"]
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
        *(source.read_bytes() for source in SOURCES + HEADERS),
        torch.__version__,
        torch.version.git_version,
        str(torch.compiled_with_cxx11_abi()),
        platform.machine(),
        os.environ.get("CXX", "c++"),
        *CFLAGS,
    ]
    digest = hashlib.sha256(b"\0".join(k if isinstance(k, bytes) else k.encode() for k in key))
    return "charrnn_native_" + digest.hexdigest()[:16]


# The int8 matmul paths CHARRNN_INT8_KERNEL may force (int8_gemm.cpp), "auto" first: the best
# this CPU has, with batches of more than 24 rows handed to torch._int_mm where the CPU has
# AMX-INT8. "onednn" is torch._int_mm everywhere (the reference, and the kernels before these).
INT8_KERNELS = ("auto", "avx512vnni", "avxvnni", "avx2", "portable", "onednn")


def int8_kernel_setting() -> str:
    """``CHARRNN_INT8_KERNEL`` (default auto); ValueError, in one line, for an unknown value."""
    value = os.environ.get("CHARRNN_INT8_KERNEL", "auto").strip().lower() or "auto"
    if value not in INT8_KERNELS:
        raise ValueError(f"CHARRNN_INT8_KERNEL={value!r} is not one of {', '.join(INT8_KERNELS)}")
    return value


@functools.cache
def load() -> bool:
    """Whether ``torch.ops.charrnn`` is available in this process (built here if need be),
    with the int8 matmul path of ``CHARRNN_INT8_KERNEL`` in force. ValueError for a setting
    that is unknown or names a path this CPU lacks."""
    setting = int8_kernel_setting()
    try:
        _load_or_build()
    except Exception as exc:  # no compiler, no ninja, an unwritable folder: still correct
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning(
            "native LSTM kernels unavailable (%s); running the eager reference kernels", reason
        )
        return False
    kernel = int8_kernel(setting)
    log.info("native int8 matmuls: %s (CHARRNN_INT8_KERNEL=%s)", kernel, setting)
    return True


def int8_kernel(name: str | None = None) -> str:
    """Forces the int8 matmul path ``name`` (one of INT8_KERNELS) if given, for every call
    from now on; returns the path in force. ValueError if this CPU lacks it. Needs ``load``."""
    try:
        return torch.ops.charrnn.int8_kernel(name)
    except RuntimeError as exc:
        raise ValueError(f"CHARRNN_INT8_KERNEL={name}: {str(exc).splitlines()[0]}") from None


def int8_kernels() -> list[str]:
    """The int8 matmul paths this CPU can run, best first ("onednn" last). Needs ``load``."""
    return list(torch.ops.charrnn.int8_kernels())


def pack_int8(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """The int8 [N, K] matrices of ``weights`` packed once for the native int8 matmuls (others
    as they are). A packed matrix is still the same contiguous int8 [N, K] tensor to everything
    else (torch._int_mm, slicing): its packed form rides in its storage, after its values, and
    must not be written to. An unpacked matrix works too, packed again on every call."""
    return [
        torch.ops.charrnn.pack_int8(w) if w.dtype == torch.int8 and w.dim() == 2 else w
        for w in weights
    ]


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
