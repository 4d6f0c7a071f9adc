"""int8 weights whose integer sums are exact on every CPU, and the check that they are.

The decode step multiplies int8 activations (``round(127 h)``, h a hidden state in [-1, 1])
by int8 weights into int32 sums: the native kernels' own (``charrnn/csrc/int8_gemm.cpp``;
their AVX2 path adds pairs in 16 bits as described below, so it too needs the 7 bits), and
``torch._int_mm`` (oneDNN on x86) in the eager kernels and the prime's head. With VNNI (AVX512-VNNI,
AVX-VNNI, AMX) oneDNN accumulates in 32 bits and the sums are exact. Without it (Haswell to
Skylake, AMD Zen 2/3: ``ONEDNN_MAX_CPU_ISA=AVX2`` or ``AVX512_CORE`` reproduces them),
oneDNN shifts the activations to unsigned bytes (a + 128, up to 255) and adds each pair of
products in *saturating* 16-bit arithmetic (``vpmaddubsw``): with 8-bit weights a pair
reaches 2 * 255 * 127 = 64,770 > 32,767 and the sums, the logits and the text would depend
on the CPU. So the weights here use 7 bits: |w| <= 63 keeps every pair within
2 * 255 * 63 = 32,130, and every ISA's sums are the exact integers. It costs the shipped
model 0.0002 nats/char of validation NLL (models/README.md) and no time.

``int8_is_exact`` checks that at start-up against exact products on worst-case inputs, for
every row count that picks its own kernel, for the native path in force and for
``torch._int_mm``; ``choose_precision`` turns the setting, the device and that check into the
decode path and one line of why. Off x86 (aarch64) int8 runs on the native kernels' portable
path, so it needs them built.
"""

from __future__ import annotations

import functools
import logging
import platform
from typing import Literal

import torch

from charrnn import native

log = logging.getLogger("charrnn.quantization")

Precision = Literal["fp32", "int8"]

# The activations' and the weights' largest integer. See the module docstring for 63.
ACT_MAX = 127
WEIGHT_MAX = 63


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 W per output channel (symmetric, |w| <= WEIGHT_MAX), and the scales that turn the
    int32 sums of ``charrnn.kernels.int_sums`` back into ``x @ W^T``. Unlike ``torch.ao``
    dynamic quantization, whose activation scale spans the batch, nothing here depends on
    the other rows. Only elementwise IEEE operations: the same bits on every machine."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / WEIGHT_MAX
    return torch.round(w / scales[:, None]).to(torch.int8), scales / ACT_MAX


def _worst_cases(
    rows: int, k: int, n: int, weight_max: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x [rows, k], W [n, k]) int8 pairs within the decoder's ranges that a saturating or
    otherwise inexact kernel gets wrong: every product at its extreme, both signs, and
    random values."""
    g = torch.Generator().manual_seed(rows * 7919 + k)
    full_x = torch.full((rows, k), ACT_MAX, dtype=torch.int8)
    full_w = torch.full((n, k), weight_max, dtype=torch.int8)
    rand_x = torch.randint(-ACT_MAX, ACT_MAX + 1, (rows, k), generator=g, dtype=torch.int8)
    rand_w = torch.randint(-weight_max, weight_max + 1, (n, k), generator=g, dtype=torch.int8)
    return [
        (full_x, full_w),
        (-full_x, full_w),
        (full_x, -full_w),
        (rand_x, rand_w),
        (rand_x.abs(), rand_w.abs()),
        (rand_x.abs(), -rand_w.abs()),
    ]


def int8_is_exact(weight_max: int = WEIGHT_MAX) -> tuple[bool, str]:
    """Whether the int8 matmuls give the exact int32 sums for the decoder's operands on this
    CPU, and if not, the first case that failed: ``torch._int_mm`` and, where the native
    kernels load, their path in force (``CHARRNN_INT8_KERNEL``). Rows 1 to 64 (GEMV, small
    and blocked GEMM kernels, register tiles of every height; the prime's chunks) by a few
    widths, odd ones included. The reference is float64, exact for these sums (< 2**53).
    ``weight_max`` is for the tests."""
    matmuls = {"torch._int_mm": lambda x, w: torch._int_mm(x, w.t())}
    if native.load():
        path = native.int8_kernel()
        matmuls[f"native {path}"] = lambda x, w: torch.ops.charrnn.int8_mm(
            x, native.pack_int8([w])[0]
        )
    for rows in (1, 2, 3, 4, 7, 8, 13, 16, 17, 33, 64):
        for k, n in ((64, 48), (97, 40), (1024, 128)):
            for x, w in _worst_cases(rows, k, n, weight_max):
                want = x.double() @ w.t().double()
                for name, matmul in matmuls.items():
                    try:
                        got = matmul(x, w).double()
                    except RuntimeError as exc:  # the AVX2 path refuses 8-bit weights
                        return False, f"{name}: {str(exc).splitlines()[0]}"
                    if not torch.equal(got, want):
                        err = int((got - want).abs().max())
                        return False, f"int8 sums off by up to {err} at {rows}x{k}x{n} ({name})"
    return True, "int8 sums exact"


@functools.cache
def _self_test() -> tuple[bool, str]:
    return int8_is_exact()


@functools.cache
def choose_precision(setting: str, device: torch.device) -> tuple[Precision, str]:
    """The decode step's weight precision for ``CHARRNN_DECODE_WEIGHTS`` (auto/fp32/int8) on
    ``device``, and why, in words for the start-up log and ``/info``. Raises ValueError for a
    setting this device cannot serve exactly. Cached: one self-test and one log line."""
    if device.type != "cpu":
        if setting == "int8":
            raise ValueError(
                "CHARRNN_DECODE_WEIGHTS=int8 is CPU-only: CUDA decodes in fp32 (its int8 matmul "
                "needs more than 16 rows); set it to auto or fp32"
            )
        return "fp32", f"{device.type} decodes in fp32 (int8 is a CPU path)"
    if setting == "fp32":
        return "fp32", "CHARRNN_DECODE_WEIGHTS=fp32"
    machine = platform.machine().lower()
    x86 = machine in ("x86_64", "amd64")
    if not x86 and not native.load():
        why = f"int8 off x86 runs on the native kernels, unavailable here; this CPU is {machine}"
    elif x86 and not torch.backends.mkldnn.is_available():
        why = "int8 needs torch built with oneDNN, and this one is not"
    else:
        exact, detail = _self_test()
        if exact:
            return "int8", f"{detail} on this CPU (checked at start-up)"
        why = f"the int8 self-test failed ({detail})"
    if setting == "int8":
        raise ValueError(f"CHARRNN_DECODE_WEIGHTS=int8 cannot run exactly here: {why}")
    log.warning("decoding in fp32: %s", why)
    return "fp32", why
