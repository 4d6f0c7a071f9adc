"""lm-evaluation-harness against the service, run as a user runs it: its ``local-completions``
model with the default tokenizer backend (``auto`` finds /tokenizer_info and /tokenize), no
Hugging Face download, over the shipped example tasks (examples/lm_eval) pointed at texts
this test makes. Its three request types run; ``loglikelihood_rolling``'s bits per byte
equal what /score gives for the same texts (conditioned, as lm-eval does, on the end-of-text
token: the newline), converted from characters to UTF-8 bytes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import httpx
import pytest

from tests.conftest import make_text
from tests.server import ROOT, run_server

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(300)]

TASKS = ("charrnn_rolling", "charrnn_choice", "charrnn_generate")


def test_lm_eval_local_completions(tiny_checkpoint, tmp_path):
    pytest.importorskip("lm_eval")
    texts = [make_text(700, seed=40 + i) for i in range(3)]
    data = {
        "texts": [{"text": t} for t in texts],
        "choice": [
            {"context": "The rabbit said", "choices": [" the", " tha"], "label": 0},
            {"context": "Alice was very", "choices": [" curious.", " eat."], "label": 0},
        ],
        "generate": [{"context": "The queen", "target": " said"}, {"context": "Tea", "target": ""}],
    }
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, rows in data.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for task in TASKS:
        yaml = (ROOT / "examples/lm_eval" / f"{task}.yaml").read_text()
        for name in data:
            yaml = yaml.replace(f"examples/lm_eval/{name}.jsonl", str(tmp_path / f"{name}.jsonl"))
        (tasks / f"{task}.yaml").write_text(yaml)

    with run_server(tmp_path, f"tiny={tiny_checkpoint}") as server:
        out = tmp_path / "out"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        env["HF_HOME"] = str(tmp_path / "hf")  # nothing cached from elsewhere either
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "lm_eval",
                "--model",
                "local-completions",
                "--model_args",
                f"model=tiny,base_url={server.url}/v1/completions",
                "--include_path",
                str(tasks),
                "--tasks",
                ",".join(TASKS),
                "--output_path",
                str(out),
                "--log_samples",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "Using tokenizer remote" in run.stderr + run.stdout
        results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]

        total, size = 0.0, 0
        for text in texts:
            r = httpx.post(f"{server.url}/score", json={"text": text, "context": "\n"}, timeout=60)
            total += sum(r.json()["logprobs"]["token_logprobs"])
            size += len(text.encode("utf-8"))
        want = -total / size / math.log(2)
        assert results["charrnn_rolling"]["bits_per_byte,none"] == pytest.approx(want, rel=1e-9)
        assert 0 <= results["charrnn_choice"]["acc,none"] <= 1
        # generate_until: each answer is the server's greedy completion up to the stop.
        samples = next(out.rglob("samples_charrnn_generate_*.jsonl")).read_text().splitlines()
        for line in samples:
            sample = json.loads(line)
            prompt = sample["arguments"]["gen_args_0"]["arg_0"]
            greedy = httpx.post(
                f"{server.url}/v1/completions",
                json={"prompt": prompt, "max_tokens": 40, "temperature": 0, "stop": [".", "\n"]},
                timeout=60,
            ).json()["choices"][0]["text"]
            assert sample["resps"][0][0] == greedy
