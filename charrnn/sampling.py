"""Batched next-character sampling: temperature, top-k, top-p, per-row seeds.

Randomness is counter-based: the uniform number a row uses at generation step ``pos`` is a
hash of ``(seed, pos)`` (SplitMix64). A request's text therefore depends only on its own seed
and distribution, never on which other requests share the batch or in which order they came.
Sampling draws one uniform per row and inverts the filtered CDF, all vectorised in torch.
``sampler`` picks how it runs: in C++ where the native kernels load (``charrnn/csrc/decode.cpp``,
a microsecond or two a row), else ``sample_next`` op by op (the reference).

Generation controls (``charrnn.controls``: logit bias, penalties, DRY, banned strings, typical
and min-p) come as a ``ControlsBatch``, applied in their documented order around the mask and
the filters; ``sample_next`` only reads their state (``ControlsBatch.record`` advances it).

Structured generation (``charrnn/structured``) passes a mask of the characters that may
continue a match. It applies before temperature, top-k and top-p: the characters it forbids
leave the distribution, and their mass, the model's own way of saying "the match may end
here", becomes one more outcome, "end" (id ``V``, one past the last character), where the
mask allows it. Temperature, top-k and top-p then treat "end" as one outcome among the
allowed characters: at temperature 1 its probability is exactly the forbidden characters'
mass (its logit is their logsumexp), and top-k counts it as one of the k. A row whose mask
allows every character has no forbidden mass: it samples exactly as without a mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    from charrnn.controls import ControlsBatch


class Sampler(Protocol):
    """``sample_next``'s signature, which the native op shares."""

    def __call__(
        self,
        logits: torch.Tensor,
        temperature: torch.Tensor,
        top_k: torch.Tensor,
        top_p: torch.Tensor,
        u: torch.Tensor,
        mask: torch.Tensor | None = None,
        controls: ControlsBatch | None = None,
    ) -> torch.Tensor: ...


MAX_SEED = 2**63

M1, M2, M3 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_M1, _M2, _M3 = np.uint64(M1), np.uint64(M2), np.uint64(M3)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.temperature > 0 and np.isfinite(self.temperature)):
            raise ValueError("temperature must be finite and > 0")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be >= 1")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if not 0 <= self.seed < MAX_SEED:
            raise ValueError("seed must be in [0, 2**63)")


@dataclass
class SamplingBatch:
    """A batch's sampling parameters, one entry per row, as the samplers take them. The one
    object the reference loop, the service's step and the CUDA graphs' buffers share."""

    temperature: torch.Tensor  # [B] float32, > 0
    top_k: torch.Tensor  # [B] int64, the vocabulary size for "no limit"
    top_p: torch.Tensor  # [B] float32
    seeds: np.ndarray  # [B] uint64: with a row's position, keys its draws

    @classmethod
    def of(
        cls, params: Sequence[SamplingParams], vocab_size: int, device: torch.device
    ) -> SamplingBatch:
        return cls(
            torch.tensor([p.temperature for p in params], device=device),
            torch.tensor([p.top_k or vocab_size for p in params], device=device),
            torch.tensor([p.top_p for p in params], device=device),
            np.array([p.seed for p in params], dtype=np.uint64),
        )

    def __len__(self) -> int:
        return len(self.seeds)

    @property
    def filters(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(temperature, top_k, top_p): the samplers' arguments after the logits."""
        return self.temperature, self.top_k, self.top_p

    def uniforms(self, positions: np.ndarray, device: torch.device) -> torch.Tensor:
        """Each row's uniform for its draw at ``positions`` [B]."""
        u = torch.from_numpy(uniforms(self.seeds, positions))
        return u if device.type == "cpu" else u.to(device)

    def select(self, keep: list[int]) -> SamplingBatch:
        idx = torch.tensor(keep, device=self.temperature.device)
        return SamplingBatch(
            self.temperature.index_select(0, idx),
            self.top_k.index_select(0, idx),
            self.top_p.index_select(0, idx),
            self.seeds[keep],
        )

    @staticmethod
    def concat(parts: Sequence[SamplingBatch]) -> SamplingBatch:
        return SamplingBatch(
            torch.cat([p.temperature for p in parts]),
            torch.cat([p.top_k for p in parts]),
            torch.cat([p.top_p for p in parts]),
            np.concatenate([p.seeds for p in parts]),
        )


_MASK = 2**64 - 1
# Below this many rows, Python integers beat numpy's per-call overhead, which is a sizeable
# part of a batch-1 decode step.
_SMALL = 4


def _uniform(seed: int, position: int) -> float:
    """``uniforms`` for one row, in Python integers."""
    z = (seed * M1 + (position + 1) * M2) & _MASK
    z = ((z ^ (z >> 30)) * M2) & _MASK
    z = ((z ^ (z >> 27)) * M3) & _MASK
    z ^= z >> 31
    return (z >> 11) * (1.0 / 2**53)


def uniforms(seeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """SplitMix64 of (seed, position) -> float64 uniforms in [0, 1), one per row."""
    if len(seeds) < _SMALL:
        pairs = zip(
            seeds.astype(np.uint64).tolist(), positions.astype(np.uint64).tolist(), strict=True
        )
        return np.array([_uniform(s, p) for s, p in pairs], dtype=np.float64)
    with np.errstate(over="ignore"):
        z = seeds.astype(np.uint64) * _M1 + (positions.astype(np.uint64) + np.uint64(1)) * _M2
        z = (z ^ (z >> np.uint64(30))) * _M2
        z = (z ^ (z >> np.uint64(27))) * _M3
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def sample_next(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    u: torch.Tensor,
    mask: torch.Tensor | None = None,
    controls: ControlsBatch | None = None,
) -> torch.Tensor:
    """Pick one id per row.

    logits [B, V]; temperature [B] (> 0); top_k [B] (use V for "no limit"); top_p [B];
    u [B] uniforms in [0, 1). All on the logits' device. Returns ids [B] (int64).
    With ``mask`` (int32 [B, W], W >= ceil((V + 1) / 32); bit j of row b set where character j
    may continue row b's match, bit V where the match may end; later bits are ignored), an id
    may also be V: "end", drawn with the forbidden characters' mass, or where nothing at all
    may follow (module docstring).
    With ``controls`` (``charrnn.controls.ControlsBatch``, CPU), each row's controls apply in
    their order: logit bias, penalties and DRY on the logits; banned strings and the mask;
    temperature, top-k, typical-p, top-p, min-p. A row whose banned strings forbid every
    character draws "end" (id V). The controls' state is read, not advanced.
    Plain tensor code: the reference for the native sampler, and what CUDA graphs capture.
    """
    if controls is not None:
        return _draw_controlled(logits, temperature, top_k, top_p, u, mask, controls)
    if mask is None:
        return _draw(logits, temperature, top_k, top_p, u)
    return _draw_masked(logits, temperature, top_k, top_p, u, mask)


def unpack_mask(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Bool [B, n] from a bitmask int32 [B, W] (bit j of word w is entry 32 w + j)."""
    bits = torch.arange(32, dtype=torch.int32, device=mask.device)
    return ((mask[:, :, None] >> bits) & 1).bool().flatten(1)[:, :n]


def _draw_controlled(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    u: torch.Tensor,
    mask: torch.Tensor | None,
    controls: ControlsBatch,
) -> torch.Tensor:
    v = logits.shape[-1]
    # Banned characters leave the row (renormalised away, unlike a mask's: no "end" mass).
    banned = controls.forbidden().to(logits.device)
    x = controls.adjusted(logits).masked_fill(banned, float("-inf"))
    # A row with nothing left ends; it draws from any numbers meanwhile.
    dead = banned.all(-1)
    x = x.masked_fill(dead[:, None], 0.0)
    shape = controls.shape()
    if shape is not None:
        shape = (shape[0].to(logits.device), shape[1].to(logits.device))
    guard = controls.guard()
    if guard is not None:  # the copy guard: a mask of its own, over the constraint's
        mask = _guarded_mask(mask, *guard, v).to(logits.device)
    if mask is None:
        ids = _draw(x, temperature, top_k, top_p, u, shape)
    else:
        ids = _draw_masked(x, temperature, top_k, top_p, u, mask, shape)
    return torch.where(dead, v, ids)


def _guarded_mask(
    mask: torch.Tensor | None, forbid: torch.Tensor, end: torch.Tensor, v: int
) -> torch.Tensor:
    """``mask`` without the characters ``forbid`` [B, V] and, where ``end`` [B] is False,
    without "end" (bit V). The guard never says that a text may end: without a mask its
    forbidden characters' mass leaves the row, and "end" comes only where nothing is left (as
    for a constraint's match that no character continues)."""
    words = mask.shape[1] if mask is not None else (v + 32) // 32
    allowed = torch.ones(forbid.shape[0], words * 32, dtype=torch.bool)
    allowed[:, :v] = ~forbid.cpu()
    allowed[:, v] = end.cpu() & (mask is not None)
    packed = np.packbits(allowed.numpy(), axis=1, bitorder="little").view(np.int32)
    guard = torch.from_numpy(packed.copy())
    return guard if mask is None else mask.cpu() & guard


def _draw_masked(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    u: torch.Tensor,
    mask: torch.Tensor,
    shape: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    v = logits.shape[-1]
    allowed = unpack_mask(mask, v + 1)
    chars = allowed[:, :v]
    x = logits.float()
    ninf = float("-inf")
    # "end" as one more logit: the log of the forbidden characters' mass, up to the softmax's
    # normaliser, which all the outcomes share.
    end = x.masked_fill(chars, ninf).logsumexp(-1, keepdim=True)
    end = end.masked_fill(~allowed[:, v:], ninf)
    outcomes = torch.cat([x.masked_fill(~chars, ninf), end], -1)
    # Top-k needs no change: a masked row forbids at least one character, whose zero
    # probability sorts last, so "V for no limit" still keeps every outcome with any mass.
    ids = _draw(outcomes, temperature, top_k, top_p, u, shape)
    # Nothing may follow (an incomplete match no character continues): the row ends.
    ids = torch.where((outcomes != ninf).any(-1), ids, v)
    # Rows that forbid nothing sample exactly as without a mask, bit for bit.
    return torch.where(chars.all(-1), _draw(logits, temperature, top_k, top_p, u, shape), ids)


def _draw(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    u: torch.Tensor,
    shape: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    # (logits - max) / T: a temperature so small that logits / T would overflow (any T > 0 is
    # valid input) then gives 0 for the likeliest characters and -inf for the rest, which is
    # greedy decoding, instead of inf - inf = NaN. T is at least float32's smallest normal,
    # so a value that rounds to 0 in float32 does the same.
    x = logits.float()
    t = temperature.clamp(min=1.1754943508222875e-38)[:, None]  # float32 tiny
    probs = torch.softmax((x - x.amax(-1, keepdim=True)) / t, dim=-1)
    # A stable sort keeps ties in vocabulary order, so the choice is reproducible.
    p_sorted, idx = torch.sort(probs, dim=-1, descending=True, stable=True)
    ranks = torch.arange(p_sorted.shape[-1], device=logits.device)
    p_sorted = p_sorted * (ranks < top_k[:, None])
    if shape is not None:
        return _draw_shaped(p_sorted, idx, top_p, u, *shape)
    cum = torch.cumsum(p_sorted, -1)
    # Nucleus: keep the smallest prefix whose mass reaches top_p of the top-k mass. The first
    # character is always kept, even where top_p times the mass rounds to 0 in float32.
    nucleus = ((cum - p_sorted) < top_p[:, None] * cum[:, -1:]) | (ranks == 0)
    p_sorted = p_sorted * nucleus
    cdf = torch.cumsum(p_sorted, -1)
    target = (u.to(cdf.dtype) * cdf[:, -1])[:, None]
    pick = torch.searchsorted(cdf, target, right=True)
    # The kept characters are a prefix of the sorted ones. A draw that rounds up to the whole
    # mass (u within 2**-25 of 1 rounds to 1.0 in float32) takes the last of them, not a
    # character the filters removed.
    kept = (p_sorted > 0).sum(-1, keepdim=True).clamp(min=1)
    return idx.gather(-1, torch.minimum(pick, kept - 1)).squeeze(-1)


def _draw_shaped(
    p_sorted: torch.Tensor,
    idx: torch.Tensor,
    top_p: torch.Tensor,
    u: torch.Tensor,
    typical_p: torch.Tensor,
    min_p: torch.Tensor,
) -> torch.Tensor:
    """``_draw``'s end for rows with typical-p and min-p (``p_sorted``: the top-k's sorted
    probabilities, 0 past k): typical-p, then the nucleus, then min-p, each removing
    characters (so the kept ones need not be a prefix), then the draw. A row with typical_p 1
    and min_p 0 draws exactly as ``_draw``."""
    p_sorted = p_sorted * _typical(p_sorted, typical_p)
    ranks = torch.arange(p_sorted.shape[-1], device=p_sorted.device)
    cum = torch.cumsum(p_sorted, -1)
    kept = p_sorted > 0
    first = kept & (kept.cumsum(-1) == 1)  # the likeliest kept, always kept
    p_sorted = p_sorted * (((cum - p_sorted) < top_p[:, None] * cum[:, -1:]) | first)
    # min-p: at least min_p times the likeliest kept character's probability.
    p_sorted = p_sorted * (p_sorted >= min_p[:, None] * p_sorted.amax(-1, keepdim=True))
    cdf = torch.cumsum(p_sorted, -1)
    target = (u.to(cdf.dtype) * cdf[:, -1])[:, None]
    pick = torch.searchsorted(cdf, target, right=True)
    last = torch.where(p_sorted > 0, ranks, 0).amax(-1, keepdim=True)
    return idx.gather(-1, torch.minimum(pick, last)).squeeze(-1)


def _typical(p_sorted: torch.Tensor, typical_p: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling's kept characters (bool, in ``p_sorted``'s order): by how far
    each one's information -log q lies from the entropy of q (the renormalised ``p_sorted``),
    the closest first, as many as reach typical_p of the mass (the one that crosses it
    included). In float64, sums in order (``cumsum``), as decode.cpp computes them."""
    w = p_sorted.double()
    q = w / torch.cumsum(w, -1)[:, -1:]
    log_q = torch.where(q > 0, q, 1.0).log()
    entropy = torch.cumsum(-q * log_q, -1)[:, -1:]
    score = torch.where(q > 0, (-log_q - entropy).abs(), float("inf"))
    order = torch.sort(score, dim=-1, stable=True).indices
    cum = torch.cumsum(q.gather(-1, order), -1)
    before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], -1)
    keep = torch.zeros_like(q, dtype=torch.bool).scatter(-1, order, before <= typical_p[:, None])
    return keep | (typical_p[:, None] >= 1)


def sampler(device: torch.device, native_kernels: bool = True) -> Sampler:
    """``sample_next`` as fast as ``device`` runs it: the native op on the CPU where it loads
    (the same ids but where a draw lies within float rounding of the edge between two
    characters; tests/test_sampling.py), else ``sample_next`` itself."""
    # Imported here, not by the package: ``python -m charrnn.native`` runs that module as a
    # script, which must not find it imported already.
    from charrnn import native

    if device.type == "cpu" and native_kernels and native.load():
        return torch.ops.charrnn.sample.default
    return sample_next
