"""Reliability of files: full disks, unreadable or hostile checkpoints, half-written files."""
from __future__ import annotations

import errno
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from explorer import checkpoints as ckpt
from explorer.model import resnet20
from explorer.train import main as train_main

TRAIN = ["--synthetic", "40", "--batch-size", "20", "--epochs", "1", "--precision", "fp32", "--device", "cpu",
         "--quiet", "--threads", "1", "--name", "t"]


def test_full_disk_gives_one_clear_error_and_no_partial_file(tmp_path, monkeypatch, capsys):
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()
            return False

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

        def fileno(self):
            return self.f.fileno()

    monkeypatch.setattr(ckpt.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    code = train_main([*TRAIN, "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: cannot write") and "No space left" in err[0]
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # temp files are cleaned up
    assert not (tmp_path / "t.pt").exists()


def test_unwritable_directory_gives_one_clear_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = train_main([*TRAIN, "--out", str(blocker / "ckpts")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: cannot write")


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path):
    path = tmp_path / "m.pt"
    ckpt.save_torch({"a": torch.ones(2)}, path)

    def boom(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ckpt._atomic_write(path, lambda f: boom(None, f))
    assert torch.equal(ckpt.load_torch(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('EVIL_MARK', '/tmp/evil-mark')}",))


def test_malicious_pickle_is_not_run_and_is_reported(tmp_path, monkeypatch):
    mark = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARK", str(mark))
    bad = tmp_path / "evil.pt"
    torch.save({"state_dict": _Evil()}, bad, pickle_protocol=2)
    with pytest.raises(ckpt.CheckpointError, match="not a valid checkpoint"):
        ckpt.load_model(bad)
    assert not mark.exists()


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"PK\x03\x04 truncated"), "not a valid checkpoint"),
    (lambda p: torch.save({"fc.weight": torch.zeros(10, 64)}, p), "not a ResNet20 state dict"),
    (lambda p: torch.save({k: v.float().reshape(-1)[:1] if k == "fc.weight" else v
                           for k, v in resnet20().state_dict().items()}, p), "has shape"),
    (lambda p: torch.save({k: torch.full_like(v, float("nan")) if k == "fc.bias" else v
                           for k, v in resnet20().state_dict().items()}, p), "NaN"),
])
def test_corrupt_or_wrong_checkpoints_are_rejected(tmp_path, make, message):
    path = tmp_path / "bad.pt"
    make(path)
    with pytest.raises(ckpt.CheckpointError, match=message):
        ckpt.load_model(path)


def test_truncated_real_checkpoint_is_rejected(tmp_path):
    good = tmp_path / "good.pt"
    ckpt.save_torch(resnet20().state_dict(), good)
    data = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_model(tmp_path / "cut.pt")


def test_listing_skips_temp_files_and_flags_bad_metadata(tmp_path):
    ckpt.save_torch(resnet20().state_dict(), tmp_path / "ok.pt")
    ckpt.save_json({"architecture": "resnet20", "status": "complete", "test_top1": 0.9}, tmp_path / "ok.json")
    (tmp_path / ".ok.json.abc.tmp").write_text("{")  # a write in progress
    (tmp_path / "broken.json").write_text("{not json")
    ckpt.save_json({"architecture": "vgg", "status": "complete"}, tmp_path / "vgg.json")
    ckpt.save_json({"architecture": "resnet20", "status": "complete"}, tmp_path / "nopt.json")
    ckpt.save_json({"architecture": "resnet20", "status": "training"}, tmp_path / "half.json")
    infos = {c.name: c for c in ckpt.list_checkpoints(tmp_path)}
    assert set(infos) == {"ok", "broken", "vgg", "nopt", "half"}
    assert infos["ok"].complete and infos["ok"].error is None
    assert "unreadable metadata" in infos["broken"].error
    assert "not 'resnet20'" in infos["vgg"].error
    assert "missing" in infos["nopt"].error
    assert not infos["half"].complete and not infos["half"].training  # no live trainer behind it
    assert ckpt.list_checkpoints(tmp_path)[0].name == "ok"  # usable ones first
