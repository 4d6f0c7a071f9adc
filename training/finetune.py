"""Continued training (``fit --init-from CHECKPOINT``): a run that starts from a checkpoint's
weights and architecture on a new text.

The vocabulary is the parent's with the new text's characters appended (``Vocabulary.grow``),
so every old id keeps its meaning and its rows of the embedding and the head are the parent's,
unchanged. A new character's rows start where the model can learn them quickly without
disturbing the old ones:

* its embedding row is the mean of the parent's rows: an input the network has seen the like
  of, not a random vector of another scale;
* its head row is the mean of the parent's head rows, and its bias is calibrated so that the
  grown model, before any step, gives it on average its frequency in the training text: over
  the first CALIBRATION_CHARS characters the mean of ``exp(w·h - logsumexp(old logits))`` is
  measured and the bias set to ``log(frequency) - log(that mean)``. A new character then
  starts as rare as it is (where a zero bias would give it a share like an average old
  character's, taken from every prediction of the old ones), and Adam, which moves a bias
  about one learning rate a step, need not walk it there over hundreds of steps.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from charrnn.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from charrnn.model import CharRNN
from charrnn.vocab import Vocabulary
from training.errors import TrainingError

# The settings that make a network's shape: with --init-from they are the parent's.
ARCHITECTURE = ("hidden", "layers", "embed", "cell")
CALIBRATION_CHARS = 8192  # training characters the new head biases are calibrated on
CALIBRATION_STREAM = 512  # ...read as streams of this many


@dataclass(frozen=True)
class Parent:
    """The checkpoint a run continues from."""

    path: Path
    checkpoint: Checkpoint
    sha256: str  # of the checkpoint file

    @property
    def vocab(self) -> Vocabulary:
        return self.checkpoint.vocab

    def architecture(self) -> dict[str, Any]:
        config = self.checkpoint.model.config
        return {k: getattr(config, k) for k in ARCHITECTURE}

    def meta(self, new_chars: str) -> dict[str, Any]:
        """What the child's ``meta.train.parent`` records."""
        metrics = self.checkpoint.meta.get("metrics", {})
        return {
            "path": str(self.path),
            "name": self.path.name,
            "sha256": self.sha256,
            "corpus_sha256": metrics.get("corpus_sha256"),
            "vocab_size": len(self.vocab),
            "new_chars": new_chars,
        }


def open_parent(path: Path) -> Parent:
    """Load the checkpoint to continue from; refused in one line when unusable."""
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise TrainingError(f"cannot continue from --init-from {e}") from None
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return Parent(path, ckpt, digest.hexdigest())


def check_architecture(given: dict[str, Any], parent: Parent) -> None:
    """Refuse an architecture setting that contradicts the parent's, naming the first."""
    have = parent.architecture()
    for key in ARCHITECTURE:
        if key in given and given[key] != have[key]:
            raise TrainingError(
                f"--{key} {given[key]} contradicts {parent.path}'s architecture ({key} "
                f"{have[key]}); leave it out with --init-from"
            )


@torch.no_grad()
def grow(model: CharRNN, parent: Parent, train_ids: np.ndarray) -> None:
    """Give ``model`` (built for the grown vocabulary) the parent's weights, and the new
    characters' rows as the module docstring says."""
    old = len(parent.vocab)
    source = parent.checkpoint.model.state_dict()
    target = model.state_dict()
    for key, value in source.items():
        if key in ("embed.weight", "head.weight", "head.bias"):
            target[key][:old] = value
        else:
            target[key].copy_(value)
    new = model.config.vocab_size - old
    if new:
        target["embed.weight"][old:] = source["embed.weight"].mean(0)
        target["head.weight"][old:] = source["head.weight"].mean(0)
        target["head.bias"][old:] = _calibrated_bias(model, old, train_ids)


def _calibrated_bias(model: CharRNN, old: int, train_ids: np.ndarray) -> torch.Tensor:
    """The new characters' head biases: log(frequency) - log(mean exp(w·h - logsumexp)),
    the mean over the first CALIBRATION_CHARS training characters (``model.head``'s new rows
    hold the mean weight ``w`` already)."""
    n = len(train_ids)
    counts = np.bincount(np.asarray(train_ids), minlength=model.config.vocab_size)[old:]
    freq = torch.from_numpy(np.maximum(counts, 1) / max(n, 1)).float()  # unseen: as if once
    take = min(n, CALIBRATION_CHARS)
    streams = max(take // CALIBRATION_STREAM, 1)
    length = take // streams
    sample = torch.from_numpy(np.asarray(train_ids[: streams * length], dtype=np.int64))
    device = model.head.weight.device
    was_training = model.training
    model.eval()
    x = model.embed(sample.view(streams, length).to(device))
    h, _ = model.rnn(x)
    w, b = model.head.weight, model.head.bias
    lse = torch.logsumexp(h @ w[:old].T + b[:old], dim=-1)
    gap = (h @ w[old] - lse).flatten().double()  # log p of a new character at bias 0
    log_mean = torch.logsumexp(gap, 0) - math.log(gap.numel())
    model.train(was_training)
    return (freq.log() - log_mean.float().cpu()).to(device)
