"""The trainer: exact resume (also after SIGKILL), outputs, LR schedule, flag errors, DDP on CPU.

Runs on tiny synthetic data (160 training images, 5 steps of 32 per epoch) on one thread.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from explorer import checkpoints as ckpt
from explorer.data import CLASSES, synthetic_cifar10
from explorer.evaluate import evaluate
from explorer.cli.train import main
from explorer.training.loop import lr_factor

REPO = Path(__file__).resolve().parent.parent
NAME = "tiny"
# --ema-decay 0.9 so that the saved (EMA) weights actually move within 15 steps.
BASE = ["--synthetic", "160", "--batch-size", "32", "--precision", "fp32", "--device", "cpu",
        "--quiet", "--threads", "1", "--ema-decay", "0.9", "--name", NAME]


def run(out: Path, *extra: str) -> int:
    return main([*BASE, "--out", str(out), *extra])


def files(out: Path) -> dict[str, Path]:
    return ckpt.paths(out, NAME)


def state(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(files(out)["weights"], map_location="cpu", weights_only=True)


def log_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in files(out)["log"].read_text().splitlines()]


def without_seconds(log: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in log]


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), f"{k} differs"


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    """An uninterrupted 4-epoch run, the reference for both resume tests (shared to save CPU)."""
    out = tmp_path_factory.mktemp("ref")
    assert run(out, "--epochs", "4") == 0
    return out


# ---------------------------------------------------------------- (1) exact resume

def test_stop_and_resume_is_bit_identical(ref, tmp_path):
    out = tmp_path / "pieces"
    assert run(out, "--epochs", "4", "--stop-after", "1") == 0
    meta = json.loads(files(out)["meta"].read_text())
    assert meta["status"] == "training" and meta["epochs_done"] == 1
    assert len(log_lines(out)) == 1
    assert ckpt.load_torch(files(out)["train"])["epoch"] == 1
    # the comparison below can tell runs apart: one epoch in, the weights differ from the final ones
    assert not torch.equal(state(out)["conv1.weight"], state(ref)["conv1.weight"])

    assert run(out, "--epochs", "4", "--resume", "--stop-after", "1") == 0
    meta = json.loads(files(out)["meta"].read_text())
    assert meta["status"] == "training" and meta["epochs_done"] == 2
    assert [r["epoch"] for r in log_lines(out)] == [1, 2]

    assert run(out, "--epochs", "4", "--resume") == 0
    assert_same_state(state(ref), state(out))
    assert without_seconds(log_lines(ref)) == without_seconds(log_lines(out))
    a = json.loads(files(ref)["meta"].read_text())
    b = json.loads(files(out)["meta"].read_text())
    assert b["status"] == "complete"
    assert a["test_top1"] == b["test_top1"]
    assert a["per_class"] == b["per_class"]

    # Resuming a finished run changes nothing in the weights or the log.
    assert run(out, "--epochs", "4", "--resume") == 0
    assert_same_state(state(ref), state(out))
    assert without_seconds(log_lines(ref)) == without_seconds(log_lines(out))


# ---------------------------------------------------------------- (2) outputs

def test_outputs_of_a_complete_run(ref):
    f = files(ref)
    model = ckpt.load_model(f["weights"])  # weights_only load + ResNet20 validation
    assert not model.training
    raw = torch.load(f["weights"], map_location="cpu", weights_only=True)
    assert set(raw) == set(model.state_dict())
    assert "n_averaged" not in " ".join(raw)  # a plain ResNet20 state dict, not the AveragedModel's

    meta = ckpt.read_json(f["meta"])
    assert meta["status"] == "complete"
    assert meta["architecture"] == "resnet20"
    assert meta["parameters"] == 269722
    assert meta["epochs"] == 4 and meta["epochs_done"] == 4
    data = synthetic_cifar10(160, 40, seed=1234)
    assert meta["dataset"] == {"name": "synthetic", "fingerprint": data.identity.fingerprint}
    hp = meta["hyperparameters"]
    assert hp["epochs"] == 4 and hp["batch_size"] == 32 and hp["precision"] == "fp32"
    assert hp["lr"] == 0.1 and hp["schedule"] == "cosine" and hp["ema_decay"] == 0.9 and hp["synthetic"] == 160
    assert "git_commit" in meta
    assert meta["git_commit"] is None or len(meta["git_commit"]) == 40
    assert meta["weights"] == "ema" and meta["test_evaluated_in"] == "fp32"
    assert meta["processes"] == 1 and meta["device"] == "cpu"
    assert list(meta["per_class"]) == list(CLASSES)
    assert all(0.0 <= v <= 1.0 for v in meta["per_class"].values())
    # 4 test images per class: top-1 is the mean of the per-class accuracies
    assert meta["test_top1"] == pytest.approx(sum(meta["per_class"].values()) / 10)
    # ... and is what the saved weights really score.
    ev = evaluate(model, data.test_images, data.test_labels)
    assert ev.top1 == pytest.approx(meta["test_top1"])

    status = ckpt.read_json(f["status"])
    assert status["state"] == "complete" and status["epoch"] == 4

    log = log_lines(ref)
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    assert all({"train_loss", "train_top1", "lr", "seconds", "test_top1"} <= set(r) for r in log)
    assert all(math.isfinite(r["train_loss"]) for r in log)
    # lr after each epoch's last step: 20 steps of 5, 10 of warm-up (2 epochs), then cosine to 0
    assert [r["lr"] for r in log] == pytest.approx([0.06, 0.1, 0.05, 0.0], abs=1e-12)

    listed = {c.name: c for c in ckpt.list_checkpoints(ref)}
    assert listed[NAME].complete and listed[NAME].top1 == meta["test_top1"]
    assert not list(ref.glob(".*.tmp"))


# ---------------------------------------------------------------- (3) schedule

def test_lr_factor_warmup_then_cosine():
    total, warm = 100, 10
    f = [lr_factor(s, total, warm, "cosine") for s in range(total + 1)]
    assert f[0] == pytest.approx(0.1) and f[4] == pytest.approx(0.5) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:10], f[1:10]))  # linear ramp
    assert f[10] == pytest.approx(1.0)
    assert f[55] == pytest.approx(0.5)  # half-way through the cosine
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone decay
    assert f[99] == pytest.approx(0.0, abs=5e-4) and f[99] > 0
    assert f[100] == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(150, total, warm, "cosine") == pytest.approx(0.0, abs=1e-12)  # clamped, not rising again


def test_lr_factor_step_and_constant():
    f = [lr_factor(s, 100, 0, "step") for s in range(100)]
    assert f[0] == 1.0 and f[49] == 1.0
    assert f[50] == pytest.approx(0.1) and f[74] == pytest.approx(0.1)
    assert f[75] == pytest.approx(0.01) and f[99] == pytest.approx(0.01)
    assert lr_factor(3, 100, 10, "step") == pytest.approx(0.4)  # warm-up applies to every schedule
    assert [lr_factor(s, 100, 0, "constant") for s in (0, 50, 99)] == [1.0, 1.0, 1.0]


# ---------------------------------------------------------------- (4) flag errors

@pytest.mark.parametrize("bad, mentions", [
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "1"], "--batch-size"),
    (["--lr", "0"], "--lr"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--label-smoothing", "1"], "--label-smoothing"),
    (["--ema-decay", "1"], "--ema-decay"),
    (["--eval-every", "0"], "--eval-every"),
    (["--name", "a/b"], "--name"),
    (["--batch-size", "320"], "exceeds"),
])
def test_bad_flags_return_2_with_one_error_line(tmp_path, capsys, bad, mentions):
    capsys.readouterr()
    assert run(tmp_path / "out", "--epochs", "2", *bad) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error:")
    assert mentions in lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_data_returns_2(tmp_path, capsys):
    capsys.readouterr()
    assert main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path), "--quiet", "--threads", "1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "EXPLORER_DATA" in lines[0]


def test_resume_with_different_lr_returns_2(ref, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(ref, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert run(out, "--epochs", "4", "--resume", "--lr", "0.05") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "lr" in lines[0] and "0.1" in lines[0] and "0.05" in lines[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing rewritten
    assert run(out, "--epochs", "5", "--resume") == 2


# ---------------------------------------------------------------- (5) SIGKILL and resume

def test_sigkill_then_resume_matches_uninterrupted(ref, tmp_path):
    out = tmp_path / "killed"
    out.mkdir()
    log = files(out)["log"]
    with open(tmp_path / "child.stderr", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "explorer.train", *BASE, "--epochs", "4", "--out", str(out)],
                                cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 120
            while not (log.is_file() and log.read_text().strip()):
                assert proc.poll() is None, (tmp_path / "child.stderr").read_text()
                assert time.monotonic() < deadline, "no epoch finished within 120 s"
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL  # it was killed, it did not finish by itself
    assert ckpt.read_json(files(out)["meta"]).get("status") != "complete"
    assert 1 <= len(log_lines(out)) < 4

    assert run(out, "--epochs", "4", "--resume") == 0
    assert_same_state(state(ref), state(out))
    lines = log.read_text().splitlines()
    assert len(lines) == 4
    assert [r["epoch"] for r in log_lines(out)] == [1, 2, 3, 4]
    assert without_seconds(log_lines(out)) == without_seconds(log_lines(ref))
    meta = ckpt.read_json(files(out)["meta"])
    assert meta["status"] == "complete"
    assert meta["test_top1"] == ckpt.read_json(files(ref)["meta"])["test_top1"]


# ---------------------------------------------------------------- (6) DDP on CPU

def test_ddp_two_processes_on_cpu(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "explorer.train", "--synthetic", "160", "--batch-size", "32", "--epochs", "1",
           "--precision", "fp32", "--device", "cpu", "--quiet", "--threads", "1", "--out", str(out), "--name", NAME]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    f = files(out)
    model = ckpt.load_model(f["weights"])
    assert sum(p.numel() for p in model.parameters()) == 269722
    meta = ckpt.read_json(f["meta"])
    assert meta["status"] == "complete"
    assert meta["processes"] == 2 and meta["epochs_done"] == 1
    assert list(meta["per_class"]) == list(CLASSES)
    log = log_lines(out)
    assert len(log) == 1 and log[0]["epoch"] == 1
    # loss summed over both ranks and divided by steps * world: a per-example mean, not doubled
    assert 0.5 < log[0]["train_loss"] < 10
    assert 0.0 <= log[0]["train_top1"] <= 1.0
    assert ckpt.read_json(f["status"])["state"] == "complete"
    assert not list(out.glob(".*.tmp"))


def test_the_loop_accepts_a_compiled_forward():
    # --compile used to fail before the first step: the loop asked the torch.compile wrapper for
    # its truth value, which it answers through len() (a TypeError for ResNet20).
    from explorer.model import resnet20
    from explorer.training.loop import Hooks

    m = resnet20()
    fwd = torch.compile(m)  # lazy: nothing compiles until it is called
    assert Hooks(m, fwd).forward is fwd and Hooks(m).forward is m
