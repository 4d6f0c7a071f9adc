"""DDP over 2 CPU processes (gloo, torchrun): exact resume with each rank's own stream state
and RNG, per-rank dropout seeds, refusals, one rank's failure ending both, and the regularisers
(weight drop's masked weights still reduce their gradients onto the raw ones)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from charrnn import CharRNN, ModelConfig, load_checkpoint
from tests.conftest import tiny_fit_args
from training.__main__ import main
from training.fit import rank_seed
from training.outputs import last_path
from training.precision import Precision, TrainForward
from training.regularize import Regularizers

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*cmd, "-m", "training", *args], capture_output=True, text=True, timeout=timeout, env=ENV
    )


def test_rank_seeds_differ_and_are_stable():
    seeds = [rank_seed(0, r) for r in range(8)]
    assert len(set(seeds)) == 8 and seeds == [rank_seed(0, r) for r in range(8)]
    assert rank_seed(1, 1) != rank_seed(0, 1)


REGULARISERS = ("--weight-drop", "0.3", "--locked-dropout", "--char-dropout", "0.1", "--ar", "1")


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("regularisers", [(), REGULARISERS], ids=["plain", "regularised"])
def test_ddp_resume_equals_uninterrupted_and_refuses_another_world_size(
    corpus_file, tmp_path, capsys, regularisers
):
    whole, parts = tmp_path / "whole.pt", tmp_path / "parts.pt"
    # dropout 0.3 makes each rank's RNG matter; constant LR so --max-steps only stops the run.
    common = ("--device", "cpu", "--eval-every", "4", "--eval-chars", "200", *regularisers)
    done = _torchrun(*tiny_fit_args(corpus_file, whole, 2, *common))
    assert done.returncode == 0, done.stderr[-2000:]
    first = _torchrun(*tiny_fit_args(corpus_file, parts, 2, *common, "--max-steps", "7"))
    assert first.returncode == 0, first.stderr[-2000:]
    saved = load_checkpoint(last_path(parts)).extra["resume"]
    assert saved["progress"]["step"] == 7 and saved["progress"]["batch"] == 7  # mid-epoch
    ranks = saved["ranks"]
    assert len(ranks) == 2
    # Each rank's own streams (different rows of the text) and its own dropout generator.
    assert not torch.equal(ranks[0]["state"][0], ranks[1]["state"][0])
    assert not torch.equal(ranks[0]["rng"]["cpu"], ranks[1]["rng"]["cpu"])
    resumed = _torchrun(*tiny_fit_args(corpus_file, parts, 2, *common, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load_checkpoint(last_path(whole)).model, load_checkpoint(last_path(parts)).model
    for (k, wa), (_, wb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(wa, wb), k
    # One process cannot continue what two started.
    assert main(tiny_fit_args(corpus_file, parts, 3, "--resume")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trained by 2 process(es), this run has 1" in err


@pytest.mark.slow
@pytest.mark.e2e
def test_a_rank0_failure_ends_both_ranks_with_the_reason(corpus_file, tmp_path):
    # Only rank 0 writes outputs, so only rank 0 finds /proc unwritable.
    t0 = time.monotonic()
    done = _torchrun(*tiny_fit_args(corpus_file, tmp_path, 1, "--device", "cpu"), timeout=90)
    took = time.monotonic() - t0
    assert done.returncode != 0
    assert "error: output path is a directory" in done.stderr
    assert "error: rank 0 failed: output path is a directory" in done.stderr  # rank 1's line
    assert took < 60


def _weight_drop_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same initial weights, as the trainer starts them
        model = CharRNN(ModelConfig(20, 16, 2, 8, 0.2))
        torch.manual_seed(rank_seed(0, rank))  # each rank its own data and masks
        regs = Regularizers(weight_drop=0.5, locked=True, char_dropout=0.1, ar=1.0, tar=1.0)
        net = DDP(TrainForward(model, Precision("fp32", "cpu", None, True, False, False), regs))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(3):
            ids = torch.randint(0, 20, (4, 13))
            loss, _ = net(ids[:, :-1], None, ids[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.save(model.state_dict(), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_with_weight_drop_keeps_the_ranks_weights_identical(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_weight_drop_worker, args=(2, port, str(tmp_path)), nprocs=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    torch.manual_seed(0)
    start = CharRNN(ModelConfig(20, 16, 2, 8, 0.2)).state_dict()
    assert list(a) == list(start)
    for k in start:
        # Trained (each rank saw other data and masks), and the same on both ranks: the
        # gradients of the raw weights were all-reduced.
        assert torch.equal(a[k], b[k]) and not torch.equal(a[k], start[k]), k
