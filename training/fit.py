"""The training loop: contiguous-stream batches read from the memory-mapped ids with the state
carried, AdamW, gradient clipping, an optional LR schedule (sized to a time budget with
--max-minutes), validation at epoch ends or every N steps over the held-out tail or a fixed
sample of it, best/last checkpoints, early stopping, exact resume, and DDP under torchrun
with each rank's state and RNG saved and restored."""

from __future__ import annotations

import math
import platform
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from charrnn.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from charrnn.model import CharRNN, ModelConfig, State, resolve_device
from training import distributed, outputs, precision
from training.config import AWD_FROM_EPOCHS, AWD_RECIPE, FitConfig
from training.data import Batches, Corpus, default_cache_dir, load_corpus
from training.errors import TrainingError
from training.evaluate import Window, bpc, eval_windows, sharded_nll

TRAIN_LOG_EVERY = 10  # steps between train-loss points on the curve
PLAN_AT = 10  # the step time measured over steps 2..PLAN_AT sizes budgets and auto evals
AUTO_EVAL_S = 300.0  # by default, validate at least this often (seconds of training)
AUTO_EVAL_CHARS = 250_000  # by default, a larger held-out tail is sampled down to this
PROBE_STEPS = 4  # steps timed (the first one as warm-up) to pick a budgeted run's regularisation
# A budgeted run that sees its text this many times or fewer gets light regularisation; this
# many or more, the shipped Alice recipe's (models/README.md); in between, in proportion.
REG_LIGHT_EPOCHS, REG_HEAVY_EPOCHS = 5.0, 20.0


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
    # Decided once the step time is measured (PLAN_AT), then kept across resumes.
    total_steps: int | None = None
    eval_every: int | None = None
    planned: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _make_schedule(
    cfg: FitConfig, opt: torch.optim.Optimizer, total_steps: int, done: int = 0
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The schedule over ``total_steps``, advanced past the ``done`` steps already taken."""
    sched: torch.optim.lr_scheduler.LRScheduler | None = None
    if cfg.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=max(total_steps, 2), pct_start=0.25
        )
    elif cfg.schedule == "cosine":
        for g in opt.param_groups:
            g["lr"] = g.get("initial_lr", cfg.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    if sched is not None:
        for _ in range(min(done, total_steps - 1)):
            sched.step()
    return sched


def _detach(state: State) -> State:
    return tuple(s.detach().float() for s in state)  # reduced under autocast; carry fp32


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def _restore_rng(rng: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(rng["cpu"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)


def rank_seed(seed: int, rank: int) -> int:
    """Rank r's dropout seed: a distinct stream per rank, derived from --seed."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


class Trainer:
    def __init__(self, cfg: FitConfig, stop: StopFlag | None = None):
        self.t_start = time.perf_counter()
        cfg.validate()
        self.cfg = cfg
        self.stop = stop or StopFlag()
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
        d = self.dist
        # Every step that can fail on one rank alone is followed by an agreement, so a
        # failure ends all ranks at once with its reason instead of leaving them waiting.
        corpus_sha = distributed.broadcast_object(d, distributed.agree(d, self._prepare))
        self.corpus = distributed.agree(d, lambda: self._open_corpus(corpus_sha))
        self.vocab = self.corpus.vocab
        train_ids, self.val_ids = self.corpus.split(cfg.val_frac)
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

        if cfg.auto_regularization and cfg.max_minutes is not None:
            if cfg.resume:  # what the run picked when it started
                distributed.agree(d, self._regularization_of_last)
            else:
                self._pick_regularization()
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
        if d.rank > 0:  # same initial weights (DDP broadcasts rank 0's), own dropout masks
            torch.manual_seed(rank_seed(cfg.seed, d.rank))
        forward = precision.TrainForward(self.model, self.precision, cfg.regularizers())
        self.train_forward = forward
        self.net: torch.nn.Module = (
            DDP(forward, device_ids=[d.local_rank] if self.device.type == "cuda" else None)
            if d.enabled
            else forward
        )
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.grad_scaler)
        # An exponential moving average of the weights (Polyak averaging): on a small text it
        # generalises better than the last iterate.
        self.ema = (
            AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema))
            if cfg.ema
            else None
        )
        self.progress = Progress(total_steps=self._step_cap())
        self.sched = _make_schedule(cfg, self.opt, self._step_cap())
        self.state: State | None = None
        if cfg.resume:
            distributed.agree(d, self._resume)

    # -- setup -------------------------------------------------------------------------------

    def _prepare(self) -> str:
        """Rank 0 makes the output folder and encodes the corpus (once: the ids are cached)."""
        cfg = self.cfg
        if self.dist.is_main:
            outputs.prepare_out(cfg.out)
        if self.dist.rank == 0:
            return load_corpus(cfg.data, cfg.cache_dir).sha256
        return ""

    def _open_corpus(self, sha: str) -> Corpus:
        # The other ranks open the ids rank 0 wrote (or build them where the cache folder is
        # not shared with it: another machine).
        return load_corpus(self.cfg.data, self.cfg.cache_dir, sha)

    def _eval_windows(self) -> list[Window]:
        n, chars = len(self.val_ids), self.cfg.eval_chars
        if chars is None and n - 1 > AUTO_EVAL_CHARS:
            chars = AUTO_EVAL_CHARS
        return eval_windows(n, chars)

    def _step_cap(self) -> int:
        """The run's length in steps before any time budget: --epochs and --max-steps."""
        cap = self.cfg.epochs * self.batches.n_batches
        return min(cap, self.cfg.max_steps) if self.cfg.max_steps else cap

    def _pick_regularization(self) -> None:
        """A budgeted run's dropout and weight decay, from how many epochs its budget buys:
        light where it sees the text a few times (underfitting is the risk), heavy where it
        sees it 20 times or more (overfitting is), and the shipped Alice model's recipe, with
        AWD-LSTM's regularisers and more epochs, where it could see it 30 times or more."""
        cfg = self.cfg
        step_s = distributed.broadcast_object(self.dist, self._probe_step_s())
        steps = (cfg.max_minutes or 0) * 60 / step_s
        afford = steps * cfg.batch_size * cfg.seq_len / self.train_chars
        if cfg.auto_awd and afford >= AWD_FROM_EPOCHS:
            for key, value in AWD_RECIPE.items():
                setattr(cfg, key, value)
            self.planned_epochs = round(min(afford, cfg.epochs), 1)
            return
        epochs = min(afford, cfg.epochs)
        x = min(max((epochs - REG_LIGHT_EPOCHS) / (REG_HEAVY_EPOCHS - REG_LIGHT_EPOCHS), 0), 1)
        cfg.dropout = round(0.2 + 0.35 * x, 3)
        cfg.embed_dropout = round(0.2 * x, 3)
        cfg.weight_decay = round(0.3 * x, 3)
        self.planned_epochs = round(epochs, 1)

    planned_epochs: float | None = None

    def _regularization_of_last(self) -> None:
        path = outputs.last_path(self.cfg.out)
        try:
            meta = load_checkpoint(path).meta
        except CheckpointError as e:
            raise TrainingError(f"cannot resume: {e}") from None
        train = meta.get("train", {})
        for key in ("dropout", "embed_dropout", "weight_decay", *AWD_RECIPE):
            if key in train:
                setattr(self.cfg, key, train[key])
        self.planned_epochs = meta.get("metrics", {}).get("budget_epochs_planned")

    def _probe_step_s(self) -> float:
        """Seconds per training step, timed on a throwaway copy of the model."""
        rng = torch.get_rng_state()
        cfg = self.cfg
        model = CharRNN(
            ModelConfig(len(self.vocab), cfg.hidden, cfg.layers, cfg.embed, 0.2, cfg.cell)
        ).to(self.device)
        forward = precision.TrainForward(model, self.precision, cfg.regularizers())
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        times = []
        for i in range(PROBE_STEPS):
            t = time.perf_counter()
            x, y = self.batches[i % self.batches.n_batches]
            loss, _ = forward(x, None, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            times.append(time.perf_counter() - t)
        torch.set_rng_state(rng)
        return sorted(times[1:])[len(times[1:]) // 2]

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
                "val_predictions": sum(w.count for w in self.windows),
                "corpus_sha256": self.corpus.sha256,
                "device": self._device_name(),
                "precision": self.precision.describe(self.cfg.cell),
                "budget_epochs_planned": self.planned_epochs,
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
        """Every rank's stream state and RNG, gathered to rank 0, which writes the file."""
        mine = {
            "rng": _rng_state(self.device),
            "state": [s.cpu() for s in self.state] if self.state is not None else None,
        }
        ranks = distributed.gather_objects(self.dist, mine)
        if not self.dist.is_main:
            return
        extra = {
            "resume": {
                "progress": self.progress.to_dict(),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict() if self.sched else None,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "ranks": ranks,
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
        metrics, train = ckpt.meta.get("metrics", {}), ckpt.meta.get("train", {})
        if metrics.get("corpus_sha256") != self.corpus.sha256:
            raise TrainingError(f"cannot resume: {path} was trained on a different text")
        if ckpt.model.config != self.model_config:
            raise TrainingError(f"cannot resume: {path} has a different architecture")
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
        self.model.load_state_dict(ckpt.model.state_dict())
        p = self.progress = Progress(**saved["progress"])
        # A budgeted run keeps the length it planned; otherwise --epochs and --max-steps,
        # which may have changed, set it.
        was, p.total_steps = p.total_steps, p.total_steps or self._step_cap()
        if self.cfg.max_minutes is None:
            p.total_steps = self._step_cap()
        # The schedule first: building one sets the optimizer's learning rate, which the
        # optimizer's saved state then overrides.
        self.sched = _make_schedule(self.cfg, self.opt, p.total_steps)
        self.opt.load_state_dict(saved["optimizer"])
        if self.sched is not None and saved["scheduler"] is not None:
            if was in (None, p.total_steps):
                self.sched.load_state_dict(saved["scheduler"])
            else:  # the run's length changed: the same schedule shape over the new length
                self.sched = _make_schedule(self.cfg, self.opt, p.total_steps, p.step)
        if self.scaler.is_enabled() and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        if self.ema is not None and saved.get("ema") is not None:
            self.ema.load_state_dict(saved["ema"])
        # Older checkpoints saved rank 0's RNG and state alone.
        ranks = saved.get("ranks") or [{"rng": saved["rng"], "state": saved["state"]}]
        mine = ranks[self.dist.rank]
        _restore_rng(mine["rng"], self.device)
        if mine["state"] is not None:
            self.state = tuple(s.to(self.device) for s in mine["state"])

    # -- the loop ----------------------------------------------------------------------------

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss, state = self.net(x, self.state, y)
        self.state = _detach(state)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.step_lr = self.opt.param_groups[0]["lr"]  # the rate this step used
        if self.sched is not None:
            self.sched.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return loss.detach() - self.train_forward.penalty  # the cross-entropy alone, as validated

    @property
    def eval_model(self) -> CharRNN:
        """The weights that are validated and saved: the running average when --ema is on."""
        return self.ema.module if self.ema is not None else self.model  # type: ignore[return-value]

    def validate(self) -> float:
        """Mean NLL over the validation windows, sharded across ranks."""
        d = self.dist
        return sharded_nll(self.eval_model, self.val_ids, self.windows, d.rank, d.world)

    def _record(self, record: dict[str, Any]) -> None:
        self.progress.history.append(record)
        if self.dist.is_main:
            outputs.append_metrics(self.cfg.out, record)

    def _used_s(self) -> float:
        """Budget time spent: earlier sessions' plus this one's since it started."""
        return self._elapsed_before + time.perf_counter() - self.t_start

    _elapsed_before = 0.0

    def _plan(self, step_s: float, eval_s: float | None) -> None:
        """Size what depends on the step time: the auto evaluation interval, and with
        --max-minutes the run's length (so the schedule ends annealed with the budget)."""
        cfg, p, n = self.cfg, self.progress, self.batches.n_batches
        if not p.planned:
            p.planned = True
            if cfg.eval_every is None and n * step_s > AUTO_EVAL_S:
                p.eval_every = max(1, round(AUTO_EVAL_S / step_s))
        if cfg.max_minutes is None:
            return
        every = p.eval_every or cfg.eval_every or n
        if eval_s is None:  # not measured yet: inference is about a third of a training step
            chars = sum(w.count + w.burn for w in self.windows) / max(self.dist.world, 1)
            eval_s = step_s * chars / (cfg.batch_size * cfg.seq_len) / 3
        # Plan to end a little early: step times wander, and the budget is a hard stop.
        left = 0.97 * cfg.max_minutes * 60 - self._used_s()
        more = max(int(left / (step_s + eval_s / every)), 1)
        total = min(self._step_cap(), p.step + more)
        total = distributed.broadcast_object(self.dist, total)
        if total != p.total_steps:
            p.total_steps = total
            self.sched = _make_schedule(cfg, self.opt, total, p.step)

    def _eval_due(self, epoch_end: bool, last: bool) -> bool:
        every = self.cfg.eval_every or self.progress.eval_every
        if every:
            return self.progress.step % every == 0 or last
        return epoch_end or last

    def run(self) -> FitResult:
        cfg, p, n = self.cfg, self.progress, self.batches.n_batches
        self._elapsed_before = p.elapsed_s
        chars_per_step = cfg.batch_size * cfg.seq_len
        bar = tqdm(
            total=p.total_steps,
            initial=p.step,
            disable=not (cfg.progress and self.dist.is_main),
            unit="step",
            dynamic_ncols=True,
        )
        self.net.train()
        interrupted = stopped_early = False
        loss_sum = torch.zeros((), device=self.device)
        window, t0, t_plan, first = 0, time.perf_counter(), 0.0, p.step
        assert p.total_steps is not None
        while p.step < p.total_steps and not (interrupted or stopped_early):
            if p.batch == 0:
                self.state = None  # each epoch starts its streams afresh
            loss_sum += self._train_step(*self.batches[p.batch])
            p.batch += 1
            p.step += 1
            window += 1
            bar.update(1)
            if p.step == first + 1:
                t_plan = time.perf_counter()
                self._record({"step": p.step, "first_step_s": t_plan - self.t_start})
            if p.step == first + PLAN_AT and not p.planned:
                self._plan((time.perf_counter() - t_plan) / (PLAN_AT - 1), None)
                bar.total = p.total_steps
            epoch_end = p.batch == n
            if p.step % TRAIN_LOG_EVERY == 0 or epoch_end or p.step >= p.total_steps:
                now = time.perf_counter()
                p.elapsed_s += now - t0
                train_loss = float(loss_sum) / window
                cps = window * chars_per_step / max(now - t0, 1e-9)
                self._record(
                    {
                        "step": p.step,
                        "epoch": p.epoch,
                        "train_loss": train_loss,
                        "lr": self.step_lr,
                        "chars_per_s": cps,
                    }
                )
                bar.set_postfix(
                    loss=f"{train_loss:.3f}", val=f"{p.best_val_nll:.3f}", cps=f"{cps:,.0f}"
                )
                loss_sum.zero_()
                window, t0 = 0, time.perf_counter()
            if epoch_end:
                p.epoch += 1
                p.batch = 0
                self.state = None
            out_of_time = cfg.max_minutes is not None and self._used_s() > cfg.max_minutes * 60
            signalled, out_of_time = distributed.any_ranks(
                self.dist, [self.stop.signum is not None, out_of_time], self.device
            )
            last = out_of_time or p.step >= p.total_steps
            if self._eval_due(epoch_end, last):
                p.elapsed_s += time.perf_counter() - t0
                stopped_early = self._evaluate(bar)
                t0 = time.perf_counter()
            interrupted = signalled
            if out_of_time:
                break
        p.elapsed_s += time.perf_counter() - t0
        bar.close()
        self._save_last()
        if self.dist.is_main:
            outputs.plot_curve(cfg.out, p.history)
        return FitResult(p.best_val_nll, p.epoch, p.step, interrupted, stopped_early, p.history)

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
        if improved and self.dist.is_main:
            save_checkpoint(self.cfg.out, self.eval_model, self.vocab, self._meta())
        self._save_last()
        if self.cfg.max_minutes is not None and p.planned and p.step < (p.total_steps or 0):
            recent = [r for r in p.history if "chars_per_s" in r][-5:]
            if recent:
                chars = self.cfg.batch_size * self.cfg.seq_len
                step_s = chars / (sum(r["chars_per_s"] for r in recent) / len(recent))
                self._plan(step_s, eval_s)
                bar.total = p.total_steps
        return self.cfg.patience is not None and p.bad_evals >= self.cfg.patience


def fit(cfg: FitConfig, stop: StopFlag | None = None) -> FitResult:
    trainer = Trainer(cfg, stop)
    try:
        return trainer.run()
    finally:
        distributed.shutdown(trainer.dist)


__all__ = ["FitResult", "StopFlag", "Trainer", "default_cache_dir", "fit"]
