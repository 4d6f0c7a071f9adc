"""A run's checkpoints: the metadata each one carries, the best checkpoint (the weights that
validated best), the resumable last one (weights, optimiser, schedule, gradient scaler, weight
average and progress, with every rank's stream state and RNG), and resuming from it."""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel

from charrnn.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from charrnn.model import CharRNN, State
from charrnn.vocab import Vocabulary
from training import distributed, outputs
from training.config import AWD_RECIPE, FitConfig
from training.distributed import Dist
from training.errors import TrainingError
from training.evaluate import bpc
from training.plan import Schedule, make_schedule
from training.progress import Progress


@dataclass
class Trainables:
    """What the training steps change, and so what the resumable checkpoint saves."""

    model: CharRNN
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None
    sched: Schedule | None = None  # replaced whenever the run's planned length changes


@dataclass(frozen=True)
class RunFacts:
    """What a checkpoint's metrics say beyond the progress, fixed once the run is set up."""

    train_chars: int
    val_chars: int
    val_predictions: int
    corpus_sha256: str
    precision: str
    budget_epochs_planned: float | None
    world_size: int


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def _restore_rng(rng: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(rng["cpu"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)


def _load_last(path: Path, device: torch.device | str = "cpu") -> Checkpoint:
    try:
        return load_checkpoint(path, device)
    except CheckpointError as e:
        raise TrainingError(f"cannot resume: {e}") from None


def saved_regularization(cfg: FitConfig) -> float | None:
    """Set ``cfg``'s regularisation to what the run being resumed picked for its budget; the
    epochs it planned then."""
    meta = _load_last(outputs.last_path(cfg.out)).meta
    train = meta.get("train", {})
    for key in ("dropout", "embed_dropout", "weight_decay", *AWD_RECIPE):
        if key in train:
            setattr(cfg, key, train[key])
    return meta.get("metrics", {}).get("budget_epochs_planned")


class Checkpointer:
    """Writes a run's checkpoints, and resumes a run from its last one."""

    def __init__(
        self,
        cfg: FitConfig,
        dist: Dist,
        device: torch.device,
        vocab: Vocabulary,
        facts: RunFacts,
        parent: dict[str, Any] | None = None,
    ):
        self.cfg, self.dist, self.device, self.vocab, self.facts = cfg, dist, device, vocab, facts
        self.parent = parent  # with --init-from: what meta.train.parent records

    def meta(self, p: Progress) -> dict[str, Any]:
        f, best = self.facts, p.best_val_nll
        train = self.cfg.to_meta()
        if self.parent is not None:
            train["parent"] = self.parent
        return {
            "train": train,
            "metrics": {
                "best_val_nll": best if math.isfinite(best) else None,
                "best_val_bpc": bpc(best) if math.isfinite(best) else None,
                "epochs": p.epoch,
                "steps": p.step,
                "wall_time_s": round(p.elapsed_s, 2),
                "train_chars": f.train_chars,
                "val_chars": f.val_chars,
                "val_predictions": f.val_predictions,
                "corpus_sha256": f.corpus_sha256,
                "device": device_name(self.device),
                "precision": f.precision,
                "budget_epochs_planned": f.budget_epochs_planned,
                "world_size": f.world_size,
                "torch": str(torch.__version__),
                "python": platform.python_version(),
            },
        }

    def save_best(self, model: CharRNN, p: Progress) -> None:
        if self.dist.is_main:
            save_checkpoint(self.cfg.out, model, self.vocab, self.meta(p))

    def save_last(self, t: Trainables, p: Progress, state: State | None) -> None:
        """Every rank's stream state and RNG, gathered to rank 0, which writes the file."""
        mine = {
            "rng": _rng_state(self.device),
            "state": [s.cpu() for s in state] if state is not None else None,
        }
        ranks = distributed.gather_objects(self.dist, mine)
        if not self.dist.is_main:
            return
        extra = {
            "resume": {
                "progress": p.to_dict(),
                "optimizer": t.opt.state_dict(),
                "scheduler": t.sched.state_dict() if t.sched else None,
                "scaler": t.scaler.state_dict() if t.scaler.is_enabled() else None,
                "ema": t.ema.state_dict() if t.ema is not None else None,
                "ranks": ranks,
            }
        }
        save_checkpoint(outputs.last_path(self.cfg.out), t.model, self.vocab, self.meta(p), extra)

    def resume(self, t: Trainables, step_cap: int) -> tuple[Progress, State | None]:
        """Load the last checkpoint into ``t``; the run's progress and this rank's stream
        state. ``step_cap`` is the run's length from --epochs and --max-steps."""
        path = outputs.last_path(self.cfg.out)
        ckpt = _load_last(path, self.device)
        saved = ckpt.extra.get("resume")
        if not isinstance(saved, dict):
            raise TrainingError(f"cannot resume: {path} holds no training state")
        self._check_same_run(path, ckpt, t.model)
        t.model.load_state_dict(ckpt.model.state_dict())
        p = Progress(**saved["progress"])
        self._restore_schedule(t, saved, p, step_cap)
        if t.scaler.is_enabled() and saved.get("scaler"):
            t.scaler.load_state_dict(saved["scaler"])
        if t.ema is not None and saved.get("ema") is not None:
            t.ema.load_state_dict(saved["ema"])
        # Older checkpoints saved rank 0's RNG and state alone.
        ranks = saved.get("ranks") or [{"rng": saved["rng"], "state": saved["state"]}]
        mine = ranks[self.dist.rank]
        _restore_rng(mine["rng"], self.device)
        if mine["state"] is None:
            return p, None
        return p, tuple(s.to(self.device) for s in mine["state"])

    def _check_same_run(self, path: Path, ckpt: Checkpoint, model: CharRNN) -> None:
        """Refuse a checkpoint this run could not continue exactly."""
        metrics, train = ckpt.meta.get("metrics", {}), ckpt.meta.get("train", {})
        if metrics.get("corpus_sha256") != self.facts.corpus_sha256:
            raise TrainingError(f"cannot resume: {path} was trained on a different text")
        was_parent = (train.get("parent") or {}).get("sha256")
        if was_parent != (self.parent or {}).get("sha256"):
            since = f"--init-from {train['parent']['path']}" if was_parent else "no --init-from"
            raise TrainingError(
                f"cannot resume: {path} was trained with {since}; resume with the same"
            )
        if ckpt.model.config != model.config:
            raise TrainingError(f"cannot resume: {path} has a different architecture")
        if ckpt.vocab != self.vocab:
            raise TrainingError(f"cannot resume: {path} has a different vocabulary")
        world = metrics.get("world_size", 1)
        if world != self.dist.world:
            raise TrainingError(
                f"cannot resume: {path} was trained by {world} process(es), this run has "
                f"{self.dist.world}; resume with the same number"
            )
        was = (train.get("batch_size"), train.get("seq_len"))
        if was != (self.cfg.batch_size, self.cfg.seq_len):
            raise TrainingError(
                f"cannot resume: {path} was trained with --batch-size {was[0]} --seq-len "
                f"{was[1]}; resume with the same values"
            )

    def _restore_schedule(
        self, t: Trainables, saved: dict[str, Any], p: Progress, step_cap: int
    ) -> None:
        # A budgeted run keeps the length it planned; otherwise --epochs and --max-steps,
        # which may have changed, set it.
        was, p.total_steps = p.total_steps, p.total_steps or step_cap
        if self.cfg.max_minutes is None:
            p.total_steps = step_cap
        # The schedule first: building one sets the optimizer's learning rate, which the
        # optimizer's saved state then overrides.
        t.sched = make_schedule(self.cfg, t.opt, p.total_steps)
        t.opt.load_state_dict(saved["optimizer"])
        if t.sched is not None and saved["scheduler"] is not None:
            if was in (None, p.total_steps):
                t.sched.load_state_dict(saved["scheduler"])
            else:  # the run's length changed: the same schedule shape over the new length
                t.sched = make_schedule(self.cfg, t.opt, p.total_steps, p.step)
