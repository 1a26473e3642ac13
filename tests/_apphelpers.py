"""Helpers shared by tests/test_app.py and tests/test_browser.py (not a test module)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from explorer import checkpoints as ckpt

NAME = ckpt.DEFAULT_NAME


def unavailable(msg: str) -> None:
    """Skip a test whose data, checkpoint or browser is missing, except under ``CI``, where the
    whole suite must run: there it fails."""
    if os.environ.get("CI"):
        pytest.fail(msg + "; under CI this test must run, not be skipped")
    pytest.skip(msg)


def stable_checkpoint_dir(tmp_dir: Path) -> Path:
    """A checkpoint directory whose weights do not change during the tests: ``checkpoints/`` itself
    once its checkpoint is complete, else a snapshot copy (``.pt`` + ``.json``) in ``tmp_dir`` of the
    weights a running trainer last saved (it rewrites them atomically every epoch), with its metadata
    and status file. Skips (fails
    under CI) when there is no checkpoint at all."""
    real = ckpt.DEFAULT_DIR
    info = next((i for i in ckpt.list_checkpoints(real) if i.name == NAME), None)
    if info is None or not info.path.is_file():
        unavailable(f"no {NAME} checkpoint in {real}")
    if info.complete and not info.training:
        return real
    tmp_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(info.path, tmp_dir / f"{NAME}.pt")
    shutil.copy(real / f"{NAME}.json", tmp_dir / f"{NAME}.json")
    status = real / f"{NAME}.status.json"
    if status.is_file():  # the trainer is alive: the copy is shown "in training", with its progress
        shutil.copy(status, tmp_dir / status.name)
    return tmp_dir
