"""Shared fixtures.

- Torch runs on one thread (the suite shares a 2-core machine with long training runs).
- Every test that is not marked ``realdata`` gets ``EXPLORER_CACHE`` pointed at a session temp dir,
  so unit tests never read or write the user's ``~/.cache/explorer``. Real-data tests keep the
  default cache, so the decoded ``.npz`` of the JPEG copy is reused between runs.
- ``jpeg_root``: the CIFAR-10 JPEG copy (``$EXPLORER_DATA`` or ``<repo>/../shared/cifar10-jpeg``).
  When it is missing the test is skipped, except under ``CI`` where it fails.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("explorer-cache")


@pytest.fixture(autouse=True)
def _isolated_cache(request, monkeypatch, session_cache):
    if request.node.get_closest_marker("realdata") is None:
        monkeypatch.setenv("EXPLORER_CACHE", str(session_cache))
    yield


@pytest.fixture(scope="session")
def jpeg_root() -> Path:
    root = Path(os.environ.get("EXPLORER_DATA") or REPO.parent / "shared" / "cifar10-jpeg")
    if not root.exists():
        from _apphelpers import unavailable

        unavailable(f"CIFAR-10 JPEG copy not found at {root} (set EXPLORER_DATA)")
    return root


@pytest.fixture(scope="session")
def real_data(jpeg_root):
    """The CIFAR-10 JPEG copy, loaded once per test session."""
    from explorer.data import load_cifar10

    return load_cifar10(jpeg_root)


@pytest.fixture(scope="session")
def shipped_model(repo_root):
    """The shipped ResNet20 checkpoint, loaded safely."""
    from explorer.checkpoints import load_model

    return load_model(repo_root / "checkpoints" / "resnet20_cifar10.pt")
