"""Multi-node training: `training fit` under torchrun with two "nodes" on this machine.

Two torchrun launchers, each with one worker, meet through the c10d rendezvous on a loopback
port (``--nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT``, gloo on
the CPU), exactly as two hosts would. They must train the same weights as one launcher with two
workers (``--nnodes 1 --nproc_per_node 2``): how the processes are spread over nodes is not part
of the result."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from charrnn import load_checkpoint
from tests.conftest import make_text, tiny_fit_args
from training.outputs import metrics_path

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

TIMEOUT_S = 120
# One thread per worker (the machine's cores are shared), and gloo on the loopback interface
# only, whatever the machine's other interfaces.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*launch: str, data: Path, out: Path) -> list[str]:
    fit = tiny_fit_args(data, out, 1, "--device", "cpu", "--seed", "3")
    return [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "training", *fit]


def finish(procs: list[subprocess.Popen[str]]) -> None:
    """Wait for every launcher; on any failure or timeout kill the rest and show its output."""
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=TIMEOUT_S)
            assert proc.returncode == 0, err[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def start(cmd: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def test_two_nodes_train_the_same_weights_as_one_node_with_two_processes(tmp_path: Path) -> None:
    data = tmp_path / "corpus.txt"
    # ~10 steps of batch 8 x 25 characters: a few seconds of training, most of it start-up.
    data.write_text(make_text(2400, seed=5), encoding="utf-8")

    one_node = tmp_path / "one_node.pt"
    finish([start(torchrun("--standalone", "--nnodes", "1", "--nproc_per_node", "2",
                           data=data, out=one_node))])  # fmt: skip

    two_nodes = tmp_path / "two_nodes.pt"
    port = free_port()
    nodes = []
    for rank in (0, 1):
        launch = (
            "--nnodes", "2", "--nproc_per_node", "1", "--node-rank", str(rank),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", "charrnn-multinode-test",
            # Both "nodes" are this machine: say which one hosts the rendezvous store, as the
            # endpoint's own host would find out by its name.
            "--rdzv-conf", f"is_host={1 if rank == 0 else 0}",
        )  # fmt: skip
        nodes.append(start(torchrun(*launch, data=data, out=two_nodes)))
    finish(nodes)

    a, b = load_checkpoint(one_node), load_checkpoint(two_nodes)
    for ckpt in (a, b):
        assert ckpt.meta["metrics"]["world_size"] == 2
    assert a.meta["metrics"]["steps"] == b.meta["metrics"]["steps"] >= 8
    assert a.meta["metrics"]["best_val_nll"] == b.meta["metrics"]["best_val_nll"]
    wa, wb = a.model.state_dict(), b.model.state_dict()
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs between the two launches"
    # Only global rank 0 wrote, once: one validation record for the one epoch.
    lines = metrics_path(two_nodes).read_text().splitlines()
    assert sum("val_nll" in line for line in lines) == 1
