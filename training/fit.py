"""Training: set up the device, DDP, the corpus and the model, then the loop: contiguous-stream
batches read from the memory-mapped ids with the state carried, AdamW with gradient clipping,
the loss curve, validation at epoch ends or every N steps over the held-out tail or a fixed
sample of it, early stopping, and a clean stop on SIGINT/SIGTERM. What the run's length and
regularisation are is decided in training/plan.py; checkpoints and exact resume (DDP ranks
included) are training/checkpointing.py's."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from charrnn.model import CharRNN, ModelConfig, State, resolve_device
from charrnn.textindex import index_path
from charrnn.vocab import Vocabulary
from training import checkpointing, distributed, finetune, outputs, plan, precision
from training.checkpointing import Checkpointer, RunFacts, Trainables
from training.config import FitConfig
from training.data import Batches, Corpus, default_cache_dir, load_corpus
from training.errors import TrainingError
from training.evaluate import Window, bpc, eval_windows, sharded_nll
from training.progress import Progress

TRAIN_LOG_EVERY = 10  # steps between train-loss points on the curve
AUTO_EVAL_CHARS = 250_000  # by default, a larger held-out tail is sampled down to this


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


def rank_seed(seed: int, rank: int) -> int:
    """Rank r's dropout seed: a distinct stream per rank, derived from --seed."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def _detach(state: State) -> State:
    return tuple(s.detach().float() for s in state)  # reduced under autocast; carry fp32


class _Session:
    """The bookkeeping of one call of ``Trainer.run``: the step it started at, when its first
    step ended (the step time is measured from there, past the warm-up), and the train loss
    and time since the last point on the curve."""

    def __init__(self, first_step: int, device: torch.device):
        self.first_step = first_step
        self.t_first = 0.0
        self.loss_sum = torch.zeros((), device=device)  # summed on the device: no sync a step
        self.steps = 0
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        """Seconds since the last point on the curve (or the last validation's end)."""
        return time.perf_counter() - self.t0


class Trainer:
    """One training run: ``Trainer(cfg).run()``. Set-up happens in the constructor (a resumed
    run is restored there too), so its errors come before any training."""

    step_lr: float  # the learning rate the last step used

    def __init__(self, cfg: FitConfig, stop: StopFlag | None = None):
        self.t_start = time.perf_counter()
        cfg.validate()
        self.cfg = cfg
        self.stop = stop or StopFlag()
        self._open_device()
        self.parent = self._open_parent()
        self._open_data()
        self.planner = plan.Planner(
            cfg, self.dist, self.batches.n_batches, self.windows, self.t_start
        )
        self.planned_epochs = self._settle_regularization()
        self._build_model()
        self._build_optimizer()
        self.ckpt = Checkpointer(
            cfg, self.dist, self.device, self.vocab, self._facts(), self._parent_meta()
        )
        self.progress = Progress(total_steps=self.planner.step_cap())
        self.parts.sched = plan.make_schedule(cfg, self.parts.opt, self.planner.step_cap())
        self.state: State | None = None
        if cfg.resume:
            self.progress, self.state = distributed.agree(self.dist, self._resume)

    # -- setup -------------------------------------------------------------------------------

    def _open_device(self) -> None:
        cfg = self.cfg
        try:
            self.device = resolve_device(cfg.device)
        except ValueError as e:
            raise TrainingError(f"--device {cfg.device}: {e}") from None
        self.precision = precision.resolve(cfg.precision, self.device)
        self.precision.apply_tf32()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.dist = distributed.init(self.device.type)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)

    def _open_parent(self) -> finetune.Parent | None:
        """With --init-from, the checkpoint to continue from (its architecture checked
        against the settings)."""
        cfg = self.cfg
        if cfg.init_from is None:
            return None
        parent = distributed.agree(self.dist, lambda: finetune.open_parent(cfg.init_from))
        given = {k: getattr(cfg, k) for k in finetune.ARCHITECTURE}
        finetune.check_architecture(given, parent)
        return parent

    def _parent_meta(self) -> dict[str, Any] | None:
        if self.parent is None:
            return None
        return self.parent.meta(self.vocab.chars[len(self.parent.vocab) :])

    def _open_data(self) -> None:
        cfg, d = self.cfg, self.dist
        # Every step that can fail on one rank alone is followed by an agreement, so a
        # failure ends all ranks at once with its reason instead of leaving them waiting.
        corpus_sha = distributed.broadcast_object(d, distributed.agree(d, self._prepare))
        self.corpus = distributed.agree(d, lambda: self._open_corpus(corpus_sha))
        self.vocab = self.corpus.vocab
        train_ids, self.val_ids = self.corpus.split(cfg.val_frac)
        self.train_ids = train_ids
        self.batches = distributed.agree(
            d,
            lambda: Batches(train_ids, cfg.batch_size, cfg.seq_len, d.rank, d.world, self.device),
        )
        if len(self.val_ids) < 2:
            raise TrainingError(
                f"validation tail too short: {len(self.val_ids)} characters; raise --val-frac"
            )
        self.train_chars = len(train_ids)
        self.windows = self._eval_windows()
        if cfg.keep_index:
            distributed.agree(d, self._write_index)

    def _write_index(self) -> None:
        """--keep-index: the text's index beside the checkpoint (rank 0 writes it)."""
        if self.dist.is_main:
            dest = index_path(self.cfg.out)
            outputs.write_index(self.cfg.data, self.vocab, self.corpus.sha256, dest)

    def _prepare(self) -> str:
        """Rank 0 makes the output folder and encodes the corpus (once: the ids are cached)."""
        cfg = self.cfg
        if self.dist.is_main:
            outputs.prepare_out(cfg.out)
        if self.dist.rank == 0:
            return load_corpus(cfg.data, cfg.cache_dir, base=self._base_vocab()).sha256
        return ""

    def _base_vocab(self) -> Vocabulary | None:
        """With --init-from, the parent's vocabulary, which the text's new characters grow."""
        return self.parent.vocab if self.parent is not None else None

    def _open_corpus(self, sha: str) -> Corpus:
        # The other ranks open the ids rank 0 wrote (or build them where the cache folder is
        # not shared with it: another machine).
        return load_corpus(self.cfg.data, self.cfg.cache_dir, sha, self._base_vocab())

    def _eval_windows(self) -> list[Window]:
        n, chars = len(self.val_ids), self.cfg.eval_chars
        if chars is None and n - 1 > AUTO_EVAL_CHARS:
            chars = AUTO_EVAL_CHARS
        return eval_windows(n, chars)

    def _settle_regularization(self) -> float | None:
        """With --auto-regularization, a budgeted run's regularisation: picked from what its
        budget buys, or on --resume what it picked when it started. The epochs it planned."""
        cfg, d = self.cfg, self.dist
        if not (cfg.auto_regularization and cfg.max_minutes is not None):
            return None
        if cfg.resume:
            return distributed.agree(d, lambda: checkpointing.saved_regularization(cfg))
        probe = plan.probe_step_s(cfg, len(self.vocab), self.batches, self.device, self.precision)
        step_s = distributed.broadcast_object(d, probe)  # every rank picks the same
        return plan.pick_regularization(cfg, step_s, self.train_chars)

    def _build_model(self) -> None:
        cfg, d = self.cfg, self.dist
        torch.manual_seed(cfg.seed)
        config = ModelConfig(
            vocab_size=len(self.vocab),
            hidden=cfg.hidden,
            layers=cfg.layers,
            embed=cfg.embed,
            dropout=cfg.dropout,
            embed_dropout=cfg.embed_dropout,
            cell=cfg.cell,
        )
        self.model = CharRNN(config).to(self.device)
        if self.parent is not None:  # the parent's weights; the new characters' rows set
            finetune.grow(self.model, self.parent, self.train_ids)
        if d.rank > 0:  # same initial weights (DDP broadcasts rank 0's), own dropout masks
            torch.manual_seed(rank_seed(cfg.seed, d.rank))
        forward = precision.TrainForward(self.model, self.precision, cfg.regularizers())
        self.train_forward = forward
        self.net: torch.nn.Module = (
            DDP(forward, device_ids=[d.local_rank] if self.device.type == "cuda" else None)
            if d.enabled
            else forward
        )

    def _build_optimizer(self) -> None:
        cfg = self.cfg
        opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.grad_scaler)
        # An exponential moving average of the weights (Polyak averaging): on a small text it
        # generalises better than the last iterate.
        ema = (
            AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema))
            if cfg.ema
            else None
        )
        self.parts = Trainables(self.model, opt, scaler, ema)

    def _facts(self) -> RunFacts:
        return RunFacts(
            train_chars=self.train_chars,
            val_chars=len(self.val_ids),
            val_predictions=sum(w.count for w in self.windows),
            corpus_sha256=self.corpus.sha256,
            precision=self.precision.describe(self.cfg.cell),
            budget_epochs_planned=self.planned_epochs,
            world_size=self.dist.world,
        )

    def _resume(self) -> tuple[Progress, State | None]:
        return self.ckpt.resume(self.parts, self.planner.step_cap())

    def _save_last(self) -> None:
        self.ckpt.save_last(self.parts, self.progress, self.state)

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> FitResult:
        p = self.progress
        self.planner.spent_before = p.elapsed_s
        bar = tqdm(
            total=p.total_steps,
            initial=p.step,
            disable=not (self.cfg.progress and self.dist.is_main),
            unit="step",
            dynamic_ncols=True,
        )
        self.net.train()
        s = _Session(p.step, self.device)
        interrupted = stopped_early = out_of_time = False
        while p.step < (p.total_steps or 0) and not (interrupted or stopped_early or out_of_time):
            epoch_end = self._step(s, bar)
            # Every rank stops at the same step, whichever was signalled or ran out of time.
            interrupted, out_of_time = distributed.any_ranks(
                self.dist, [self.stop.signum is not None, self.planner.out_of_time()], self.device
            )
            if self._eval_due(epoch_end, out_of_time or p.step >= (p.total_steps or 0)):
                p.elapsed_s += s.lap()  # validation time is not training time
                stopped_early = self._evaluate(bar)
                s.t0 = time.perf_counter()
        p.elapsed_s += s.lap()
        bar.close()
        self._save_last()
        if self.dist.is_main:
            outputs.plot_curve(self.cfg.out, p.history)
        return FitResult(p.best_val_nll, p.epoch, p.step, interrupted, stopped_early, p.history)

    def _step(self, s: _Session, bar: tqdm) -> bool:
        """One optimizer step and its bookkeeping; True when it ended an epoch."""
        p = self.progress
        if p.batch == 0:
            self.state = None  # each epoch starts its streams afresh
        s.loss_sum += self._train_step(*self.batches[p.batch])
        s.steps += 1
        p.batch += 1
        p.step += 1
        bar.update(1)
        self._time_steps(s, bar)
        epoch_end = p.batch == self.batches.n_batches
        if p.step % TRAIN_LOG_EVERY == 0 or epoch_end or p.step >= (p.total_steps or 0):
            self._log_train(s, bar)
        if epoch_end:
            p.epoch += 1
            p.batch = 0
            self.state = None
        return epoch_end

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = self.parts
        loss, state = self.net(x, self.state, y)
        self.state = _detach(state)
        t.opt.zero_grad(set_to_none=True)
        t.scaler.scale(loss).backward()
        t.scaler.unscale_(t.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
        t.scaler.step(t.opt)
        t.scaler.update()
        self.step_lr = t.opt.param_groups[0]["lr"]  # the rate this step used
        if t.sched is not None:
            t.sched.step()
        if t.ema is not None:
            t.ema.update_parameters(self.model)
        return loss.detach() - self.train_forward.penalty  # the cross-entropy alone, as validated

    def _time_steps(self, s: _Session, bar: tqdm) -> None:
        """Record the first step's time (start-up included); plan once steps 2..PLAN_AT are
        timed, the first being a warm-up."""
        p = self.progress
        if p.step == s.first_step + 1:
            s.t_first = time.perf_counter()
            self._record({"step": p.step, "first_step_s": s.t_first - self.t_start})
        if p.step == s.first_step + plan.PLAN_AT and not p.planned:
            step_s = (time.perf_counter() - s.t_first) / (plan.PLAN_AT - 1)
            if self.planner.plan(p, step_s, None):
                self._resized(bar)

    def _log_train(self, s: _Session, bar: tqdm) -> None:
        """A point on the curve: the mean train loss and the speed since the last one."""
        p = self.progress
        now = time.perf_counter()
        p.elapsed_s += now - s.t0
        train_loss = float(s.loss_sum) / s.steps
        cps = s.steps * self.cfg.batch_size * self.cfg.seq_len / max(now - s.t0, 1e-9)
        self._record(
            {
                "step": p.step,
                "epoch": p.epoch,
                "train_loss": train_loss,
                "lr": self.step_lr,
                "chars_per_s": cps,
            }
        )
        bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{p.best_val_nll:.3f}", cps=f"{cps:,.0f}")
        s.loss_sum.zero_()
        s.steps, s.t0 = 0, time.perf_counter()

    def _resized(self, bar: tqdm) -> None:
        """The planner changed the run's length: the same schedule shape over the new one."""
        p = self.progress
        assert p.total_steps is not None
        self.parts.sched = plan.make_schedule(self.cfg, self.parts.opt, p.total_steps, p.step)
        bar.total = p.total_steps

    def _record(self, record: dict[str, Any]) -> None:
        self.progress.history.append(record)
        if self.dist.is_main:
            outputs.append_metrics(self.cfg.out, record)

    # -- validation --------------------------------------------------------------------------

    @property
    def eval_model(self) -> CharRNN:
        """The weights that are validated and saved: the running average when --ema is on."""
        ema = self.parts.ema
        return ema.module if ema is not None else self.model  # type: ignore[return-value]

    def validate(self) -> float:
        """Mean NLL over the validation windows, sharded across ranks."""
        d = self.dist
        return sharded_nll(self.eval_model, self.val_ids, self.windows, d.rank, d.world)

    def _eval_due(self, epoch_end: bool, last: bool) -> bool:
        every = self.cfg.eval_every or self.progress.eval_every
        if every:
            return self.progress.step % every == 0 or last
        return epoch_end or last

    def _evaluate(self, bar: tqdm) -> bool:
        """Validate, keep the best checkpoint, save the last; True when patience runs out."""
        p = self.progress
        t = time.perf_counter()
        val = self.validate()
        eval_s = time.perf_counter() - t
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
                "eval_s": eval_s,
                "elapsed_s": p.elapsed_s,
            }
        )
        bar.set_postfix(val=f"{val:.4f}", best=f"{p.best_val_nll:.4f}")
        if improved:
            self.ckpt.save_best(self.eval_model, p)
        self._save_last()
        if self.planner.replan(p, eval_s):  # the validation's time is now measured
            self._resized(bar)
        return self.cfg.patience is not None and p.bad_evals >= self.cfg.patience


def fit(cfg: FitConfig, stop: StopFlag | None = None) -> FitResult:
    trainer = Trainer(cfg, stop)
    try:
        return trainer.run()
    finally:
        distributed.shutdown(trainer.dist)


__all__ = ["FitResult", "StopFlag", "Trainer", "default_cache_dir", "fit"]
