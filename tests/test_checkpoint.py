import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from charrnn import CheckpointError, Vocabulary, load_checkpoint, save_checkpoint
from tests.conftest import tiny_model


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, Vocabulary]:
    vocab = Vocabulary.from_text("hello, world!\n")
    path = tmp_path / "m.pt"
    save_checkpoint(path, tiny_model(vocab), vocab, {"metrics": {"best_val_nll": 1.5}})
    return path, vocab


def test_round_trip(saved):
    path, vocab = saved
    ckpt = load_checkpoint(path)
    assert ckpt.vocab == vocab
    assert not ckpt.model.training
    assert ckpt.meta["metrics"]["best_val_nll"] == 1.5
    ref = tiny_model(vocab)
    for (k, a), (_, b) in zip(
        ckpt.model.state_dict().items(), ref.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k


def test_save_is_atomic_and_leaves_no_temp_files(saved, monkeypatch):
    path, vocab = saved
    before = path.read_bytes()

    def boom(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(path, tiny_model(vocab, seed=9), vocab)
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == ["m.pt"]


def _expect(path: Path, fragment: str) -> None:
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)
    assert fragment in str(e.value)


def test_missing_file(tmp_path):
    _expect(tmp_path / "nope.pt", "file not found")


def test_empty_file(tmp_path):
    (tmp_path / "e.pt").write_bytes(b"")
    _expect(tmp_path / "e.pt", "file is empty")


def test_truncated_file(saved):
    path, _ = saved
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _expect(path, "corrupt or truncated")


def test_corrupt_bytes(tmp_path):
    (tmp_path / "c.pt").write_bytes(os.urandom(4096))
    _expect(tmp_path / "c.pt", "corrupt or truncated")


def test_wrong_version(saved):
    path, _ = saved
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, path)
    _expect(path, "unsupported format version 99")


def test_foreign_file(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "f.pt")
    _expect(tmp_path / "f.pt", "not a CharRNN checkpoint")


def test_vocabulary_that_does_not_fit_the_weights(saved):
    path, _ = saved
    payload = torch.load(path, weights_only=True)
    payload["vocab"] = "abc"
    torch.save(payload, path)
    _expect(path, "vocabulary has 3 characters")


def test_weights_that_do_not_fit_the_architecture(saved):
    path, _ = saved
    payload = torch.load(path, weights_only=True)
    payload["config"]["hidden"] = 64
    torch.save(payload, path)
    _expect(path, "weights do not match the architecture")


class _Payload:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "charrnn", "format_version": 1, "x": _Payload(str(marker))}, evil)
    _expect(evil, "refused to load")
    assert not marker.exists()
    # A bare pickle (not a torch zip) with the same payload is refused as well.
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw)
    assert not marker.exists()
    assert zipfile.is_zipfile(evil)


def test_saved_file_is_world_readable(saved):
    path, _ = saved
    assert path.stat().st_mode & 0o777 == 0o644


def test_unreadable_file(saved, monkeypatch):
    path, _ = saved

    def denied(*_a, **_k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(zipfile, "is_zipfile", denied)
    _expect(path, "cannot read the file: Permission denied")
