"""Reliability of files: full disks, unreadable or hostile checkpoints, half-written files."""
from __future__ import annotations

import errno
import os

import pytest
import torch

from explorer import checkpoints as ckpt
from explorer.model import resnet20
from explorer.cli.train import main as train_main

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


# ---------------------------------------------------------------- checkpoint uploads (explorer.app_support)

def _state_bytes(state) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _one_line_with_fix(message: str) -> None:
    assert "\n" not in message and "\x1b" not in message and len(message) <= 300, message
    assert "torch.save(model.state_dict()" in message  # says what to do


def test_upload_accepts_a_resnet20_state_dict(tmp_path):
    from explorer.app import support as sup

    state = resnet20().state_dict()
    data = _state_bytes(state)
    before = sorted(os.listdir(ckpt.DEFAULT_DIR))
    up = sup.check_upload("../../my run (v2).pt", data)
    assert up.name == "my_run_v2" and up.key == "upload:my_run_v2" and up.weights == data
    assert "uploaded" in up.label and "this session only" in up.label
    (tmp_path / "w.pt").write_bytes(data)
    assert up.digest == sup.read_weights(tmp_path / "w.pt")[1]  # same content key as a shipped file
    model = sup.model_from_bytes(up.weights, up.filename)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    assert sup.check_upload("x.PT", _state_bytes({"state_dict": state})).name == "x"  # trainer-style wrapper
    assert sup.check_upload("/.pt", data).name == "uploaded"
    assert sorted(os.listdir(ckpt.DEFAULT_DIR)) == before  # validation writes nothing


def _bad_uploads():
    good = resnet20().state_dict()
    data = _state_bytes(good)

    def with_(key, value):
        return _state_bytes({k: (value if k == key else v) for k, v in good.items()})

    return [
        ("truncated", "m.pt", data[: len(data) // 2], "not a readable PyTorch file"),
        ("garbage", "m.pt", os.urandom(4096), "not a readable PyTorch file"),
        ("empty", "m.pt", b"", "empty"),
        ("oversize", "m.pt", data + b"\0" * (20 * 2**20), "over the 20 MB upload limit"),
        ("not-pt", "m.pkl", data, "only .pt files"),
        ("tensor", "m.pt", _state_bytes(torch.zeros(3)), "expected a ResNet20 state dict"),
        ("keys", "m.pt", _state_bytes({"fc.weight": torch.zeros(10, 64)}), "not a ResNet20 state dict"),
        ("extra", "m.pt", _state_bytes({**good, "fc2.weight": torch.zeros(1)}), "unexpected 1 keys"),
        ("shape", "m.pt", with_("fc.weight", torch.zeros(100, 64)), "fc.weight has shape (100, 64)"),
        ("nan", "m.pt", with_("layer2.0.conv1.weight", torch.full((32, 16, 3, 3), float("nan"))), "NaN"),
        ("inf", "m.pt", with_("bn1.running_var", torch.full((16,), float("inf"))), "NaN or infinite"),
    ]


@pytest.mark.parametrize("filename, data, message", [c[1:] for c in _bad_uploads()],
                         ids=[c[0] for c in _bad_uploads()])
def test_upload_rejects_bad_files_with_one_line(filename, data, message):
    from explorer.app import support as sup

    with pytest.raises(sup.UploadError) as info:
        sup.check_upload(filename, data)
    assert message in str(info.value)
    _one_line_with_fix(str(info.value))
    assert isinstance(info.value, ckpt.CheckpointError)


def test_upload_with_pickled_code_is_refused_and_not_run(tmp_path, monkeypatch):
    from explorer.app import support as sup

    mark = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARK", str(mark))
    for payload in ({"state_dict": _Evil()}, {**resnet20().state_dict(), "x": _Evil()}, _Evil()):
        with pytest.raises(sup.UploadError, match="refused") as info:
            sup.check_upload("evil.pt", _state_bytes(payload))
        _one_line_with_fix(str(info.value))
    assert not mark.exists()


def test_upload_size_limit_matches_the_server_setting(repo_root):
    import tomllib

    from explorer.app import support as sup

    conf = tomllib.loads((repo_root / ".streamlit" / "config.toml").read_text())
    assert conf["server"]["maxUploadSize"] == sup.MAX_UPLOAD_MB
    assert "max_upload_size=sup.MAX_UPLOAD_MB" in (repo_root / "explorer" / "app" / "sidebar.py").read_text()


def test_upload_link_from_another_session_warns():
    from explorer.app import state

    view, warns = state.parse_query({"ckpt": "upload:teammate"}, ["a"])
    assert view.ckpt == "a" and len(warns) == 1 and "uploaded in another session" in warns[0]


# ---------------------------------------------------------------- missing dataset (CLIs; the app: tests/test_app.py)

def test_missing_data_message_says_how_to_fix(tmp_path):
    from explorer.app import support as sup
    from explorer.data import DataNotFoundError, load_cifar10

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError) as info:
        load_cifar10(tmp_path / "empty", download=False)
    msg = sup.data_error_message(info.value)
    assert "\n" not in msg and "EXPLORER_DATA=DIR" in msg and "streamlit run streamlit_app.py" in msg


def test_train_cli_with_empty_data_dir_exits_with_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = train_main(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), "--quiet", "--threads", "1"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), lines
    assert "EXPLORER_DATA" in lines[0] and "--data" in lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_prune_cli_with_empty_data_dir_exits_with_one_line(tmp_path, repo_root):
    """``python -m explorer.prune`` as a user runs it, with an empty --data directory: exit status 2 and
    one line on stderr saying how to point at the data (no download is attempted for a given dir)."""
    import subprocess
    import sys

    (tmp_path / "empty").mkdir()
    ckpt.save_torch(resnet20().state_dict(), tmp_path / "m.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EXPLORER_CACHE": str(tmp_path / "cache")}
    env.pop("EXPLORER_DATA", None)
    proc = subprocess.run([sys.executable, "-m", "explorer.prune", "--checkpoint", str(tmp_path / "m.pt"),
                           "--data", str(tmp_path / "empty"), "--k", "4"],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "EXPLORER_DATA" in lines[0] and "--data" in lines[0] and proc.stdout == ""
