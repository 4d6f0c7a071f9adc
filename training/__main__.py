"""``python -m training fit|evaluate|sample|index`` — train, score and sample CharRNN checkpoints,
and index their training text.

Every refusal (bad data, bad settings, unwritable output, bad checkpoint) is one line on
stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from pathlib import Path

import torch

from charrnn.checkpoint import CheckpointError, load_checkpoint
from charrnn.decode import StepDecoder
from charrnn.generate import generate
from charrnn.sampling import MAX_SEED, SamplingParams
from charrnn.textindex import index_path
from charrnn.vocab import UnknownCharactersError
from training.config import BUDGET_RECIPE, FitConfig
from training.data import file_sha256, tail_ids
from training.errors import TrainingError
from training.evaluate import bpc, eval_windows, step_nll, utf8_bytes, windows_nll
from training.finetune import ARCHITECTURE, check_architecture, open_parent
from training.outputs import write_index
from training.precision import PRECISIONS

# Options whose default depends on whether the run has a time budget (BUDGET_RECIPE).
RECIPE = ("batch_size", "dropout", "schedule", "lr", "precision", "epochs")


def _fit_parser(sub: argparse._SubParsersAction) -> None:
    d = FitConfig(data=Path(), out=Path())
    p = sub.add_parser("fit", help="train a model on a UTF-8 text file")
    p.add_argument("--data", type=Path, required=True, help="UTF-8 text to learn from")
    p.add_argument("--out", type=Path, required=True, help="best checkpoint path, e.g. models/x.pt")
    p.add_argument(
        "--init-from",
        type=Path,
        metavar="CHECKPOINT",
        help="continued training: start from this checkpoint's weights and architecture; the "
        "vocabulary is its own with the text's new characters appended",
    )
    p.add_argument(
        "--keep-index",
        action="store_true",
        help="write the training text's index (OUT's NAME.index.npz) for the service",
    )
    arch = " (with --init-from: the checkpoint's)"
    p.add_argument("--hidden", type=int, help=f"default {d.hidden}{arch}")
    p.add_argument("--layers", type=int, help=f"default {d.layers}{arch}")
    p.add_argument("--embed", type=int, help=f"character embedding size, default {d.embed}{arch}")
    p.add_argument(
        "--dropout",
        type=float,
        help=f"dropout between LSTM layers and before the head (default {d.dropout})",
    )
    p.add_argument(
        "--embed-dropout",
        type=float,
        help=f"dropout on the character embeddings (default {d.embed_dropout})",
    )
    p.add_argument(
        "--weight-drop",
        type=float,
        default=d.weight_drop,
        metavar="P",
        help="DropConnect on the LSTM's hidden-to-hidden weights, a new mask each step "
        "(AWD-LSTM's weight drop; default 0: off)",
    )
    p.add_argument(
        "--locked-dropout",
        action="store_true",
        help="variational dropout: --embed-dropout and --dropout (between the layers and before "
        "the head) draw one mask per sequence, shared by all its time steps",
    )
    p.add_argument(
        "--char-dropout",
        type=float,
        default=d.char_dropout,
        metavar="P",
        help="drop whole characters: rows of the embedding matrix, for every occurrence in the "
        "batch (AWD-LSTM's embedding dropout; default 0: off)",
    )
    p.add_argument(
        "--ar",
        type=float,
        default=d.ar,
        metavar="ALPHA",
        help="activation regularisation: ALPHA x the mean square of the last layer's dropped "
        "outputs, added to the loss (default 0: off)",
    )
    p.add_argument(
        "--tar",
        type=float,
        default=d.tar,
        metavar="BETA",
        help="temporal activation regularisation: BETA x the mean square of the last layer's "
        "change from one step to the next (default 0: off)",
    )
    p.add_argument("--cell", choices=["lstm", "gru"], help=f"default {d.cell}{arch}")
    p.add_argument("--batch-size", type=int, help=f"default {d.batch_size}")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--epochs", type=int, help=f"default {d.epochs}")
    p.add_argument("--lr", type=float, help=f"learning rate (peak for onecycle; default {d.lr})")
    p.add_argument("--weight-decay", type=float, help=f"default {d.weight_decay}")
    p.add_argument(
        "--schedule", choices=["constant", "onecycle", "cosine"], help=f"default {d.schedule}"
    )
    p.add_argument("--clip", type=float, default=d.clip, help="gradient-norm clip")
    p.add_argument("--val-frac", type=float, default=d.val_frac)
    p.add_argument(
        "--patience",
        type=int,
        default=None,
        help="stop after this many evaluations without a better validation NLL",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        metavar="STEPS",
        help="validate every STEPS optimizer steps (default: at each epoch's end, or every "
        "5 minutes of training when an epoch is longer)",
    )
    p.add_argument(
        "--eval-chars",
        type=int,
        metavar="N",
        help="validate on a fixed sample of N held-out characters, scored as parallel streams "
        "(default: the whole tail as one stream, up to 250,000 characters)",
    )
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument(
        "--max-minutes",
        type=float,
        help="a time budget: the LR schedule is sized from the measured step time to end "
        "annealed with it; settings not given take the budget recipe",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        help="where the encoded corpus is kept (default $CHARRNN_CACHE_DIR, else "
        "~/.cache/charrnn/ids)",
    )
    p.add_argument(
        "--ema",
        type=float,
        default=None,
        metavar="DECAY",
        help="validate and keep an exponential moving average of the weights",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=d.device)
    p.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        help=f"fp32 (default {d.precision}; on CUDA with TF32 off), tf32 (CUDA), bf16 "
        "(CPU: autocast, the LSTM in bf16; CUDA: embedding/head in bf16, the LSTM in fp32 with "
        "TF32), fp16 (CUDA: autocast with a GradScaler); weights and validation stay fp32",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--resume", action="store_true", help="continue from OUT's .last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _fit_parser(sub)
    e = sub.add_parser(
        "evaluate", help="NLL, bits per character and bits per UTF-8 byte of a checkpoint on a text"
    )
    e.add_argument("--checkpoint", type=Path, required=True)
    e.add_argument("--data", type=Path, required=True)
    e.add_argument(
        "--tail-frac",
        type=float,
        default=1.0,
        help="score only the last fraction of the file (default: all of it)",
    )
    e.add_argument(
        "--eval-chars",
        type=int,
        metavar="N",
        help="score a fixed sample of N characters of the tail as parallel streams, as fit "
        "validates (default: the whole tail as one stream)",
    )
    e.add_argument("--threads", type=int, help="CPU threads for torch")
    e.add_argument(
        "--decode",
        choices=["fp32", "int8"],
        help="score through the service's one-character decode step in this precision "
        "(default: the training forward pass)",
    )
    i = sub.add_parser(
        "index",
        help="build the index of a checkpoint's training text (NAME.index.npz beside it), "
        "checking the text's sha256 against the one the checkpoint records",
    )
    i.add_argument("--checkpoint", type=Path, required=True)
    i.add_argument(
        "--data", type=Path, required=True, help="the text the checkpoint was trained on"
    )
    i.add_argument("--out", type=Path, help="where to write it (default: beside the checkpoint)")
    s = sub.add_parser("sample", help="generate text from a checkpoint")
    s.add_argument("--checkpoint", type=Path, required=True)
    s.add_argument("--prime", default="The")
    s.add_argument("--length", type=int, default=500)
    _add_sampling(s)
    return parser


def cmd_fit(args: argparse.Namespace) -> int:
    from training.fit import StopFlag, fit

    recipe = BUDGET_RECIPE if args.max_minutes is not None else {}
    given = {k: getattr(args, k) for k in RECIPE if getattr(args, k) is not None}
    auto = args.max_minutes is not None and all(
        getattr(args, k) is None for k in ("dropout", "embed_dropout", "weight_decay")
    )
    awd_given = args.locked_dropout or any((args.weight_drop, args.ar, args.tar))  # off: 0
    arch = {k: getattr(args, k) for k in ARCHITECTURE if getattr(args, k) is not None}
    if args.init_from is not None:  # the parent's, and a contradicting flag refused
        parent = open_parent(args.init_from)
        check_architecture(arch, parent)
        arch = parent.architecture()
    cfg = FitConfig(
        data=args.data,
        out=args.out,
        init_from=args.init_from,
        keep_index=args.keep_index,
        **arch,
        embed_dropout=args.embed_dropout or 0.0,
        weight_drop=args.weight_drop,
        locked_dropout=args.locked_dropout,
        char_dropout=args.char_dropout,
        ar=args.ar,
        tar=args.tar,
        seq_len=args.seq_len,
        weight_decay=args.weight_decay or 0.0,
        clip=args.clip,
        val_frac=args.val_frac,
        patience=args.patience,
        ema=args.ema,
        seed=args.seed,
        device=args.device,
        eval_every=args.eval_every,
        eval_chars=args.eval_chars,
        max_steps=args.max_steps,
        max_minutes=args.max_minutes,
        cache_dir=args.cache_dir,
        threads=args.threads,
        resume=args.resume,
        progress=not args.quiet,
        auto_regularization=auto,
        auto_awd=auto and args.epochs is None and not awd_given,
        **{**recipe, **given},
    )
    stop = StopFlag()
    stop.install()
    result = fit(cfg, stop)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 alone reports
        return 130 if result.interrupted else 0
    best = result.best_val_nll if math.isfinite(result.best_val_nll) else None
    summary = {
        "best_val_nll": best,
        "best_val_bpc": bpc(best) if best is not None else None,
        "epochs": result.epochs,
        "steps": result.steps,
        "checkpoint": str(cfg.out),
    }
    if result.interrupted:
        print(
            f"interrupted by signal {stop.signum}: resumable checkpoint saved; continue with "
            f"--resume",
            file=sys.stderr,
        )
        print(json.dumps(summary))
        return 128 + (stop.signum or signal.SIGINT)
    print(json.dumps(summary))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    if not 0 < args.tail_frac <= 1:
        raise TrainingError("--tail-frac must be in (0, 1]")
    if args.eval_chars is not None and args.eval_chars < 1:
        raise TrainingError("--eval-chars must be >= 1")
    if args.eval_chars is not None and args.decode:
        raise TrainingError("--eval-chars and --decode cannot be combined")
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.checkpoint)
    ids = tail_ids(args.data, ckpt.vocab, args.tail_frac)
    if len(ids) < 2:
        raise TrainingError("the text to evaluate needs at least 2 characters")
    windows = eval_windows(len(ids), None if args.decode else args.eval_chars)
    if args.decode:
        tensor = torch.from_numpy(ids.astype("int64"))
        value, count = step_nll(StepDecoder(ckpt.model, args.decode), tensor)
    else:
        total, count = windows_nll(ckpt.model, ids, windows)
        value = total / count
    size = utf8_bytes(ckpt.vocab.chars, ids, windows)
    summary = {
        "nll": value,
        "bpc": bpc(value),
        "bits_per_byte": bpc(value) * count / size,
        "chars": count,
        "bytes": size,
    }
    print(json.dumps(summary))
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    ckpt = load_checkpoint(args.checkpoint)
    recorded = ckpt.meta.get("metrics", {}).get("corpus_sha256")
    if not recorded:
        raise TrainingError(
            f"{args.checkpoint} records no corpus sha256: cannot check that {args.data} is its "
            "training text"
        )
    sha = file_sha256(args.data)
    if sha != recorded:
        raise TrainingError(
            f"{args.data} is not {args.checkpoint}'s training text (sha256 {sha[:12]}…, the "
            f"checkpoint records {recorded[:12]}…)"
        )
    dest = args.out or index_path(args.checkpoint)
    print(json.dumps(write_index(args.data, ckpt.vocab, sha, dest)))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    if args.length < 1:
        raise TrainingError("--length must be >= 1")
    if not args.prime:
        raise TrainingError("--prime must not be empty")
    if not 0 <= args.seed < MAX_SEED:
        raise TrainingError("--seed must be in [0, 2**63)")
    ckpt = load_checkpoint(args.checkpoint)
    if args.top_k is not None and not 1 <= args.top_k <= len(ckpt.vocab):
        raise TrainingError(f"--top-k must be in [1, {len(ckpt.vocab)}]")
    try:
        params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    text = generate(ckpt.model, ckpt.vocab, args.prime, args.length, params)
    print(args.prime + text)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"fit": cmd_fit, "evaluate": cmd_evaluate, "sample": cmd_sample, "index": cmd_index}
    try:
        return commands[args.command](args)
    except (TrainingError, CheckpointError, UnknownCharactersError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
