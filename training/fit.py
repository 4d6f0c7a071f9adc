"""The training loop: contiguous-stream batches with carried state, AdamW, gradient clipping,
an optional LR schedule, validation each epoch over the whole held-out tail, best/last
checkpoints, early stopping, exact resume, and DDP under torchrun."""

from __future__ import annotations

import math
import platform
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from charrnn.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from charrnn.model import CharRNN, ModelConfig, State, resolve_device
from charrnn.vocab import Vocabulary
from training import distributed, outputs
from training.config import FitConfig
from training.data import encode, make_batches, read_corpus, sha256, split
from training.errors import TrainingError
from training.evaluate import bpc, nll

TRAIN_LOG_EVERY = 10  # steps between train-loss points on the curve


@dataclass
class StopFlag:
    """Set from a signal handler; the loop saves a resumable checkpoint and returns."""

    signum: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum


@dataclass
class FitResult:
    best_val_nll: float
    epochs: int
    steps: int
    interrupted: bool
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Progress:
    """Everything needed to continue a run exactly where it stopped."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    best_val_nll: float = math.inf
    bad_evals: int = 0
    elapsed_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _make_schedule(
    cfg: FitConfig, opt: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=0.25
        )
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    return None


def _detach(state: State) -> State:
    return tuple(s.detach().float() for s in state)  # bf16 under autocast; carry fp32


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def _restore_rng(rng: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(rng["cpu"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)


class Trainer:
    def __init__(self, cfg: FitConfig, stop: StopFlag | None = None):
        cfg.validate()
        self.cfg = cfg
        self.stop = stop or StopFlag()
        try:
            self.device = resolve_device(cfg.device)
        except ValueError as e:
            raise TrainingError(f"--device {cfg.device}: {e}") from None
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if self.device.type == "cuda":
            # TF32 for the head's matmul; cuDNN's LSTM already uses TF32 by default.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.dist = distributed.init(self.device.type)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if self.dist.is_main:
            outputs.check_writable(cfg.out)
        if cfg.batch_size % self.dist.world:
            raise TrainingError(
                f"--batch-size {cfg.batch_size} must be divisible by the number of "
                f"processes ({self.dist.world})"
            )
        text = read_corpus(cfg.data)
        self.corpus_sha = sha256(text)
        self.vocab = Vocabulary.from_text(text)
        train_text, val_text = split(text, cfg.val_frac)
        self.batches = make_batches(
            encode(self.vocab, train_text, self.device),
            cfg.batch_size,
            cfg.seq_len,
            self.dist.rank,
            self.dist.world,
        )
        if len(val_text) < 2:
            raise TrainingError(
                f"validation tail too short: {len(val_text)} characters; raise --val-frac"
            )
        self.val_ids = encode(self.vocab, val_text, self.device)
        self.train_chars = len(train_text)

        torch.manual_seed(cfg.seed)
        self.model_config = ModelConfig(
            vocab_size=len(self.vocab),
            hidden=cfg.hidden,
            layers=cfg.layers,
            embed=cfg.embed,
            dropout=cfg.dropout,
            embed_dropout=cfg.embed_dropout,
            cell=cfg.cell,
        )
        self.model = CharRNN(self.model_config).to(self.device)
        self.net: torch.nn.Module = (
            DDP(
                self.model,
                device_ids=[self.dist.local_rank] if self.device.type == "cuda" else None,
            )
            if self.dist.enabled
            else self.model
        )
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        # An exponential moving average of the weights (Polyak averaging): on a small text it
        # generalises better than the last iterate.
        self.ema = (
            AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema))
            if cfg.ema
            else None
        )
        self.total_steps = cfg.epochs * self.batches.n_batches
        self.sched = _make_schedule(cfg, self.opt, self.total_steps)
        self.progress = Progress()
        self.state: State | None = None
        if cfg.resume:
            self._resume()

    # -- checkpoints -------------------------------------------------------------------------

    def _meta(self) -> dict[str, Any]:
        p = self.progress
        return {
            "train": self.cfg.to_meta(),
            "metrics": {
                "best_val_nll": p.best_val_nll if math.isfinite(p.best_val_nll) else None,
                "best_val_bpc": bpc(p.best_val_nll) if math.isfinite(p.best_val_nll) else None,
                "epochs": p.epoch,
                "steps": p.step,
                "wall_time_s": round(p.elapsed_s, 2),
                "train_chars": self.train_chars,
                "val_chars": len(self.val_ids),
                "corpus_sha256": self.corpus_sha,
                "device": self._device_name(),
                "world_size": self.dist.world,
                "torch": str(torch.__version__),
                "python": platform.python_version(),
            },
        }

    def _device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return (
            f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        )

    def _save_last(self) -> None:
        if not self.dist.is_main:
            return
        extra = {
            "resume": {
                "progress": self.progress.to_dict(),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict() if self.sched else None,
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "rng": _rng_state(self.device),
                "state": [s.cpu() for s in self.state] if self.state is not None else None,
            }
        }
        save_checkpoint(
            outputs.last_path(self.cfg.out), self.model, self.vocab, self._meta(), extra
        )

    def _resume(self) -> None:
        path = outputs.last_path(self.cfg.out)
        try:
            ckpt = load_checkpoint(path, self.device)
        except CheckpointError as e:
            raise TrainingError(f"cannot resume: {e}") from None
        saved = ckpt.extra.get("resume")
        if not isinstance(saved, dict):
            raise TrainingError(f"cannot resume: {path} holds no training state")
        if ckpt.meta.get("metrics", {}).get("corpus_sha256") != self.corpus_sha:
            raise TrainingError(f"cannot resume: {path} was trained on a different text")
        if ckpt.model.config != self.model_config:
            raise TrainingError(f"cannot resume: {path} has a different architecture")
        self.model.load_state_dict(ckpt.model.state_dict())
        self.opt.load_state_dict(saved["optimizer"])
        if self.sched is not None and saved["scheduler"] is not None:
            self.sched.load_state_dict(saved["scheduler"])
        if self.ema is not None and saved.get("ema") is not None:
            self.ema.load_state_dict(saved["ema"])
        self.progress = Progress(**saved["progress"])
        _restore_rng(saved["rng"], self.device)
        if saved["state"] is not None:
            self.state = tuple(s.to(self.device) for s in saved["state"])

    # -- the loop ----------------------------------------------------------------------------

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        bf16 = self.cfg.precision == "bf16"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits, state = self.net(x, self.state)
        self.state = _detach(state)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return loss.detach()

    @property
    def eval_model(self) -> CharRNN:
        """The weights that are validated and saved: the running average when --ema is on."""
        return self.ema.module if self.ema is not None else self.model  # type: ignore[return-value]

    def _validate(self) -> float:
        value = nll(self.eval_model, self.val_ids)[0] if self.dist.is_main else 0.0
        return distributed.broadcast_float(self.dist, value, self.device)

    def _record(self, record: dict[str, Any]) -> None:
        self.progress.history.append(record)
        if self.dist.is_main:
            outputs.append_metrics(self.cfg.out, record)

    def run(self) -> FitResult:
        cfg, p, n = self.cfg, self.progress, self.batches.n_batches
        chars_per_step = cfg.batch_size * cfg.seq_len
        bar = tqdm(
            total=self.total_steps,
            initial=p.step,
            disable=not (cfg.progress and self.dist.is_main),
            unit="step",
            dynamic_ncols=True,
        )
        self.net.train()
        interrupted = stopped_early = False
        loss_sum = torch.zeros((), device=self.device)
        window, t0, cps = 0, time.perf_counter(), 0.0
        while p.epoch < cfg.epochs and not stopped_early:
            if p.batch == 0:
                self.state = None
            while p.batch < n:
                loss_sum += self._train_step(*self.batches[p.batch])
                p.batch += 1
                p.step += 1
                window += 1
                bar.update(1)
                if p.step % TRAIN_LOG_EVERY == 0 or p.batch == n:
                    now = time.perf_counter()
                    p.elapsed_s += now - t0
                    cps = window * chars_per_step / max(now - t0, 1e-9)
                    train_loss = float(loss_sum) / window
                    self._record(
                        {
                            "step": p.step,
                            "epoch": p.epoch,
                            "train_loss": train_loss,
                            "lr": self.opt.param_groups[0]["lr"],
                            "chars_per_s": cps,
                        }
                    )
                    bar.set_postfix(
                        loss=f"{train_loss:.3f}", val=f"{p.best_val_nll:.3f}", cps=f"{cps:,.0f}"
                    )
                    loss_sum.zero_()
                    window, t0 = 0, time.perf_counter()
                if distributed.any_rank(self.dist, self.stop.signum is not None, self.device):
                    interrupted = True
                    break
            if interrupted:
                break
            p.epoch += 1
            p.batch = 0
            stopped_early = self._end_of_epoch(bar)
            t0 = time.perf_counter()
        p.elapsed_s += time.perf_counter() - t0
        bar.close()
        self._save_last()
        if self.dist.is_main:
            outputs.plot_curve(cfg.out, p.history)
        return FitResult(p.best_val_nll, p.epoch, p.step, interrupted, stopped_early, p.history)

    def _end_of_epoch(self, bar: tqdm) -> bool:
        """Validate, keep the best checkpoint, save the last; True when patience runs out."""
        p = self.progress
        t = time.perf_counter()
        val = self._validate()
        improved = val < p.best_val_nll
        if improved:
            p.best_val_nll, p.bad_evals = val, 0
        else:
            p.bad_evals += 1
        self._record(
            {
                "step": p.step,
                "epoch": p.epoch,
                "val_nll": val,
                "val_bpc": bpc(val),
                "eval_s": time.perf_counter() - t,
                "elapsed_s": p.elapsed_s,
            }
        )
        bar.set_postfix(val=f"{val:.4f}", best=f"{p.best_val_nll:.4f}")
        if improved and self.dist.is_main:
            save_checkpoint(self.cfg.out, self.eval_model, self.vocab, self._meta())
        self.state = None
        self._save_last()
        return self.cfg.patience is not None and p.bad_evals >= self.cfg.patience


def fit(cfg: FitConfig, stop: StopFlag | None = None) -> FitResult:
    trainer = Trainer(cfg, stop)
    try:
        return trainer.run()
    finally:
        distributed.shutdown(trainer.dist)
