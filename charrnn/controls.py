"""Generation controls: what a request may ask of the sampler beyond temperature, top-k and
top-p (the contract's "Generation controls"), one set per row.

Order, per step: ``logit_bias``; ``repetition_penalty``, ``presence_penalty``,
``frequency_penalty`` over the last ``penalty_last_n`` characters (prime + generated); DRY;
``banned_strings`` (and a constraint) as masks; temperature; top-k; ``typical_p``; top-p;
``min_p``. A row with the defaults samples bit for bit as without controls.

``ControlsBatch`` holds a batch's controls as CPU tensors, parameters and state, one row per
row of the batch: the native sampler (charrnn/csrc/decode.cpp) reads them and advances the
state in place after each draw; the reference (``charrnn.sampling.sample_next``) reads the
same tensors and ``ControlsBatch.record`` advances them the same way. The state is each
row's recent text (``history``, with the penalty window's character ``counts`` and DRY's
``matches``) and its place in two Aho–Corasick automata over character ids (``Machine``):
DRY's sequence breakers and the banned strings.

The copy guard (the contract's "Your own models") rides here too, for a model saved with its
training text's index (charrnn/textindex.py, shared by the batch's rows): ``max_copy_chars``
follows the longest suffix of the generated text that occurs in the training text, at most
that long, and once it is, forbids the characters that would make it longer; ``novel_lines``
keeps the current line's key and forbids the newline (and "end") that would close a
training line, and at the generation's last step each character that would finish one. Both
act as masks, computed only at the steps where they bite (elsewhere the row samples as
without them): the forbidden characters' mass leaves the row, and "end" comes where nothing
is left, as for a constraint's match that no character continues (with a constraint, "end"
keeps the mass its mask gives it, but never where it would close a training line)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from charrnn.textindex import LINE_P, Match, TextIndex, next_line_key

MAX_BIAS = 100.0
MAX_PENALTY_LAST_N = 4096
MAX_DRY_BREAKERS = 16
MAX_DRY_BREAKER_CHARS = 16
MAX_DRY_ALLOWED_LENGTH = 256
MAX_BANNED_STRINGS = 64
MAX_BANNED_CHARS = 64
MIN_COPY_CHARS, MAX_COPY_CHARS = 4, 256
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Controls:
    """One row's controls. ``logit_bias`` maps a character's id to the value added to its
    logit; ``banned_strings`` are texts that must never end inside the generated text."""

    logit_bias: tuple[tuple[int, float], ...] = ()
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 8
    dry_sequence_breakers: tuple[str, ...] = ("\n",)
    dry_penalty_last_n: int = 1024
    banned_strings: tuple[str, ...] = ()
    min_p: float = 0.0
    typical_p: float = 1.0
    # The copy guard: no run of more than this many generated characters occurs in the
    # training text (None: off); no generated line is a line of the training text.
    max_copy_chars: int | None = None
    novel_lines: bool = False
    # novel_lines: the generation's max_new_chars, whose last step must not finish a
    # training line either (0 without novel_lines).
    length: int = 0

    def __post_init__(self) -> None:
        for i, b in self.logit_bias:
            if not (i >= 0 and math.isfinite(b) and -MAX_BIAS <= b <= MAX_BIAS):
                raise ValueError(f"logit_bias: {b} for id {i} is outside [-100, 100]")
        if not 0 < self.repetition_penalty <= 10:
            raise ValueError("repetition_penalty must be in (0, 10]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2]")
        for name in ("penalty_last_n", "dry_penalty_last_n"):
            if not 0 <= getattr(self, name) <= MAX_PENALTY_LAST_N:
                raise ValueError(f"{name} must be in [0, {MAX_PENALTY_LAST_N}]")
        if not 0 <= self.dry_multiplier <= 10:
            raise ValueError("dry_multiplier must be in [0, 10]")
        if not 1 < self.dry_base <= 4:
            raise ValueError("dry_base must be in (1, 4]")
        if not 1 <= self.dry_allowed_length <= MAX_DRY_ALLOWED_LENGTH:
            raise ValueError(f"dry_allowed_length must be in [1, {MAX_DRY_ALLOWED_LENGTH}]")
        if len(self.dry_sequence_breakers) > MAX_DRY_BREAKERS or not all(
            1 <= len(b) <= MAX_DRY_BREAKER_CHARS for b in self.dry_sequence_breakers
        ):
            raise ValueError("dry_sequence_breakers: at most 16 strings of 1 to 16 characters")
        if len(self.banned_strings) > MAX_BANNED_STRINGS or not all(
            1 <= len(b) <= MAX_BANNED_CHARS for b in self.banned_strings
        ):
            raise ValueError("banned_strings: at most 64 strings of 1 to 64 characters")
        if not 0 <= self.min_p < 1:
            raise ValueError("min_p must be in [0, 1)")
        if not 0 < self.typical_p <= 1:
            raise ValueError("typical_p must be in (0, 1]")
        copy = self.max_copy_chars
        if copy is not None and not MIN_COPY_CHARS <= copy <= MAX_COPY_CHARS:
            raise ValueError(f"max_copy_chars must be in [{MIN_COPY_CHARS}, {MAX_COPY_CHARS}]")

    @property
    def guarded(self) -> bool:
        """Whether the copy guard is asked for (it needs the model's text index)."""
        return self.max_copy_chars is not None or self.novel_lines

    @property
    def active(self) -> bool:
        """Whether anything differs from plain sampling."""
        return self != DEFAULT


DEFAULT = Controls()


# The columns of ControlsBatch's tensors and of a Machine's nodes; charrnn/csrc/decode.cpp
# reads them by the same numbers.
# ``params`` (float64): the row's numbers.
REPETITION, PRESENCE, FREQUENCY, DRY_MULTIPLIER, DRY_BASE, TYPICAL_P, MIN_P = range(7)
# ``limits`` (int64): which controls the row has (FLAGS), its windows, its history's capacity,
# where its automata's nodes begin in the batch's (-1: none), max_copy_chars (0: off) and the
# newline's id (-1: none).
FLAGS, PENALTY_LAST_N, DRY_LAST_N, DRY_ALLOWED, CAPACITY, BREAKER_BASE, BAN_BASE = range(7)
MAX_COPY, NEWLINE = 7, 8
LIMITS = 9
# ``cursor`` (int64): the row's state besides its history: the characters in ``history``,
# those read since a DRY sequence breaker last ended, its two automata's states; the copy
# guard's match (a ``textindex.Match``: suffix-array rows [COPY_LO, COPY_HI), COPY_LEN long),
# the current line's key (``textindex.line_key``, its 64 bits as int64) and length, and the
# characters left to generate.
LENGTH, SINCE, BREAKER_STATE, BAN_STATE = range(4)
COPY_LO, COPY_HI, COPY_LEN, LINE_KEY, LINE_LEN, LEFT = range(4, 10)
CURSORS = 10
# A Machine's ``nodes`` (int32): its edges and done ids (into the batch's), its fail link (a
# state of the same machine, -1 for the root) and whether a string ends there.
EDGE_BEGIN, EDGE_END, FAIL, DONE_BEGIN, DONE_END, ENDS = range(6)
# The bits of FLAGS. A row without any samples exactly as without controls.
BIAS, PENALTIES, DRY, BANS, SHAPE, COPY, LINES = 1, 2, 4, 8, 16, 32, 64

FLOAT32_MAX = float(np.finfo(np.float32).max)
# llama.cpp's bound on DRY's exponent, log(FLT_MAX): base ** exponent stays finite.
DRY_MAX_LOG = 88.7228391


@dataclass(frozen=True, eq=False)
class Machine:
    """An Aho–Corasick automaton over character ids. A state is the longest suffix of the text
    read so far that begins one of the strings (0, the root: none); ``done[s]`` are the
    characters that would end a string after state ``s``, ``ends[s]`` whether one ends at
    ``s``. ``nodes``, ``edges`` and ``done_ids`` hold the same for the native code."""

    children: tuple[dict[int, int], ...]
    fail: tuple[int, ...]
    done: tuple[tuple[int, ...], ...]
    ends: tuple[bool, ...]
    nodes: torch.Tensor  # int32 [S, 6]: EDGE_BEGIN .. ENDS
    edges: torch.Tensor  # int32 [E, 2]: (character, next state), each state's by character
    done_ids: torch.Tensor  # int32 [D]

    def next(self, state: int, char: int) -> int:
        """The state after reading ``char`` in ``state``."""
        while state >= 0:
            nxt = self.children[state].get(char)
            if nxt is not None:
                return nxt
            state = self.fail[state]
        return 0

    def run(self, chars: Iterable[int]) -> int:
        """The state after reading ``chars`` from the root."""
        state = 0
        for c in chars:
            state = self.next(state, c)
        return state


@functools.lru_cache(maxsize=256)
def machine(strings: tuple[tuple[int, ...], ...]) -> Machine:
    """The automaton of ``strings`` (non-empty id sequences), one object per set of strings."""
    children: list[dict[int, int]] = [{}]
    terminal = [False]
    for string in strings:
        node = 0
        for c in string:
            if c not in children[node]:
                children[node][c] = len(children)
                children.append({})
                terminal.append(False)
            node = children[node][c]
        terminal[node] = True
    fail = [-1] * len(children)
    order = [0]  # breadth first: a state's fail link is known before its children's
    for s in order:
        for c, t in children[s].items():
            f = fail[s]
            while f >= 0 and c not in children[f]:
                f = fail[f]
            fail[t] = children[f][c] if f >= 0 else 0
            order.append(t)
    done: list[tuple[int, ...]] = [()] * len(children)
    ends = [False] * len(children)
    for s in order:
        inherited = done[fail[s]] if fail[s] >= 0 else ()
        done[s] = tuple(sorted({c for c, t in children[s].items() if terminal[t]}.union(inherited)))
        ends[s] = terminal[s] or (fail[s] >= 0 and ends[fail[s]])
    nodes, edges, done_ids = [], [], []
    for s in range(len(children)):
        e, d = len(edges), len(done_ids)
        edges += sorted(children[s].items())
        done_ids += done[s]
        nodes.append((e, len(edges), fail[s], d, len(done_ids), ends[s]))
    return Machine(
        tuple(children),
        tuple(fail),
        tuple(done),
        tuple(ends),
        torch.tensor(nodes, dtype=torch.int32).view(-1, 6),
        torch.tensor(edges, dtype=torch.int32).view(-1, 2),
        torch.tensor(done_ids, dtype=torch.int32),
    )


def machine_of(
    strings: Sequence[str], char_ids_of: Callable[[str], Sequence[int] | None]
) -> Machine | None:
    """The automaton of ``strings`` as character ids, or None where none is left: a string
    with a character outside the vocabulary (``char_ids_of`` returns None or raises
    ValueError/KeyError) can never occur, so it is dropped."""
    kept = set()
    for s in strings:
        try:
            ids = char_ids_of(s)
        except (KeyError, ValueError):
            continue
        if ids:
            kept.add(tuple(int(i) for i in ids))
    return machine(tuple(sorted(kept))) if kept else None


def _side_by_side(machines: Sequence[Machine]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The nodes, edges and done ids of ``machines`` in one set of tensors, in that order (a
    machine's states stay its own: a row adds its machine's first node, its base)."""
    nodes, edges, done = [], [], []
    n_edges = n_done = 0
    for m in machines:
        shifted = m.nodes.clone()
        shifted[:, EDGE_BEGIN : EDGE_END + 1] += n_edges
        shifted[:, DONE_BEGIN : DONE_END + 1] += n_done
        nodes.append(shifted)
        edges.append(m.edges)
        done.append(m.done_ids)
        n_edges += len(m.edges)
        n_done += len(m.done_ids)
    return (
        torch.cat([torch.zeros(0, 6, dtype=torch.int32), *nodes]),
        torch.cat([torch.zeros(0, 2, dtype=torch.int32), *edges]),
        torch.cat([torch.zeros(0, dtype=torch.int32), *done]),
    )


def _suffix_matches(ids: Sequence[int]) -> list[int]:
    """For each position j but the last, how many characters end both at j and at the end of
    ``ids`` (the longest common suffix of ``ids[:j + 1]`` and ``ids``); 0 for the last. The
    Z-algorithm on the reversed text."""
    r = list(ids)[::-1]
    n = len(r)
    z = [0] * n
    left = right = 0
    for k in range(1, n):
        if k < right:
            z[k] = min(right - k, z[k - left])
        while k + z[k] < n and r[z[k]] == r[k + z[k]]:
            z[k] += 1
        if k + z[k] > right:
            left, right = k, k + z[k]
    return [z[n - 1 - j] for j in range(n - 1)] + [0] * min(n, 1)


def _common_suffixes(text: np.ndarray) -> np.ndarray:
    """``_suffix_matches`` of ``text`` without the last, directly: one comparison of every
    position per character of the longest match (the reference's DRY)."""
    n = max(len(text), 1)
    j = np.arange(n - 1)
    length = np.zeros(n - 1, dtype=np.int64)
    alive = np.ones(n - 1, dtype=bool)
    for k in range(n - 1):
        alive &= (j >= k) & (text[np.maximum(j - k, 0)] == text[n - 1 - k])
        if not alive.any():
            break
        length += alive
    return length


def _flags(c: Controls, bias: torch.Tensor, bans: Machine | None) -> int:
    penalties = c.repetition_penalty != 1 or c.presence_penalty != 0 or c.frequency_penalty != 0
    return (
        (BIAS if bool(bias.any()) else 0)
        | (PENALTIES if penalties and c.penalty_last_n > 0 else 0)
        | (DRY if c.dry_multiplier > 0 and c.dry_penalty_last_n > 0 else 0)
        | (BANS if bans is not None else 0)
        | (SHAPE if c.typical_p < 1 or c.min_p > 0 else 0)
        | (COPY if c.max_copy_chars is not None else 0)
        | (LINES if c.novel_lines else 0)
    )


def _index_tensors(index: TextIndex | None) -> list[torch.Tensor]:
    """The native code's view of a text index: its ids then -1 (int32), its suffix array
    (int32) and its line keys (uint64 bits as int64, sorted as unsigned)."""
    if index is None:
        end = torch.full((1,), -1, dtype=torch.int32)
        return [end, torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int64)]
    return [
        torch.from_numpy(index.ids_end),
        torch.from_numpy(np.ascontiguousarray(index.sa, dtype=np.int32)),
        torch.from_numpy(index.line_keys.view(np.int64)),
    ]


def _since(breakers: Machine | None, chars: Iterable[int]) -> tuple[int, int]:
    """(the breakers' state, the characters since one last ended) after reading ``chars``."""
    state = since = 0
    for c in chars:
        if breakers is None:
            since += 1
            continue
        state = breakers.next(state, c)
        since = 0 if breakers.ends[state] else since + 1
    return state, since


@dataclass
class ControlsBatch:
    """A batch's controls, one row per row of the batch: the parameters and the state that
    the samplers read, CPU tensors that the native sampler advances in place.

    A row's ``history`` holds the last characters of its text (prime and generated), at most
    ``CAPACITY`` (twice its longest window: when full, the older half is dropped); ``counts``
    the occurrences of each character in its last ``PENALTY_LAST_N``; ``matches[j]`` (DRY)
    how many characters end both at history position j and at the end of the text, exact
    within the DRY window (the longest common suffix; positions before the window may hold
    anything: every use clamps it to the window)."""

    bias: torch.Tensor  # float32 [B, V], added to the logits
    params: torch.Tensor  # float64 [B, 7]: REPETITION .. MIN_P
    limits: torch.Tensor  # int64 [B, LIMITS]: FLAGS .. NEWLINE
    counts: torch.Tensor  # int32 [B, V]
    history: torch.Tensor  # int32 [B, C], C >= each row's CAPACITY
    matches: torch.Tensor  # int32 [B, C]
    cursor: torch.Tensor  # int64 [B, CURSORS]: LENGTH .. LEFT
    breakers: list[Machine | None]  # each row's DRY sequence breakers
    bans: list[Machine | None]  # each row's banned strings
    # The training text's index that the copy guard reads (one model's: all rows share it).
    index: TextIndex | None = None
    # The rows' automata side by side (``_side_by_side``), as the native code reads them.
    nodes: torch.Tensor = field(init=False)
    edges: torch.Tensor = field(init=False)
    done: torch.Tensor = field(init=False)
    _index_tensors: list[torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._index_tensors = _index_tensors(self.index)
        unique = list({id(m): m for m in self.breakers + self.bans if m is not None}.values())
        self.nodes, self.edges, self.done = _side_by_side(unique)
        base, at = {}, 0
        for m in unique:
            base[id(m)] = at
            at += len(m.nodes)
        for column, machines in ((BREAKER_BASE, self.breakers), (BAN_BASE, self.bans)):
            self.limits[:, column] = torch.tensor(
                [-1 if m is None else base[id(m)] for m in machines], dtype=torch.int64
            )

    def __len__(self) -> int:
        return len(self.bias)

    @property
    def vocab_size(self) -> int:
        return self.bias.shape[1]

    @property
    def tensors(self) -> list[torch.Tensor]:
        """The native ops' ``controls`` argument."""
        return [
            self.bias,
            self.params,
            self.limits,
            self.counts,
            self.history,
            self.matches,
            self.cursor,
            self.nodes,
            self.edges,
            self.done,
            *self._index_tensors,
        ]

    @classmethod
    def plain(cls, rows: int, vocab_size: int) -> ControlsBatch:
        """``rows`` rows without controls (to mix with rows that have them)."""
        d = DEFAULT
        numbers = (1.0, 0.0, 0.0, 0.0, d.dry_base, 1.0, 0.0)
        return cls(
            torch.zeros(rows, vocab_size),
            torch.tensor([numbers] * rows, dtype=torch.float64).view(rows, 7),
            torch.zeros(rows, LIMITS, dtype=torch.int64),
            torch.zeros(rows, vocab_size, dtype=torch.int32),
            torch.zeros(rows, 0, dtype=torch.int32),
            torch.zeros(rows, 0, dtype=torch.int32),
            torch.zeros(rows, CURSORS, dtype=torch.int64),
            [None] * rows,
            [None] * rows,
        )

    @classmethod
    def of(
        cls,
        controls: Controls,
        vocab_size: int,
        prime_ids: Sequence[int] | torch.Tensor,
        char_ids_of: Callable[[str], Sequence[int] | None],
        index: TextIndex | None = None,
    ) -> ControlsBatch:
        """One row of ``controls``, its state after the prime ``prime_ids``. Banned strings
        and sequence breakers are text, turned into ids by ``char_ids_of`` (for instance
        ``Vocabulary.encode``); one that the vocabulary cannot spell is dropped. ValueError
        for a ``logit_bias`` id outside the vocabulary, or for the copy guard without
        ``index`` (the training text's, under the same vocabulary)."""
        c = controls
        if c.guarded and (index is None or len(index.vocab) != vocab_size):
            raise ValueError("the copy guard needs the model's training text index")
        prime = [int(i) for i in prime_ids]
        bias = torch.zeros(1, vocab_size)
        for i, value in c.logit_bias:
            if i >= vocab_size:
                raise ValueError(f"logit_bias: id {i} is outside the vocabulary of {vocab_size}")
            bias[0, i] = value
        bans = machine_of(c.banned_strings, char_ids_of)
        flags = _flags(c, bias, bans)
        dry = bool(flags & DRY)
        breakers = machine_of(c.dry_sequence_breakers, char_ids_of) if dry else None
        window = c.penalty_last_n if flags & PENALTIES else 0
        dry_window = c.dry_penalty_last_n if dry else 0
        keep = max(window, dry_window)
        tail = prime[max(0, len(prime) - keep) :] if keep else []
        history = torch.zeros(1, 2 * keep, dtype=torch.int32)
        history[0, : len(tail)] = torch.tensor(tail, dtype=torch.int32)
        matches = torch.zeros(1, 2 * keep, dtype=torch.int32)
        if dry:
            matches[0, : len(tail)] = torch.tensor(_suffix_matches(tail), dtype=torch.int32)
        counts = torch.zeros(1, vocab_size, dtype=torch.int32)
        if window:
            seen = torch.tensor(prime[max(0, len(prime) - window) :], dtype=torch.int64)
            counts[0] = torch.bincount(seen, minlength=vocab_size).to(torch.int32)
        # A breaker or banned string that began in the prime may end in the text: the
        # automata start where the prime's tail leaves them.
        breaker_state, since = (
            _since(breakers, prime[max(0, len(prime) - dry_window - MAX_DRY_BREAKER_CHARS) :])
            if dry
            else (0, 0)
        )
        ban_state = bans.run(prime[-MAX_BANNED_CHARS:]) if bans is not None else 0
        numbers = (
            c.repetition_penalty,
            c.presence_penalty,
            c.frequency_penalty,
            c.dry_multiplier,
            c.dry_base,
            c.typical_p,
            c.min_p,
        )
        limits = (flags, window, dry_window, c.dry_allowed_length, 2 * keep, -1, -1)
        limits += (c.max_copy_chars or 0, index.newline if index is not None else -1)
        # The guard starts with the generation: the prime is the client's text, not a copy.
        guard = (0, len(index) if index is not None else 0, 0, 0, 0, c.length)
        return cls(
            bias,
            torch.tensor([numbers], dtype=torch.float64),
            torch.tensor([limits], dtype=torch.int64),
            counts,
            history,
            matches,
            torch.tensor([[len(tail), since, breaker_state, ban_state, *guard]], dtype=torch.int64),
            [breakers],
            [bans],
            index if c.guarded else None,
        )

    def select(self, keep: Sequence[int]) -> ControlsBatch:
        """The rows ``keep``, in that order (a copy: the new batch's state is its own)."""
        idx = torch.tensor(list(keep), dtype=torch.int64)
        limits = self.limits.index_select(0, idx)
        width = int(limits[:, CAPACITY].max()) if len(idx) else 0
        return ControlsBatch(
            self.bias.index_select(0, idx),
            self.params.index_select(0, idx),
            limits,
            self.counts.index_select(0, idx),
            self.history.index_select(0, idx)[:, :width].contiguous(),
            self.matches.index_select(0, idx)[:, :width].contiguous(),
            self.cursor.index_select(0, idx),
            [self.breakers[i] for i in keep],
            [self.bans[i] for i in keep],
            self.index,
        )

    @staticmethod
    def concat(parts: Sequence[ControlsBatch]) -> ControlsBatch:
        """The rows of ``parts``, one after another."""
        width = max(p.history.shape[1] for p in parts)

        def wide(t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]))

        return ControlsBatch(
            torch.cat([p.bias for p in parts]),
            torch.cat([p.params for p in parts]),
            torch.cat([p.limits for p in parts]),
            torch.cat([p.counts for p in parts]),
            torch.cat([wide(p.history) for p in parts]),
            torch.cat([wide(p.matches) for p in parts]),
            torch.cat([p.cursor for p in parts]),
            [m for p in parts for m in p.breakers],
            [m for p in parts for m in p.bans],
            next((p.index for p in parts if p.index is not None), None),
        )

    def repeat(self, n: int) -> ControlsBatch:
        """Each row ``n`` times in a row (one prime's state for ``n`` samples)."""
        return self.select([b for b in range(len(self)) for _ in range(n)])

    # --- The state's update: the Python path's counterpart of decode.cpp's ``record``.

    def record(self, ids: torch.Tensor | Sequence[int]) -> None:
        """Advances each row by the id it drew; "end" (id V) leaves a row as it was."""
        drawn = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        for b, (flags, c) in enumerate(zip(self.limits[:, FLAGS].tolist(), drawn, strict=True)):
            if flags and c < self.vocab_size:
                self._advance(b, int(c), flags)

    def _advance(self, b: int, c: int, flags: int) -> None:
        cursor = self.cursor[b].numpy()
        if flags & (PENALTIES | DRY):
            self._push(b, c, flags)
        if flags & DRY:
            breakers = self.breakers[b]
            if breakers is None:
                cursor[SINCE] += 1
            else:
                cursor[BREAKER_STATE] = breakers.next(int(cursor[BREAKER_STATE]), c)
                cursor[SINCE] = 0 if breakers.ends[cursor[BREAKER_STATE]] else cursor[SINCE] + 1
        if flags & BANS:
            cursor[BAN_STATE] = self.bans[b].next(int(cursor[BAN_STATE]), c)  # type: ignore[union-attr]
        if flags & (COPY | LINES):
            self._guard_advance(b, c, flags)

    def _guard_advance(self, b: int, c: int, flags: int) -> None:
        index, cursor = self.index, self.cursor[b].numpy()
        assert index is not None
        if flags & COPY:
            m = Match(int(cursor[COPY_LO]), int(cursor[COPY_HI]), int(cursor[COPY_LEN]))
            m = index.advance(m, c, int(self.limits[b, MAX_COPY]))
            cursor[COPY_LO], cursor[COPY_HI], cursor[COPY_LEN] = m.lo, m.hi, m.length
        if flags & LINES:
            if c == index.newline:
                key, length = 0, 0
            else:
                key, length = next_line_key(self._line_key(b), c), cursor[LINE_LEN] + 1
            cursor[LINE_KEY] = np.array(key, dtype=np.uint64).view(np.int64)
            cursor[LINE_LEN] = length
        cursor[LEFT] -= 1

    def _line_key(self, b: int) -> int:
        return int(self.cursor[b, LINE_KEY]) & _MASK64

    def _push(self, b: int, c: int, flags: int) -> None:
        """Appends ``c`` to row b's history, and moves its penalty counts and DRY matches."""
        history, matches = self.history[b].numpy(), self.matches[b].numpy()
        cursor = self.cursor[b].numpy()
        _, window, dry_window, _, capacity = self.limits[b, :5].tolist()
        n = int(cursor[LENGTH])
        if n == capacity:  # full: keep the newer half
            keep = capacity // 2
            history[:keep] = history[n - keep : n].copy()
            matches[:keep] = matches[n - keep : n].copy()
            n = keep
        if flags & PENALTIES:
            counts = self.counts[b].numpy()
            if n >= window:
                counts[history[n - window]] -= 1
            counts[c] += 1
        if flags & DRY:
            # A match at j goes on where the character at j is c, from the one at j - 1.
            lo = max(0, n + 1 - dry_window)
            j = np.arange(lo, n)
            before = np.where(j > 0, matches[np.maximum(j - 1, 0)], 0)
            matches[lo:n] = np.where(history[lo:n] == c, before + 1, 0)
        matches[n] = 0
        history[n] = c
        cursor[LENGTH] = n + 1

    # --- The reference's view of the controls (charrnn.sampling.sample_next).

    def adjusted(self, logits: torch.Tensor) -> torch.Tensor:
        """float32 [B, V]: ``logits`` after each row's bias, penalties and DRY, in that order
        (rows without them as they are)."""
        x = logits.float().clone()
        for b, flags in enumerate(self.limits[:, FLAGS].tolist()):
            if flags & BIAS:
                x[b] = x[b] + self.bias[b].to(x.device)
            if flags & PENALTIES:
                x[b] = self._penalised(b, x[b])
            if flags & DRY:
                x[b] = self._dry(b, x[b])
        return x

    def _penalised(self, b: int, row: torch.Tensor) -> torch.Tensor:
        """Row b's repetition, presence and frequency penalties, on the characters seen in
        its window (as llama.cpp: a positive logit divided by r, a negative one multiplied by
        r, then count * frequency + presence subtracted), in float32."""
        r, presence, frequency = (
            torch.tensor(v, dtype=torch.float32, device=row.device)
            for v in self.params[b, [REPETITION, PRESENCE, FREQUENCY]].tolist()
        )
        n = self.counts[b].to(row.device)
        out = torch.where(row > 0, row / r, row * r) - (n.float() * frequency + presence)
        return torch.where(n > 0, out, row)

    def _dry(self, b: int, row: torch.Tensor) -> torch.Tensor:
        """Row b's DRY: multiplier * base ** (L - allowed) off each character that would extend
        a repeat of length L >= allowed (the exponent at most llama.cpp's bound, the penalty at
        most float32's largest)."""
        multiplier, base = self.params[b, [DRY_MULTIPLIER, DRY_BASE]].tolist()
        allowed = int(self.limits[b, DRY_ALLOWED])
        top = int(DRY_MAX_LOG / math.log(base))
        row = row.clone()
        for c, length in self.repeats(b).items():
            penalty = min(multiplier * base ** min(length - allowed, top), FLOAT32_MAX)
            row[c] = row[c] - torch.tensor(penalty, dtype=torch.float32, device=row.device)
        return row

    def repeats(self, b: int) -> dict[int, int]:
        """DRY for row b: each character that would extend a repeat of at least
        ``dry_allowed_length`` characters, with the longest such repeat: a suffix of the
        window's text that occurred earlier, no longer than the text since a sequence breaker
        last ended. A one-character breaker is never penalised."""
        n = int(self.cursor[b, LENGTH])
        w = min(n, int(self.limits[b, DRY_LAST_N]))
        text = self.history[b, n - w : n].numpy()
        since = int(self.cursor[b, SINCE])
        allowed = int(self.limits[b, DRY_ALLOWED])
        breakers = self.breakers[b]
        singles = set(breakers.done[0]) if breakers is not None else set()
        length = np.minimum(_common_suffixes(text), since)
        out: dict[int, int] = {}
        for j in np.flatnonzero(length >= allowed).tolist():
            c = int(text[j + 1])
            if c not in singles:
                out[c] = max(out.get(c, 0), int(length[j]))
        return out

    def forbidden(self) -> torch.Tensor:
        """bool [B, V]: the characters that would end a banned string at each row's next step."""
        out = torch.zeros(len(self), self.vocab_size, dtype=torch.bool)
        for b, bans in enumerate(self.bans):
            if bans is not None:
                out[b, list(bans.done[int(self.cursor[b, BAN_STATE])])] = True
        return out

    def guard(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(bool [B, V]: the characters the copy guard forbids at each row's next step, bool
        [B]: whether the row may draw "end" there), or None where no row has the guard."""
        flags = self.limits[:, FLAGS].tolist()
        if not any(f & (COPY | LINES) for f in flags):
            return None
        index, v = self.index, self.vocab_size
        assert index is not None
        forbid = torch.zeros(len(self), v, dtype=torch.bool)
        end = torch.ones(len(self), dtype=torch.bool)
        for b, f in enumerate(flags):
            cursor = self.cursor[b].tolist()
            if f & COPY and cursor[COPY_LEN] == int(self.limits[b, MAX_COPY]):
                m = Match(cursor[COPY_LO], cursor[COPY_HI], cursor[COPY_LEN])
                forbid[b, index.next_chars(m).tolist()] = True
            if f & LINES:
                key, newline = self._line_key(b), index.newline
                if cursor[LINE_LEN] > 0 and index.is_line_key(key):
                    end[b] = False  # the text would end on a training line
                    if newline >= 0:
                        forbid[b, newline] = True
                if cursor[LEFT] == 1:  # the last character: it ends the last line
                    ids = np.arange(1, v + 1, dtype=np.uint64)
                    with np.errstate(over="ignore"):
                        keys = np.uint64(key) * np.uint64(LINE_P) + ids
                    last = torch.from_numpy(np.isin(keys, index.line_keys))
                    if newline >= 0:
                        last[newline] = False
                    forbid[b] |= last
        return forbid, end

    def shape(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(typical_p float64 [B], min_p float32 [B]) where a row has either, else None."""
        if not (self.limits[:, FLAGS] & SHAPE).any():
            return None
        return self.params[:, TYPICAL_P].clone(), self.params[:, MIN_P].float()
