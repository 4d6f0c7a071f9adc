"""Planning a run: its length in steps (--epochs and --max-steps, and with --max-minutes what
the budget buys at the measured step time), the LR schedule over that length, the automatic
validation interval, the budget's clock, and a budgeted run's regularisation, picked from the
epochs its budget buys as timed by a short probe before the model is built."""

from __future__ import annotations

import time
from typing import Any

import torch

from charrnn.model import CharRNN, ModelConfig
from training import distributed
from training.config import AWD_FROM_EPOCHS, AWD_RECIPE, FitConfig
from training.data import Batches
from training.distributed import Dist
from training.evaluate import Window
from training.precision import Precision, TrainForward
from training.progress import Progress

PLAN_AT = 10  # the step time measured over steps 2..PLAN_AT sizes budgets and auto evals
AUTO_EVAL_S = 300.0  # by default, validate at least this often (seconds of training)
PROBE_STEPS = 4  # steps timed (the first one as warm-up) to pick a budgeted run's regularisation
# A budgeted run that sees its text this many times or fewer gets light regularisation; this
# many or more, the shipped Alice recipe's (models/README.md); in between, in proportion.
REG_LIGHT_EPOCHS, REG_HEAVY_EPOCHS = 5.0, 20.0
# Plan to end a little early: step times wander, and the budget is a hard stop.
BUDGET_SHARE = 0.97
RECENT_LOGS = 5  # train-loss points whose speed re-estimates the step time after a validation

Schedule = torch.optim.lr_scheduler.LRScheduler


def step_cap(cfg: FitConfig, n_batches: int) -> int:
    """The run's length in steps before any time budget: --epochs and --max-steps."""
    cap = cfg.epochs * n_batches
    return min(cap, cfg.max_steps) if cfg.max_steps else cap


def make_schedule(
    cfg: FitConfig, opt: torch.optim.Optimizer, total_steps: int, done: int = 0
) -> Schedule | None:
    """The schedule over ``total_steps``, advanced past the ``done`` steps already taken."""
    sched: Schedule | None = None
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


def budget_steps(left_s: float, step_s: float, eval_s: float, eval_every: int) -> int:
    """The steps that fit in ``left_s`` seconds with a validation every ``eval_every`` steps;
    at least one, even where the budget is already spent."""
    return max(int(left_s / (step_s + eval_s / eval_every)), 1)


class Planner:
    """Sizes what depends on the measured step time, and keeps the budget's clock."""

    def __init__(
        self, cfg: FitConfig, dist: Dist, n_batches: int, windows: list[Window], t_start: float
    ):
        self.cfg, self.dist, self.n_batches, self.windows = cfg, dist, n_batches, windows
        self.t_start = t_start  # set-up counts against the budget too
        self.spent_before = 0.0  # what earlier sessions of a resumed run spent

    def step_cap(self) -> int:
        return step_cap(self.cfg, self.n_batches)

    def used_s(self) -> float:
        """Budget time spent: earlier sessions' plus this one's since it started."""
        return self.spent_before + time.perf_counter() - self.t_start

    def out_of_time(self) -> bool:
        return self.cfg.max_minutes is not None and self.used_s() > self.cfg.max_minutes * 60

    def plan(self, p: Progress, step_s: float, eval_s: float | None) -> bool:
        """Size the auto evaluation interval and, with --max-minutes, the run's length (so the
        schedule ends annealed with the budget). True when the length changed."""
        cfg, n = self.cfg, self.n_batches
        if not p.planned:
            p.planned = True
            if cfg.eval_every is None and n * step_s > AUTO_EVAL_S:
                p.eval_every = max(1, round(AUTO_EVAL_S / step_s))
        if cfg.max_minutes is None:
            return False
        if eval_s is None:
            eval_s = self._guess_eval_s(step_s)
        left = BUDGET_SHARE * cfg.max_minutes * 60 - self.used_s()
        more = budget_steps(left, step_s, eval_s, p.eval_every or cfg.eval_every or n)
        total = min(self.step_cap(), p.step + more)
        total = distributed.broadcast_object(self.dist, total)  # every rank stops at one step
        if total == p.total_steps:
            return False
        p.total_steps = total
        return True

    def replan(self, p: Progress, eval_s: float) -> bool:
        """After a validation of a budgeted run: plan again with the recent step time and the
        validation's measured time. True when the length changed."""
        if self.cfg.max_minutes is None or not p.planned or p.step >= (p.total_steps or 0):
            return False
        recent = [r for r in p.history if "chars_per_s" in r][-RECENT_LOGS:]
        if not recent:
            return False
        chars = self.cfg.batch_size * self.cfg.seq_len
        step_s = chars / (sum(r["chars_per_s"] for r in recent) / len(recent))
        return self.plan(p, step_s, eval_s)

    def _guess_eval_s(self, step_s: float) -> float:
        """Before a validation is timed: inference is about a third of a training step."""
        cfg = self.cfg
        chars = sum(w.count + w.burn for w in self.windows) / max(self.dist.world, 1)
        return step_s * chars / (cfg.batch_size * cfg.seq_len) / 3


# -- a budgeted run's regularisation -------------------------------------------------------


def affordable_epochs(cfg: FitConfig, step_s: float, train_chars: int) -> float:
    """How many times the budget could show the model its training text."""
    steps = (cfg.max_minutes or 0) * 60 / step_s
    return steps * cfg.batch_size * cfg.seq_len / train_chars


def regularization_for(afford: float, epochs: int, auto_awd: bool) -> tuple[dict[str, Any], float]:
    """The settings for a budget that buys ``afford`` epochs, and the epochs it plans: light
    where it sees the text a few times (underfitting is the risk), heavy where it sees it 20
    times or more (overfitting is), and the shipped Alice model's recipe, with AWD-LSTM's
    regularisers and more epochs, where it could see it AWD_FROM_EPOCHS times or more."""
    if auto_awd and afford >= AWD_FROM_EPOCHS:
        return dict(AWD_RECIPE), round(min(afford, AWD_RECIPE["epochs"]), 1)
    planned = min(afford, epochs)
    x = min(max((planned - REG_LIGHT_EPOCHS) / (REG_HEAVY_EPOCHS - REG_LIGHT_EPOCHS), 0), 1)
    settings = {
        "dropout": round(0.2 + 0.35 * x, 3),
        "embed_dropout": round(0.2 * x, 3),
        "weight_decay": round(0.3 * x, 3),
    }
    return settings, round(planned, 1)


def pick_regularization(cfg: FitConfig, step_s: float, train_chars: int) -> float:
    """Set ``cfg``'s regularisation for its budget; the epochs it plans, for the checkpoint."""
    afford = affordable_epochs(cfg, step_s, train_chars)
    settings, planned = regularization_for(afford, cfg.epochs, cfg.auto_awd)
    for key, value in settings.items():
        setattr(cfg, key, value)
    return planned


def probe_step_s(
    cfg: FitConfig, vocab_size: int, batches: Batches, device: torch.device, prec: Precision
) -> float:
    """Seconds per training step, timed on a throwaway copy of the model."""
    rng = torch.get_rng_state()  # the probe must not shift the run's random stream
    config = ModelConfig(
        vocab_size=vocab_size,
        hidden=cfg.hidden,
        layers=cfg.layers,
        embed=cfg.embed,
        dropout=0.2,
        cell=cfg.cell,
    )
    model = CharRNN(config).to(device)
    forward = TrainForward(model, prec, cfg.regularizers())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    times = []
    for i in range(PROBE_STEPS):
        t = time.perf_counter()
        x, y = batches[i % batches.n_batches]
        loss, _ = forward(x, None, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    torch.set_rng_state(rng)
    return sorted(times[1:])[len(times[1:]) // 2]  # the median, past the warm-up step
