"""The checkpoint format: one ``torch.save`` file of plain tensors, numbers and strings.

Loading uses ``torch.load(weights_only=True)``, which refuses any pickled object that is not
a tensor or a plain container, so a checkpoint can never run code. Writes are atomic (temp
file, fsync, rename), so a crash leaves the old file or the new one, never half of either.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from charrnn.model import CharRNN, ModelConfig
from charrnn.vocab import Vocabulary

FORMAT = "charrnn"
FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the path and the problem."""

    def __init__(self, path: str | os.PathLike[str], problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass
class Checkpoint:
    model: CharRNN
    vocab: Vocabulary
    meta: dict[str, Any] = field(default_factory=dict)
    # Extra entries (optimizer, scheduler, RNG, ...) present in resumable checkpoints.
    extra: dict[str, Any] = field(default_factory=dict)


def atomic_write(path: str | os.PathLike[str], write: Any) -> None:
    """Call ``write(file)`` on a temp file beside ``path`` and rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file owner-only; a checkpoint is meant to be read by others
        # (a service user, a container) like any file written with open().
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(
    path: str | os.PathLike[str],
    model: CharRNN,
    vocab: Vocabulary,
    meta: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write model, vocabulary, architecture and metadata (settings, metrics) atomically.

    ``meta`` must hold only plain values (str, int, float, bool, None, lists, dicts)."""
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vocab": vocab.chars,
        "config": model.config.to_dict(),
        "meta": meta or {},
        "state_dict": state_dict,
        **(extra or {}),
    }
    atomic_write(path, lambda f: torch.save(payload, f))


def _why(e: Exception) -> str:
    """The informative line of torch's long weights_only error."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "Unsupported" in ln or "error:" in ln.lower():
            return ln.split("error:", 1)[-1].strip()[:200]
    return lines[0][:200] if lines else type(e).__name__


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(path, "file not found")
    if path.is_dir():
        raise CheckpointError(path, "is a directory, not a checkpoint file")
    try:
        if path.stat().st_size == 0:
            raise CheckpointError(path, "file is empty")
        if not zipfile.is_zipfile(path):
            # torch.save writes a zip archive; anything else would go to the legacy unpickler,
            # which we never call.
            with path.open("rb") as f:
                head = f.read(2)
            if head[:1] == b"\x80":
                raise CheckpointError(
                    path, "refused to load: a raw pickle, which is never unpickled"
                )
            raise CheckpointError(path, "corrupt or truncated file (not a checkpoint archive)")
    except OSError as e:
        raise CheckpointError(path, f"cannot read the file: {e.strerror or e}") from None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            path, f"refused to load: it holds pickled objects other than tensors ({_why(e)})"
        ) from None
    except OSError as e:
        raise CheckpointError(path, f"cannot read the file: {e.strerror or e}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(path, f"corrupt or truncated file ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(path, "not a CharRNN checkpoint")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            path, f"unsupported format version {version!r} (this build reads {FORMAT_VERSION})"
        )
    return payload


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint into an eval-mode model on ``device``.

    Any problem raises ``CheckpointError`` naming the path."""
    path = Path(path)
    payload = _read(path)
    try:
        vocab = Vocabulary(payload["vocab"])
        config = ModelConfig(**payload["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(path, f"invalid vocabulary or architecture: {e}") from None
    if config.vocab_size != len(vocab):
        raise CheckpointError(
            path,
            f"vocabulary has {len(vocab)} characters but the model was built for "
            f"{config.vocab_size}",
        )
    model = CharRNN(config)
    try:
        model.load_state_dict(payload["state_dict"])
    except (KeyError, RuntimeError, TypeError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(path, f"weights do not match the architecture: {detail}") from None
    model.to(device).eval()
    known = {"format", "format_version", "vocab", "config", "meta", "state_dict"}
    extra = {k: v for k, v in payload.items() if k not in known}
    return Checkpoint(model=model, vocab=vocab, meta=dict(payload.get("meta") or {}), extra=extra)
