"""Training speed: ``training fit`` against the notebook's loop (one-hot numpy batches) at
the notebook's settings (2x512 LSTM, batch 128, sequence 100, Adam 1e-3, clip 5), measured in
the same run; and the wall time to reach the notebook's final validation NLL (1.521 nats/char
on Alice after its 70 epochs).

The notebook's own time to that NLL is its measured step time x its 700 steps (70 epochs of
10 batches; validation not counted, which flatters the notebook). Ours is measured: a short
one-cycle run (bf16 autocast, see FAST) is trained until an end-of-epoch validation reaches
the target.

``--regularizers fp32 bf16`` measures instead the cost of the AWD-LSTM regularisers
(REGULARIZED: all on, and each alone) against the same trainer with them off, at the notebook's
settings: the trainers take their steps in turn, so all see the same machine load, and the
ratios of their chars/s to the base's are printed (the target is >= 0.9)."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import CORPUS, emit, machine
from bench.notebook import NotebookCharRNN, train_steps
from charrnn.vocab import Vocabulary
from training.config import FitConfig
from training.fit import Trainer

# AWD-LSTM's regularisers at the rates its papers used, all together and each alone (locked
# dropout changes which kernel runs, so "all" alone could hide the cost of the others).
REGULARIZED: dict[str, dict[str, Any]] = {
    "all": {
        "weight_drop": 0.5,
        "locked_dropout": True,
        "char_dropout": 0.1,
        "ar": 2.0,
        "tar": 1.0,
    },
    "weight_drop": {"weight_drop": 0.5},
    "locked_dropout": {"locked_dropout": True},
    "char_dropout": {"char_dropout": 0.1},
    "ar_tar": {"ar": 2.0, "tar": 1.0},
}
NOTEBOOK_FINAL_NLL = 1.521
NOTEBOOK_STEPS = 700
# A fast recipe for reaching the notebook's NLL (not the shipped model's recipe).
FAST = {
    "batch_size": 32,
    "seq_len": 100,
    "epochs": 6,
    "lr": 5e-3,
    "schedule": "onecycle",
    "dropout": 0.3,
    "precision": "bf16",
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def notebook_step_seconds(text: str, steps: int, device: str = "cpu") -> float:
    vocab = Vocabulary.from_text(text)
    encoded = np.array(vocab.encode(text))
    torch.manual_seed(0)
    net = NotebookCharRNN(vocab.chars).to(device)
    train_steps(net, encoded, 1, device=device)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    # One call, as in the notebook: one optimizer, batches in order.
    train_steps(net, encoded, steps, device=device)
    _sync(device)
    return (time.perf_counter() - t0) / steps


def _trainer(data: Path, out: Path, device: str, precision: str, **settings: Any) -> Trainer:
    cfg = FitConfig(
        data=data,
        out=out,
        progress=False,
        device=device,
        precision=precision,  # type: ignore[arg-type]
        **settings,
    )
    trainer = Trainer(cfg)
    trainer.net.train()
    trainer._train_step(*trainer.batches[0])  # warm-up
    return trainer


def _timed_step(trainer: Trainer, i: int, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    trainer._train_step(*trainer.batches[i % trainer.batches.n_batches])
    _sync(device)
    return time.perf_counter() - t0


def ours_step_seconds(
    data: Path, steps: int, device: str = "cpu", precision: str = "fp32"
) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _trainer(data, Path(tmp) / "m.pt", device, precision)
        return statistics.median(_timed_step(trainer, i + 1, device) for i in range(steps))


def regularizer_cost(
    data: Path, steps: int, device: str = "cpu", precision: str = "fp32", threads: int | None = None
) -> dict[str, object]:
    """chars/s with the regularisers on against off, same settings. The trainers take their
    steps in turn, in a rotating order, so each sees the same machine load; the ratios are
    given from the median step and from the fastest one (load only ever adds time, so on a
    shared machine the fastest step is the steadier estimate of what a step costs)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        trainers = {"base": _trainer(data, out / "base.pt", device, precision, threads=threads)}
        for name, settings in REGULARIZED.items():
            trainers[name] = _trainer(
                data, out / f"{name}.pt", device, precision, threads=threads, **settings
            )
        names = list(trainers)
        times: dict[str, list[float]] = {name: [] for name in names}
        for i in range(steps):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                times[name].append(_timed_step(trainers[name], i + 1, device))
    chars = trainers["base"].cfg.batch_size * trainers["base"].cfg.seq_len
    median = {name: chars / statistics.median(t) for name, t in times.items()}
    best = {name: chars / min(t) for name, t in times.items()}
    ratio = {name: round(median[name] / median["base"], 3) for name in names[1:]}
    ratio_best = {name: round(best[name] / best["base"], 3) for name in names[1:]}
    return {
        "precision": precision,
        "chars_per_s_median": {name: round(v) for name, v in median.items()},
        "chars_per_s_best": {name: round(v) for name, v in best.items()},
        "ratio": ratio,
        "ratio_best": ratio_best,
        "min_ratio_best": min(ratio_best.values()),
    }


def time_to_nll(data: Path, target: float, device: str = "cpu") -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = FitConfig(data=data, out=Path(tmp) / "m.pt", progress=False, device=device, **FAST)
        trainer = Trainer(cfg)
        t0 = time.perf_counter()
        reached = None

        # Stop as soon as an end-of-epoch validation reaches the target.
        class Until:
            @property
            def signum(self) -> int | None:
                hist = trainer.progress.history
                hit = any(r.get("val_nll", 9.9) <= target for r in hist)
                return 2 if hit else None

        trainer.stop = Until()  # type: ignore[assignment]
        result = trainer.run()
        wall = time.perf_counter() - t0
        for r in result.history:
            if r.get("val_nll", 9.9) <= target:
                reached = r
                break
    return {
        "recipe": FAST,
        "wall_s": round(wall, 1),
        "reached_nll": reached["val_nll"] if reached else None,
        "reached_at_step": reached["step"] if reached else None,
    }


def run(
    data: Path = CORPUS, steps: int = 5, with_time_to_nll: bool = True, device: str = "cpu"
) -> dict[str, object]:
    text = data.read_text(encoding="utf-8")
    train_text = text[: int(len(text) * 0.9)]
    chars_per_step = 128 * 100
    nb = notebook_step_seconds(train_text, steps, device)
    ours = ours_step_seconds(data, steps, device)
    ours_bf16 = ours_step_seconds(data, steps, device, "bf16")
    out: dict[str, object] = {
        "benchmark": "train_throughput",
        "device": device,
        "machine": machine(),
        "notebook_chars_per_s": round(chars_per_step / nb),
        "ours_chars_per_s": round(chars_per_step / ours),
        "speedup": round(nb / ours, 2),
        # --precision bf16 (autocast), everything else at the notebook's settings.
        "ours_bf16_chars_per_s": round(chars_per_step / ours_bf16),
        "bf16_speedup": round(nb / ours_bf16, 2),
    }
    if with_time_to_nll:
        reach = time_to_nll(data, NOTEBOOK_FINAL_NLL, device)
        notebook_wall = nb * NOTEBOOK_STEPS
        out |= {
            "target_nll": NOTEBOOK_FINAL_NLL,
            "notebook_time_to_target_s": round(notebook_wall, 1),
            "ours_time_to_target_s": reach["wall_s"] if reach["reached_nll"] else None,
            "ours_time_to_target_detail": reach,
            "time_to_target_fraction": round(reach["wall_s"] / notebook_wall, 3)
            if reach["reached_nll"]
            else None,
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", type=Path, default=CORPUS)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--skip-time-to-nll", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch threads (--regularizers; default: torch's)")
    p.add_argument(
        "--regularizers",
        choices=["fp32", "bf16"],
        nargs="+",
        metavar="PRECISION",
        help="measure only the regularisers' cost (on against off) in these precisions",
    )
    args = p.parse_args()
    if args.regularizers:
        emit(
            {
                "benchmark": "train_regularizers",
                "device": args.device,
                "machine": machine(),
                "steps": args.steps,
                "regularizers": REGULARIZED,
                "threads": args.threads,
                "runs": [
                    regularizer_cost(args.data, args.steps, args.device, precision, args.threads)
                    for precision in args.regularizers
                ],
            }
        )
        return
    emit(run(args.data, args.steps, not args.skip_time_to_nll, args.device))


if __name__ == "__main__":
    main()
