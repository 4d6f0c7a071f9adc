"""The corpus as memory-mapped ids, and the notebook's contiguous-stream batches as views of it.

A corpus is encoded once, vectorised (UTF-8 -> code points -> ids through a lookup table, a few
megabytes at a time), into a compact ``.npy`` array of ids: uint8, uint16 or int32 as the
vocabulary needs. The array lives in a cache keyed by the corpus's sha256 and is memory-mapped
on every start, resume and rank, so the corpus costs page cache, not process memory (the
references: nanoGPT's ``np.memmap`` over uint16 ``.bin`` files, char-rnn's ByteTensor). Each
training step copies only its ``[batch, seq_len + 1]`` window.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from charrnn.checkpoint import atomic_write
from charrnn.vocab import UnknownCharactersError, Vocabulary
from training.errors import TrainingError

READ_BYTES = 1 << 23  # 8 MiB of text at a time: fast, and a small fraction of memory
MAX_CODE_POINT = 0x110000
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$CHARRNN_CACHE_DIR``, else ``$XDG_CACHE_HOME/charrnn/ids``, else ``~/.cache/...``."""
    if env := os.environ.get("CHARRNN_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "charrnn" / "ids"


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise TrainingError(f"data file not found: {path}")
    if not os.access(path, os.R_OK):
        raise TrainingError(f"cannot read data file {path}: permission denied")


def _chunks(path: Path, start: int = 0) -> Iterator[tuple[int, bytes]]:
    """(byte offset, bytes) of the file from ``start``, READ_BYTES at a time."""
    try:
        with path.open("rb") as f:
            f.seek(start)
            offset = start
            while chunk := f.read(READ_BYTES):
                yield offset, chunk
                offset += len(chunk)
    except OSError as e:
        raise TrainingError(f"cannot read data file {path}: {e.strerror}") from None


def code_points(path: Path, start: int = 0) -> Iterator[tuple[np.ndarray, bytes]]:
    """The file's characters as uint32 code points, a chunk at a time, with the raw bytes.

    Refuses non-UTF-8 text in one line that names the byte."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    end = start
    for offset, raw in _chunks(path, start):
        yield _decode(decoder, path, raw, offset, final=False), raw
        end = offset + len(raw)
    yield _decode(decoder, path, b"", end, final=True), b""


def _decode(
    decoder: codecs.IncrementalDecoder, path: Path, raw: bytes, offset: int, final: bool
) -> np.ndarray:
    pending = decoder.getstate()[0]
    try:
        text = decoder.decode(raw, final=final)
    except UnicodeDecodeError as e:
        bad = (pending + raw)[e.start : e.start + 1]
        at = offset - len(pending) + e.start
        raise TrainingError(f"data file is not valid UTF-8: {path} (byte {at}: {bad!r})") from None
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


@dataclass(frozen=True)
class Scan:
    sha256: str
    counts: np.ndarray  # occurrences of each code point
    n_chars: int


def scan(path: Path) -> Scan:
    """One pass over the file: its hash, its characters, and whether it holds any text."""
    _check_file(path)
    digest = hashlib.sha256()
    counts = np.zeros(MAX_CODE_POINT, dtype=np.int64)
    n, blank = 0, True
    for cps, raw in code_points(path):
        digest.update(raw)
        blank = blank and not raw.strip()
        if len(cps):
            counts += np.bincount(cps, minlength=MAX_CODE_POINT)
            n += len(cps)
    if blank:
        raise TrainingError(f"data file is empty: {path}")
    return Scan(digest.hexdigest(), counts, n)


def file_sha256(path: Path) -> str:
    """sha256 of the file's bytes (= of its UTF-8 text), the id cache's key."""
    _check_file(path)
    digest = hashlib.sha256()
    for _, raw in _chunks(path):
        digest.update(raw)
    return digest.hexdigest()


def id_dtype(vocab_size: int) -> np.dtype:
    """The narrowest array type that holds every id."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def lookup_table(vocab: Vocabulary) -> tuple[np.ndarray, np.ndarray]:
    """code point -> id (and a mask of the code points the vocabulary knows)."""
    cps = np.frombuffer(vocab.chars.encode("utf-32-le"), dtype=np.uint32)
    table = np.zeros(MAX_CODE_POINT, dtype=id_dtype(len(vocab)))
    table[cps] = np.arange(len(vocab))
    known = np.zeros(MAX_CODE_POINT, dtype=bool)
    known[cps] = True
    return table, known


def encode_array(vocab: Vocabulary, cps: np.ndarray) -> np.ndarray:
    """Code points -> ids, vectorised; unknown characters raise UnknownCharactersError."""
    table, known = lookup_table(vocab)
    ok = known[cps]
    if not ok.all():
        bad = np.flatnonzero(~ok)
        first: dict[str, int] = {}
        for pos in bad[:1000].tolist():
            first.setdefault(chr(int(cps[pos])), pos)
        raise UnknownCharactersError(list(first.items())[:10])
    return table[cps]


# -- the id cache ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    """A corpus's ids (memory-mapped, read-only), its vocabulary and its hash."""

    ids: np.ndarray
    vocab: Vocabulary
    sha256: str

    def __len__(self) -> int:
        return len(self.ids)

    def split(self, val_frac: float) -> tuple[np.ndarray, np.ndarray]:
        """The last ``val_frac`` of the characters is held out for validation (views)."""
        cut = int(len(self.ids) * (1 - val_frac))
        return self.ids[:cut], self.ids[cut:]


def _cache_key(sha: str, base: Vocabulary | None) -> str:
    """The corpus's sha256, and for ids under a vocabulary grown from ``base`` (continued
    training) a digest of ``base`` too: the grown vocabulary is a function of the two."""
    if base is None:
        return sha
    return f"{sha}.{hashlib.sha256(base.chars.encode('utf-8')).hexdigest()[:16]}"


def _cache_paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    return cache_dir / f"{key}.ids.npy", cache_dir / f"{key}.vocab.json"


def _temp_prefix(sha: str) -> str:
    return f".{sha}.ids.npy.{socket.gethostname()}."


def _remove_stale_temps(cache_dir: Path, sha: str) -> None:
    """Delete temp files of builds on this host whose process is gone (a kill -9)."""
    prefix = _temp_prefix(sha)
    for tmp in cache_dir.glob(prefix + "*.tmp"):
        pid = tmp.name[len(prefix) : -len(".tmp")]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, someone else's


def _open_cached(cache_dir: Path, sha: str, base: Vocabulary | None = None) -> Corpus | None:
    ids_path, vocab_path = _cache_paths(cache_dir, _cache_key(sha, base))
    try:
        info = json.loads(vocab_path.read_text(encoding="utf-8"))
        if info.get("version") != CACHE_VERSION:
            return None
        ids = np.load(ids_path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    vocab = Vocabulary(info["vocab"])
    if ids.shape != (info["n_chars"],) or ids.dtype != id_dtype(len(vocab)):
        return None
    return Corpus(ids, vocab, sha)


def _build(path: Path, cache_dir: Path, base: Vocabulary | None = None) -> Corpus:
    info = scan(path)
    chars = "".join(map(chr, np.flatnonzero(info.counts).tolist()))
    vocab = base.grow(chars) if base is not None else Vocabulary(chars)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainingError(f"cannot create the id cache {cache_dir}: {e.strerror}") from None
    key = _cache_key(info.sha256, base)
    _remove_stale_temps(cache_dir, key)
    ids_path, vocab_path = _cache_paths(cache_dir, key)
    tmp = cache_dir / f"{_temp_prefix(key)}{os.getpid()}.tmp"
    table, _ = lookup_table(vocab)
    try:
        # Plain writes, not a writable memory map: the written pages would count in the
        # process's memory (a 1 GB corpus is 2 GB of uint16 ids).
        with tmp.open("wb") as f:
            header = {
                "descr": np.lib.format.dtype_to_descr(table.dtype),
                "fortran_order": False,
                "shape": (info.n_chars,),
            }
            np.lib.format.write_array_header_1_0(f, header)
            at = 0
            for cps, _raw in code_points(path):
                f.write(table[cps].tobytes())
                at += len(cps)
            if at != info.n_chars:
                raise TrainingError(f"data file changed while it was being read: {path}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, ids_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The vocabulary file is written last: its presence says the ids beside it are complete.
    meta = {"version": CACHE_VERSION, "vocab": vocab.chars, "n_chars": info.n_chars}
    atomic_write(vocab_path, lambda f: f.write(json.dumps(meta).encode("utf-8")))
    corpus = _open_cached(cache_dir, info.sha256, base)
    assert corpus is not None
    return corpus


def load_corpus(
    path: str | Path,
    cache_dir: Path | None = None,
    sha: str | None = None,
    base: Vocabulary | None = None,
) -> Corpus:
    """The corpus's memory-mapped ids, encoded now if the cache does not hold them yet. With
    ``base`` (continued training), under ``base`` grown by the text's new characters
    (``Vocabulary.grow``) instead of the text's own sorted vocabulary."""
    path, cache_dir = Path(path), cache_dir or default_cache_dir()
    sha = sha or file_sha256(path)
    return _open_cached(cache_dir, sha, base) or _build(path, cache_dir, base)


# -- reading a tail with a given vocabulary (``training evaluate``) ------------------------------


def tail_ids(path: str | Path, vocab: Vocabulary, frac: float) -> np.ndarray:
    """The ids of the last ``frac`` of the file's characters under ``vocab`` (in memory)."""
    path = Path(path)
    info = scan(path)
    first = info.n_chars - int(info.n_chars * frac)
    out = np.empty(info.n_chars - first, dtype=id_dtype(len(vocab)))
    at, seen = 0, 0
    for cps, _raw in code_points(path):
        keep = cps[max(first - seen, 0) :]
        seen += len(cps)
        if len(keep):
            try:
                out[at : at + len(keep)] = encode_array(vocab, keep)
            except UnknownCharactersError as e:
                base = info.n_chars - len(out) + at
                raise UnknownCharactersError([(ch, base + pos) for ch, pos in e.unknown]) from None
            at += len(keep)
    return out


# -- batches -----------------------------------------------------------------------------------


class Batches:
    """The notebook's batches over ``ids``, read as views: batch i is, for each row r, the
    window ``ids[r * row_len + i * seq_len :][: seq_len + 1]`` (inputs, then targets shifted
    by one). Each row is one contiguous stream of the text, so the hidden state at the end of
    batch i is the right starting state for the same row in batch i + 1. With DDP each rank
    takes every world-th row."""

    def __init__(
        self,
        ids: np.ndarray,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world: int = 1,
        device: torch.device | str = "cpu",
    ):
        per_batch = batch_size * seq_len
        self.n_batches = (len(ids) - 1) // per_batch
        if self.n_batches < 1:
            raise TrainingError(
                f"text too short for one batch: {len(ids)} training characters, need at least "
                f"{per_batch + 1} (batch-size {batch_size} x seq-len {seq_len} + 1); "
                "lower --batch-size or --seq-len"
            )
        self.ids, self.seq_len, self.device = ids, seq_len, torch.device(device)
        row_len = self.n_batches * seq_len
        self.row_starts = np.arange(batch_size, dtype=np.int64)[rank::world] * row_len

    @property
    def rows(self) -> int:
        return len(self.row_starts)

    def window(self, i: int) -> np.ndarray:
        """Batch i's ``[rows, seq_len + 1]`` ids, copied out of the memory map as int64."""
        start = self.row_starts + i * self.seq_len
        out = np.empty((self.rows, self.seq_len + 1), dtype=np.int64)
        for r, s in enumerate(start.tolist()):
            out[r] = self.ids[s : s + self.seq_len + 1]
        return out

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of batch i on the device; targets are the inputs shifted by one."""
        w = torch.from_numpy(self.window(i))
        if self.device.type == "cuda":
            w = w.pin_memory().to(self.device, non_blocking=True)
        return w[:, :-1], w[:, 1:]


def make_batches(
    ids: np.ndarray | torch.Tensor, batch_size: int, seq_len: int, rank: int = 0, world: int = 1
) -> Batches:
    if isinstance(ids, torch.Tensor):
        ids = ids.cpu().numpy()
    return Batches(ids, batch_size, seq_len, rank, world)


def encode(vocab: Vocabulary, text: str) -> np.ndarray:
    """Text -> ids (vectorised), as the narrowest integer array."""
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return encode_array(vocab, cps)
