"""Models at run time: load a checkpoint under a name, swap a name to another checkpoint,
unload one, behind an admin key; every answer names the checkpoint that served it."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import httpx
import pytest

from charrnn import Vocabulary, save_checkpoint
from tests.conftest import make_text, run, tiny_model

ADMIN = {"Authorization": "Bearer admin-key"}


@pytest.fixture
def model_dir(tmp_path: Path, tiny_checkpoint: Path) -> Path:
    """A model folder with the tiny checkpoint, another one of other weights, and a file
    that is no checkpoint."""
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(tiny_checkpoint, folder / "a.pt")
    vocab = Vocabulary.from_text(make_text())
    save_checkpoint(folder / "b.pt", tiny_model(vocab, seed=7), vocab, {"metrics": {}})
    (folder / "broken.pt").write_bytes(b"not a checkpoint at all")
    return folder


def test_the_admin_routes_are_absent_without_admin_keys(tiny_checkpoint):
    async def test(c: httpx.AsyncClient) -> None:
        r = await c.post("/admin/models", json={"name": "x", "path": "a.pt"}, headers=ADMIN)
        assert r.status_code == 404

    run(tiny_checkpoint, test)


def test_load_swap_and_unload(model_dir):
    body = {"prime": "Alice ", "max_new_chars": 30, "seed": 3}

    async def test(c: httpx.AsyncClient) -> None:
        first = (await c.post("/generate", json=body)).json()
        r = await c.post("/admin/models", json={"name": "two", "path": "b.pt"})
        assert r.status_code == 401
        bad = {"Authorization": "Bearer nope"}
        r = await c.post("/admin/models", json={"name": "two", "path": "b.pt"}, headers=bad)
        assert r.status_code == 401
        r = await c.post("/admin/models", json={"name": "two", "path": "b.pt"}, headers=ADMIN)
        assert r.status_code == 200, r.text
        b_sha = r.json()["checkpoint"]
        assert b_sha != first["checkpoint"]
        cards = {m["id"]: m["checkpoint"] for m in (await c.get("/v1/models")).json()["data"]}
        assert cards == {"tiny": first["checkpoint"], "two": b_sha}
        two = (await c.post("/generate", json={**body, "model": "two"})).json()
        assert two["checkpoint"] == b_sha and two["generated_text"] != first["generated_text"]
        # Refusals: the name is taken, a path outside the folder, a broken checkpoint, an
        # unknown name, the default model; the models served before keep serving.
        for method, path, json, status in (
            ("POST", "/admin/models", {"name": "two", "path": "a.pt"}, 409),
            ("POST", "/admin/models", {"name": "x", "path": "../a.pt"}, 422),
            ("POST", "/admin/models", {"name": "x", "path": "missing.pt"}, 422),
            ("PUT", "/admin/models/tiny", {"path": "broken.pt"}, 422),
            ("PUT", "/admin/models/nope", {"path": "b.pt"}, 404),
            ("DELETE", "/admin/models/tiny", None, 409),
        ):
            r = await c.request(method, path, json=json, headers=ADMIN)
            assert r.status_code == status, (path, json, r.text)
            assert r.json()["detail"], r.text
        again = (await c.post("/generate", json=body)).json()
        assert again["generated_text"] == first["generated_text"]
        # A swap: the name serves the other weights, a generation running across it ends on
        # the old ones, and the old model stops once it has.
        long = asyncio.ensure_future(c.post("/generate", json={**body, "max_new_chars": 90_000}))
        await asyncio.sleep(0.1)
        r = await c.put("/admin/models/tiny", json={"path": "b.pt"}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["checkpoint"] == b_sha
        assert not long.done()  # it runs across the swap
        after = (await c.post("/generate", json=body)).json()
        assert after["checkpoint"] == b_sha and after["generated_text"] == two["generated_text"]
        before = await long
        assert before.status_code == 200 and before.json()["checkpoint"] == first["checkpoint"]
        engine = c.app.state.engine  # type: ignore[attr-defined]
        for _ in range(100):
            if not engine.retiring:
                break
            await asyncio.sleep(0.05)
        assert not engine.retiring  # the old model's decode thread has stopped
        r = await c.delete("/admin/models/two", headers=ADMIN)
        assert r.status_code == 204
        r = await c.post("/generate", json={**body, "model": "two"})
        assert r.status_code == 404

    run(
        model_dir / "a.pt",
        test,
        admin_keys="admin-key",
        model_dir=str(model_dir),
        max_new_chars_limit=100_000,
    )


def test_a_checkpoint_that_cannot_generate_is_refused_and_the_old_one_serves(
    model_dir, monkeypatch
):
    from app.engine.engine import Engine, WarmUpFailed

    async def test(c: httpx.AsyncClient) -> None:
        before = (await c.post("/generate", json={"prime": "Alice", "seed": 1})).json()

        async def cannot_generate(self, model) -> None:  # type: ignore[no-untyped-def]
            await model.scheduler.close()
            raise WarmUpFailed(f"warm-up of model {model.name} failed: injected")

        monkeypatch.setattr(Engine, "_warm", cannot_generate)
        r = await c.put("/admin/models/tiny", json={"path": "b.pt"}, headers=ADMIN)
        assert r.status_code == 422 and "injected" in r.text
        after = (await c.post("/generate", json={"prime": "Alice", "seed": 1})).json()
        assert after == {**before, "timings": after["timings"]}

    run(model_dir / "a.pt", test, admin_keys="admin-key", model_dir=str(model_dir))


SHIPPED = Path(__file__).resolve().parents[1] / "models" / "alice.pt"


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def shipped_pair(tmp_path: Path) -> Path:
    """The shipped model, and the same network with its weights nudged (another sha256)."""
    import torch

    from charrnn.checkpoint import load_checkpoint

    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(SHIPPED, folder / "a.pt")
    ckpt = load_checkpoint(SHIPPED)
    with torch.no_grad():
        ckpt.model.head.bias.add_(0.01)
    save_checkpoint(folder / "b.pt", ckpt.model, ckpt.vocab, ckpt.meta)
    return folder


async def _swap_under_load(url: str, swap, pid: int = 0) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """32 streams running and new requests arriving while ``swap()`` runs: what each saw."""
    from httpx_sse import aconnect_sse

    body = {"prime": "Alice was ", "max_new_chars": 4000, "temperature": 0.8}
    started = asyncio.Event()
    streams: list[tuple[str, str]] = []  # (start's checkpoint, last event)

    async with httpx.AsyncClient(base_url=url, timeout=120) as c:

        async def stream(seed: int) -> None:
            async with aconnect_sse(
                c, "POST", "/generate/stream", json={**body, "seed": seed}
            ) as es:
                first, last = "", ""
                async for e in es.aiter_sse():
                    if e.event == "start":
                        first = e.json()["checkpoint"]
                        if len(streams) == 31:
                            started.set()
                    last = e.event
                streams.append((first, last))

        steady: list[tuple[float, int, str]] = []  # (sent at, status, checkpoint)
        stop = asyncio.Event()

        async def arrivals() -> None:
            loop = asyncio.get_running_loop()
            while not stop.is_set():
                sent = loop.time()
                r = await c.post("/generate", json={"prime": "The ", "max_new_chars": 20})
                steady.append((sent, r.status_code, r.json().get("checkpoint", "")))
                await asyncio.sleep(0.02)

        tasks = [asyncio.ensure_future(stream(i)) for i in range(32)]
        feeder = asyncio.ensure_future(arrivals())
        await asyncio.sleep(1.0)
        loop = asyncio.get_running_loop()
        asked = loop.time()
        await swap()
        swapped = loop.time()
        both = _rss_mib(pid) if pid else 0.0  # the old model still serves the 32 streams
        await asyncio.sleep(1.0)
        stop.set()
        await feeder
        await asyncio.gather(*tasks)
    return {
        "streams": streams,
        "steady": steady,
        "asked": asked,
        "swapped": swapped,
        "both_mib": both,
    }


def _check(seen: dict, old: str, new: str) -> None:
    assert len(seen["streams"]) == 32
    assert all(last == "done" for _, last in seen["streams"]), seen["streams"]
    assert {first for first, _ in seen["streams"]} == {old}  # begun before: the old weights
    assert all(status == 200 for _, status, _ in seen["steady"])
    after = [sha for sent, _, sha in seen["steady"] if sent > seen["swapped"]]
    before = [sha for sent, _, sha in seen["steady"] if sent < seen["asked"]]
    assert after and set(after) == {new} and before and set(before) == {old}


def _one_model_under_load(server) -> float:  # type: ignore[no-untyped-def]
    """The server's RSS with one model after the same load without a swap (its caches and
    buffers grown as they will be)."""

    async def nothing() -> None:
        return None

    asyncio.run(_swap_under_load(server.url, nothing))
    return _rss_mib(server.proc.pid)


def _back_to_one_model(pid: int, one_model: float, both: float) -> None:
    """Once the old model's last stream ends, the memory it held goes back: the server's RSS
    ends nearer one model's than two's (what stays is the allocator's, and does not grow
    with further swaps: bench/README.md)."""
    import time

    second = both - one_model
    assert second > 20, (one_model, both)  # two models were resident: the check can fail
    rss = _rss_mib(pid)
    for _ in range(100):
        if rss - one_model < second / 2:
            return
        time.sleep(0.1)
        rss = _rss_mib(pid)
    raise AssertionError(f"RSS {rss:.0f} MiB: one model {one_model:.0f}, two {both:.0f}")


@pytest.mark.e2e
@pytest.mark.slow
def test_a_swap_under_32_live_streams_drops_nothing(tmp_path, shipped_pair):
    from tests.server import run_server

    folder = shipped_pair
    with run_server(
        tmp_path, f"alice={folder / 'a.pt'}", admin_keys="admin-key", model_dir=str(folder)
    ) as s:
        old = httpx.get(f"{s.url}/v1/models").json()["data"][0]["checkpoint"]
        one_model = _one_model_under_load(s)

        async def swap() -> None:
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                r = await c.put("/admin/models/alice", json={"path": "b.pt"}, headers=ADMIN)
                assert r.status_code == 200, r.text

        seen = asyncio.run(_swap_under_load(s.url, swap, s.proc.pid))
        new = httpx.get(f"{s.url}/v1/models").json()["data"][0]["checkpoint"]
        _check(seen, old, new)
        _back_to_one_model(s.proc.pid, one_model, seen["both_mib"])


@pytest.mark.e2e
@pytest.mark.slow
def test_sighup_rereads_the_models(tmp_path, shipped_pair):
    import os
    import signal

    from tests.server import run_server

    folder = shipped_pair
    env_file = tmp_path / "charrnn.env"
    env_file.write_text(f"CHARRNN_MODELS=alice={folder / 'a.pt'}\n")
    with run_server(tmp_path, "", env={"CHARRNN_ENV_FILE": str(env_file)}) as s:
        old = httpx.get(f"{s.url}/v1/models").json()["data"][0]["checkpoint"]
        one_model = _one_model_under_load(s)

        async def swap() -> None:
            env_file.write_text(f"CHARRNN_MODELS=alice={folder / 'b.pt'}\n")
            os.kill(s.proc.pid, signal.SIGHUP)
            async with httpx.AsyncClient(base_url=s.url) as c:
                for _ in range(200):  # the reload runs in the server: wait for it
                    cards = (await c.get("/v1/models")).json()["data"]
                    if cards[0]["checkpoint"] != old:
                        return
                    await asyncio.sleep(0.05)
            raise AssertionError("SIGHUP did not swap the model")

        seen = asyncio.run(_swap_under_load(s.url, swap, s.proc.pid))
        new = httpx.get(f"{s.url}/v1/models").json()["data"][0]["checkpoint"]
        _check(seen, old, new)
        _back_to_one_model(s.proc.pid, one_model, seen["both_mib"])
        assert "SIGHUP: swapped alice" in s.log()
