"""Step-based evaluation, the sampled validation, and step/time budgets."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

from charrnn import Vocabulary, load_checkpoint
from tests.conftest import StopAfter, make_text, tiny_cfg, tiny_fit_args, tiny_model
from training.__main__ import main
from training.config import AWD_FROM_EPOCHS, AWD_RECIPE, FitConfig
from training.data import encode
from training.distributed import Dist
from training.evaluate import BURN_IN, eval_windows, nll, windows_nll
from training.fit import Trainer, fit
from training.outputs import last_path, metrics_path
from training.plan import (
    REG_HEAVY_EPOCHS,
    REG_LIGHT_EPOCHS,
    Planner,
    pick_regularization,
    regularization_for,
)
from training.progress import Progress


def _records(out):
    return [json.loads(line) for line in metrics_path(out).read_text().splitlines()]


def test_eval_windows_are_a_fixed_even_sample():
    assert eval_windows(1000, None) == eval_windows(1000, 5000) == [eval_windows(1000, None)[0]]
    whole = eval_windows(1000, None)[0]
    assert (whole.start, whole.burn, whole.count) == (0, 0, 999)
    ws = eval_windows(1_000_000, 200_000)
    assert ws == eval_windows(1_000_000, 200_000)  # deterministic
    assert len(ws) == math.ceil(200_000 / 2048) and sum(w.count for w in ws) <= 200_000
    assert all(w.burn == BURN_IN for w in ws)
    assert ws[0].start == BURN_IN and ws[-1].start + ws[-1].count == 1_000_000 - 1
    gaps = np.diff([w.start for w in ws])
    assert gaps.max() - gaps.min() <= 1  # evenly spread over the tail


def test_sampled_validation_estimates_the_whole_tail():
    text = make_text(60_000, seed=3)
    vocab = Vocabulary.from_text(text)
    model = tiny_model(vocab)
    ids = encode(vocab, text)
    whole, n = nll(model, ids)
    assert n == len(ids) - 1
    sampled, m = nll(model, ids, chars=20_000)
    assert 19_000 <= m <= 20_000
    assert sampled == pytest.approx(whole, abs=0.02)
    # The streams run side by side exactly as they would one at a time.
    ws = eval_windows(len(ids), 20_000)
    one_by_one = sum(windows_nll(model, ids, [w])[0] for w in ws)
    assert windows_nll(model, ids, ws)[0] == pytest.approx(one_by_one, rel=1e-5)


@pytest.mark.e2e
def test_eval_every_writes_a_best_checkpoint_mid_epoch(corpus_file, tmp_path):
    out = tmp_path / "m.pt"
    cfg = tiny_cfg(corpus_file, out, epochs=1, lr=1e-2, eval_every=5, eval_chars=300)
    trainer = Trainer(cfg, StopAfter(12))  # interrupted at step 12 of a longer epoch
    n = trainer.batches.n_batches
    assert n > 12
    result = trainer.run()
    assert result.interrupted and result.steps == 12
    vals = [r for r in _records(out) if "val_nll" in r]
    assert [r["step"] for r in vals] == [5, 10]
    assert result.best_val_nll == min(r["val_nll"] for r in vals)
    best = load_checkpoint(out).meta["metrics"]
    assert best["steps"] in (5, 10) and best["epochs"] == 0  # written mid-epoch
    assert best["best_val_nll"] == result.best_val_nll and best["val_predictions"] <= 300
    # Uninterrupted, every 5 steps and at the end.
    full = fit(tiny_cfg(corpus_file, tmp_path / "f.pt", epochs=1, eval_every=5, eval_chars=300))
    steps = [r["step"] for r in _records(tmp_path / "f.pt") if "val_nll" in r]
    assert steps == [*range(5, n + 1, 5), *([n] if n % 5 else [])] and full.steps == n


@pytest.mark.e2e
def test_max_steps_ends_the_run_with_its_schedule(corpus_file, tmp_path):
    out = tmp_path / "m.pt"
    result = fit(tiny_cfg(corpus_file, out, epochs=50, max_steps=7, schedule="onecycle"))
    assert result.steps == 7
    lrs = [r["lr"] for r in _records(out) if "lr" in r]
    assert lrs[-1] < 1e-3 * 0.01  # annealed: one-cycle ends at max_lr / 25 / 1e4
    assert any("val_nll" in r and r["step"] == 7 for r in _records(out))  # the end is scored


@pytest.mark.e2e
def test_max_minutes_sizes_the_schedule_to_end_annealed(corpus_file, tmp_path):
    out = tmp_path / "m.pt"
    cfg = tiny_cfg(corpus_file, out, epochs=10_000, max_minutes=0.1, schedule="onecycle")
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    result = trainer.run()
    took = time.perf_counter() - t0
    assert trainer.progress.planned and result.steps == trainer.progress.total_steps
    assert result.steps < 10_000 * trainer.batches.n_batches
    lrs = [r["lr"] for r in _records(out) if "lr" in r]
    assert lrs[-1] < 0.05 * max(lrs)  # finished annealed, not cut off mid-schedule
    assert took < 6 + 3
    ckpt = load_checkpoint(last_path(out))
    assert ckpt.extra["resume"]["progress"]["total_steps"] == result.steps


@pytest.mark.e2e
def test_evaluate_cli_scores_a_sample_of_the_tail(corpus_file, tmp_path, capsys):
    out = tmp_path / "m.pt"
    fit(tiny_cfg(corpus_file, out, epochs=1))
    args = ["evaluate", "--checkpoint", str(out), "--data", str(corpus_file)]
    assert main(args) == 0
    whole = json.loads(capsys.readouterr().out)
    assert main([*args, "--eval-chars", "3000"]) == 0
    sampled = json.loads(capsys.readouterr().out)
    assert sampled["chars"] <= 3000 < whole["chars"]
    assert sampled["nll"] == pytest.approx(whole["nll"], abs=0.1)
    assert main([*args, "--eval-chars", "0"]) == 2
    assert "--eval-chars must be" in capsys.readouterr().err


@pytest.mark.e2e
def test_eval_state_is_not_disturbed(corpus_file, tmp_path):
    """Evaluating mid-run does not change training: same weights with or without evals."""
    a = Trainer(tiny_cfg(corpus_file, tmp_path / "a.pt", epochs=1, eval_every=3))
    a.run()  # (one at a time: a trainer seeds the process's generator)
    b = Trainer(tiny_cfg(corpus_file, tmp_path / "b.pt", epochs=1))
    b.run()
    for wa, wb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(wa, wb)


@pytest.mark.e2e
def test_budgeted_cli_takes_the_budget_recipe_and_picks_regularisation(corpus_file, tmp_path):
    out = tmp_path / "m.pt"
    args = tiny_fit_args(corpus_file, out, 100_000)
    assert main([*args, "--max-minutes", "0.05"]) == 0
    meta = load_checkpoint(last_path(out)).meta
    train = meta["train"]
    # Not given: the budget recipe's; given (batch size, epochs): as given.
    assert (train["schedule"], train["lr"], train["precision"]) == ("onecycle", 4e-3, "bf16")
    assert train["batch_size"] == 8 and train["auto_regularization"] is True
    # Regularisation in proportion to the epochs the budget buys (measured: a tiny model on
    # a tiny text sees it a dozen times or more in 3 s).
    epochs = meta["metrics"]["budget_epochs_planned"]
    x = min(max((epochs - REG_LIGHT_EPOCHS) / (REG_HEAVY_EPOCHS - REG_LIGHT_EPOCHS), 0), 1)
    assert epochs > 10 and train["dropout"] == pytest.approx(0.2 + 0.35 * x, abs=0.01)
    assert train["embed_dropout"] == pytest.approx(0.2 * x, abs=0.01)
    assert train["weight_decay"] == pytest.approx(0.3 * x, abs=0.01)
    # Given, a setting is kept and nothing is picked.
    main([*args, "--max-minutes", "0.02", "--dropout", "0.1", "--out", str(tmp_path / "d.pt")])
    train = load_checkpoint(last_path(tmp_path / "d.pt")).meta["train"]
    assert train["dropout"] == 0.1 and train["auto_regularization"] is False


@pytest.mark.e2e
def test_a_budget_that_buys_many_epochs_takes_the_awd_recipe(tmp_path):
    """Without --epochs, --dropout and the AWD flags, a budget that buys AWD_FROM_EPOCHS
    epochs or more takes the shipped model's recipe, AWD-LSTM's regularisers included, and a
    resumed run keeps it; with --epochs given, the regularisers stay off."""
    data = tmp_path / "small.txt"
    data.write_text(make_text(3000), encoding="utf-8")  # a tiny model sees it 50+ times in 3 s
    out = tmp_path / "m.pt"
    args = tiny_fit_args(data, out, 1)
    i = args.index("--epochs")
    args = [*args[:i], *args[i + 2 :], "--max-minutes", "0.05"]
    assert main(args) == 0
    meta = load_checkpoint(last_path(out)).meta
    train = meta["train"]
    assert train["auto_awd"] is True and {k: train[k] for k in AWD_RECIPE} == AWD_RECIPE
    assert meta["metrics"]["budget_epochs_planned"] >= AWD_FROM_EPOCHS
    assert main([*args, "--resume"]) == 0  # the budget is spent: it stops at once
    assert load_checkpoint(last_path(out)).meta["train"]["weight_drop"] == 0.3
    main([*args, "--epochs", "50", "--out", str(tmp_path / "e.pt")])
    train = load_checkpoint(last_path(tmp_path / "e.pt")).meta["train"]
    assert train["auto_awd"] is False and train["weight_drop"] == 0 and train["epochs"] == 50


@pytest.mark.e2e
def test_budgeted_run_resumes_with_the_regularisation_it_picked(corpus_file, tmp_path):
    out = tmp_path / "m.pt"
    args = [*tiny_fit_args(corpus_file, out, 100_000), "--max-minutes", "0.05"]
    assert main(args) == 0
    picked = load_checkpoint(last_path(out)).meta["train"]["dropout"]
    assert main([*args, "--resume"]) == 0  # the budget is spent: it stops at once
    assert load_checkpoint(last_path(out)).meta["train"]["dropout"] == picked


def test_planning_a_budget_without_training(tmp_path):
    """Planning alone, from given step times: the steps a budget buys, the automatic
    validation interval, and the regularisation for the epochs the budget buys."""
    cfg = FitConfig(tmp_path / "t.txt", tmp_path / "m.pt", batch_size=8, seq_len=25, epochs=100)
    cfg.max_minutes = 1.0
    planner = Planner(cfg, Dist(), 50, eval_windows(1001, None), time.perf_counter())
    p = Progress(total_steps=planner.step_cap())
    # 0.97 of 60 s at 0.1 s a step and a 0.5 s validation an epoch (50 steps): 529 steps.
    assert planner.plan(p, 0.1, 0.5) and (p.total_steps, p.eval_every) == (529, None)
    assert not planner.plan(p, 0.1, 0.5)  # the same length: the schedule is kept
    planner.spent_before, p.step = 120.0, 100  # overspent: one more step, never none
    assert planner.plan(p, 0.1, 0.5) and p.total_steps == 101
    cfg.max_minutes = None  # --epochs sets the length; a 500 s epoch validates every 300 s
    slow = Progress(total_steps=5000)
    assert not planner.plan(slow, 10.0, None) and (slow.total_steps, slow.eval_every) == (5000, 30)
    # 60 s at 0.1 s a step of 200 characters shows a 12,000-character text 10 times: a third
    # of the way from light to heavy regularisation.
    cfg.max_minutes = 1.0
    assert pick_regularization(cfg, 0.1, 12_000) == 10.0
    assert (cfg.dropout, cfg.embed_dropout, cfg.weight_decay) == (0.317, 0.067, 0.1)
    assert regularization_for(50.0, 100, auto_awd=True) == (AWD_RECIPE, AWD_RECIPE["epochs"])
    heavy = {"dropout": 0.55, "embed_dropout": 0.2, "weight_decay": 0.3}
    assert regularization_for(50.0, 100, auto_awd=False) == (heavy, 50.0)
