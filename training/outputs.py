"""Files written beside a checkpoint: the resumable last checkpoint, metrics.jsonl, the curve
and the training text's index."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from charrnn.checkpoint import atomic_write
from charrnn.textindex import TextIndex
from charrnn.vocab import Vocabulary
from training.errors import TrainingError


def last_path(out: Path) -> Path:
    return out.with_name(out.stem + ".last" + out.suffix)


def metrics_path(out: Path) -> Path:
    return out.with_name(out.stem + ".metrics.jsonl")


def curve_path(out: Path) -> Path:
    return out.with_name(out.stem + ".loss.png")


def write_index(data: Path, vocab: Vocabulary, corpus_sha256: str, dest: Path) -> dict[str, Any]:
    """Build the text index of ``data`` (charrnn/textindex.py) and save it at ``dest``; what
    it cost, as a summary."""
    t = time.perf_counter()
    try:
        text = data.read_text(encoding="utf-8")
    except OSError as e:
        raise TrainingError(f"cannot read data file {data}: {e.strerror}") from None
    try:
        index = TextIndex.build(text, vocab, corpus_sha256)
    except ValueError as e:  # a text past the int32 suffix array's reach
        raise TrainingError(f"cannot index {data}: {e}") from None
    built = time.perf_counter() - t
    try:
        index.save(dest)
    except OSError as e:
        raise TrainingError(f"cannot write the text index {dest}: {e.strerror}") from None
    return {
        "index": str(dest),
        "chars": len(index),
        "lines": len(index.line_keys),
        "build_s": round(built, 3),
        "bytes": dest.stat().st_size,
        "memory_bytes": index.nbytes,
    }


def prepare_out(out: Path) -> None:
    """Create the output folder (as nanoGPT does) and fail before training, not after an
    hour, when the output cannot be written."""
    parent = out.parent
    if out.is_dir():
        raise TrainingError(f"output path is a directory: {out}")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainingError(f"cannot create output directory {parent}: {e.strerror}") from None
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise TrainingError(f"cannot write to output directory {parent}: {e.strerror}") from None


def append_metrics(out: Path, record: dict[str, Any]) -> None:
    with metrics_path(out).open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def plot_curve(out: Path, history: list[dict[str, Any]]) -> None:
    """Train loss and validation NLL against steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train_loss"]) for r in history if "train_loss" in r]
    val = [(r["step"], r["val_nll"]) for r in history if "val_nll" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation NLL", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats / character")
    ax.set_title(out.stem)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(curve_path(out), lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
