"""The README's curl examples, run against a real server with the shipped model: each one
answers what the README shows under it (scripts/readme_examples.py renders both), so the
shapes and figures a reader sees are the ones the service gives."""

from __future__ import annotations

import json

import pytest

from scripts.readme_examples import README, _events, examples, render, run
from tests.server import ROOT, Server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.e2e,
    pytest.mark.timeout(300),
    # The shipped model, on the CPU as the README's outputs were made (int8 sums are the same on
    # every x86 CPU): the ``server`` fixture.
    pytest.mark.server(models=f"alice={ROOT / 'models/alice.pt'}", device="cpu"),
]


def test_every_curl_example_gives_the_output_shown(server: Server):
    found = examples(README.read_text(encoding="utf-8"))
    assert len(found) >= 9, [ex.command for ex in found]
    wrong = []
    for ex in found:
        assert ex.shown, f"no output shown under {ex.command!r}"
        output = run(ex.command, server.url)
        if output.startswith("event:"):  # a stream: start, one token per character, done
            events = _events(output)
            names = [name for name, _ in events]
            assert names[0] == "start" and names[-1] == "done", names
            text = "".join(json.loads(d)["text"] for n, d in events if n == "token")
            assert json.loads(events[-1][1])["generated_text"] == text
        else:
            value = json.loads(output)  # an answer, or texts picked out of one with jq
            assert isinstance(value, dict) or all(isinstance(v, str) for v in value), output
        if render(output) != ex.shown:
            wrong.append(ex.command)
    assert not wrong, f"run scripts/readme_examples.py --write; outputs differ for: {wrong}"


def test_the_score_example_figures(server: Server):
    """The /score example's nll and first logprobs, to the README's 3 decimals."""
    ex = next(e for e in examples(README.read_text(encoding="utf-8")) if "/score" in e.command)
    got = json.loads(run(ex.command, server.url))
    shown = " ".join(ex.shown)
    assert f'"nll": {round(got["nll"], 3)}' in shown
    first = got["logprobs"]["token_logprobs"][:2]
    assert f'"token_logprobs": [{round(first[0], 3)}, {round(first[1], 3)}' in shown
    assert got["chars"] == got["scored_chars"] == 32  # the context conditions the first one


def test_examples_are_found_with_their_outputs():
    text = (
        "```bash\ncurl -s localhost:8000/a \\\n  -d '{}'\n# → {\"x\": 1}\n#   more\n"
        "# a comment\ncurl -s localhost:8000/b\n```\n```python\ncurl -s no\n```\n"
    )
    found = examples(text)
    assert [e.command for e in found] == [
        "curl -s localhost:8000/a -d '{}'",
        "curl -s localhost:8000/b",
    ]
    assert found[0].shown == ['# → {"x": 1}', "#   more"] and found[1].shown == []
    assert render('{"timings": {"a": 1}, "nll": 0.84349, "s": "' + "x" * 50 + '"}') == [
        '# → {"timings": "…", "nll": 0.843, "s": "' + "x" * 40 + '…"}'
    ]
