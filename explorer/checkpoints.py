"""Checkpoint files: atomic writes, safe loads, metadata JSON, listing and trainer status.

Per checkpoint name ``<name>`` in a directory (default ``checkpoints/``):

- ``<name>.pt``        the model's state dict (plain tensors; what the app and CLIs load);
- ``<name>.json``      metadata (architecture, accuracy, hyper-parameters, dataset identity...),
                       with ``"status": "complete"`` once training has finished;
- ``<name>.train.pt``  trainer state for ``--resume`` (optimizer, scheduler, RNG, log);
- ``<name>.log.jsonl`` one JSON line of metrics per finished epoch;
- ``<name>.status.json`` live progress of a running trainer (epoch, ETA, latest accuracy, pid).

Every write goes to a temporary file in the same directory and is renamed over the target
(atomic on POSIX), so a crash never leaves a half-written file under a real name. Every load uses
``torch.load(..., weights_only=True)``: a crafted pickle cannot run code.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .model import ResNet20, resnet20

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
DEFAULT_NAME = "resnet20_cifar10"
# JSON files that live beside checkpoints but are not checkpoint metadata: the trainer's status, app
# configurations, and the analysis results of explorer.sensitivity / explorer.search (and its --widths).
NOT_CHECKPOINT_SUFFIXES = (".status.json", ".config.json", ".sensitivity.json", ".search.json", ".baselines.json",
                           ".widths.json")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, unsafe or not a ResNet20: the message says which."""


class UnsafeCheckpointError(CheckpointError):
    """The file holds pickled objects other than tensors, which the safe loader refuses to build."""


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}. Check that the directory is writable.") from None
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide checkpoints from teammates' app servers
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise CheckpointError(f"cannot write {path}: {e.strerror or e} (disk full or read-only?)") from None
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_torch(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (temp file + fsync + rename).

    Raises CheckpointError when the directory is not writable or the disk is full.
    """
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def save_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` atomically. Raises CheckpointError like :func:`save_torch`."""
    _atomic_write(Path(path), lambda f: f.write(data))


def save_json(obj, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically. Raises CheckpointError like save_torch."""
    data = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()
    _atomic_write(Path(path), lambda f: f.write(data))


def load_torch(source: str | os.PathLike | bytes, name: str | None = None):
    """``torch.load(source, weights_only=True)`` on CPU; ``source`` is a file path or the bytes of
    one (an upload; ``name`` is what messages call it).

    Raises CheckpointError for a missing or truncated file, UnsafeCheckpointError (a CheckpointError)
    for one that needs arbitrary pickle code to load; no code from the file is ever run.
    """
    if isinstance(source, (bytes, bytearray)):
        shown, f = name or "upload", io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such checkpoint file")
        shown, f = name or path.name, path
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad magic, or a pickle global the safe loader refuses
        head = bytes(source[:64]) if isinstance(source, (bytes, bytearray)) else _head(path)
        suffix = "" if isinstance(source, (bytes, bytearray)) else path.suffix.lower()
        unsafe, reason = load_failure(e, head, suffix)
        raise (UnsafeCheckpointError if unsafe else CheckpointError)(f"{shown}: not a valid checkpoint: {reason}") from None


SAVE_HINT = "pass a ResNet20 state dict saved with torch.save(model.state_dict(), 'name.pt')"


def _head(path: Path, n: int = 64) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def load_failure(error: BaseException, head: bytes = b"", suffix: str = "") -> tuple[bool, str]:
    """Why ``torch.load(..., weights_only=True)`` refused a file, in one plain line with what to do.

    ``head``: the file's first bytes; ``suffix``: its lower-case extension (both may be empty).
    Returns (unsafe, reason): ``unsafe`` when the file holds pickled objects other than tensors.
    torch's own message is not shown: its first line is cut mid-sentence, carries terminal colour
    codes and reads as advice to switch the safe loader off, which would run the file's code."""
    text = str(error)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if isinstance(error, pickle.UnpicklingError) and (found or re.search(r"unsupported (global|class)", text, re.I)):
        what = f" (here {found.group(1)})" if found else ""
        fix = "convert numpy arrays with torch.from_numpy and " if found and found.group(1).startswith("numpy") else ""
        return True, (f"it holds pickled objects other than tensors{what}, which are refused because loading them "
                      f"could run code; {fix}{SAVE_HINT}")
    stripped = head.lstrip()
    if suffix == ".json" or stripped[:1] in (b"{", b"["):
        return False, ("this is a JSON file (checkpoint metadata or a clustering configuration), not weights; "
                       "pass the .pt file beside it")
    if suffix == ".onnx" or head[:1] == b"\x08":  # ONNX ModelProto starts with field 1 (ir_version)
        return False, ("this is an ONNX export, which cannot be loaded back; pass the .pt state dict it was "
                       "exported from (a compressed export's .pt loads with explorer.compress.load_compressed)")
    if not head:
        return False, f"the file is empty; {SAVE_HINT}"
    return False, f"not a readable PyTorch file (truncated or corrupt?); {SAVE_HINT}"


def validate_state_dict(state: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Check that ``state`` is a ResNet20 state dict: same keys, shapes, float dtypes, finite values.

    Returns it. Raises CheckpointError saying what is wrong.
    """
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source}: expected a ResNet20 state dict (name -> tensor)")
    ref = resnet20().state_dict()
    missing = sorted(set(ref) - set(state))
    extra = sorted(set(state) - set(ref))
    if missing or extra:
        what = []
        if missing:
            what.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
        if extra:
            what.append(f"unexpected {len(extra)} keys (e.g. {extra[0]})")
        raise CheckpointError(f"{source}: not a ResNet20 state dict: {'; '.join(what)}")
    for k, v in ref.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: {k} has shape {tuple(state[k].shape)}, ResNet20 needs {tuple(v.shape)}")
        if v.is_floating_point() and not torch.isfinite(state[k]).all():
            raise CheckpointError(f"{source}: {k} holds NaN or infinite values")
    return state


def load_model(source: str | os.PathLike | bytes, name: str | None = None) -> ResNet20:
    """Load a ResNet20 from a ``.pt`` state dict (a path, or its bytes as in :func:`load_torch`),
    safely, in eval mode on CPU.

    Raises CheckpointError when the file is missing, unsafe, corrupt or not a ResNet20.
    """
    shown = name or ("upload" if isinstance(source, (bytes, bytearray)) else Path(source).name)
    state = validate_state_dict(load_torch(source, shown), shown)
    model = resnet20()
    model.load_state_dict(state)
    return model.eval()


def read_json(path: str | os.PathLike) -> dict:
    """Parse a JSON file. Raises CheckpointError when missing or malformed."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.name}: metadata file missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path.name}: unreadable metadata ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path.name}: metadata must be a JSON object")
    return obj


@dataclass(frozen=True)
class CheckpointInfo:
    """One entry of :func:`list_checkpoints`: name, paths, metadata, live status (if training)
    and an error message when the checkpoint cannot be used."""

    name: str
    path: Path
    meta: dict
    status: dict | None
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.error is None and self.meta.get("status") == "complete" and self.path.is_file()

    @property
    def training(self) -> bool:
        return self.status is not None and self.status.get("state") == "running" and pid_alive(self.status.get("pid"))

    @property
    def top1(self) -> float | None:
        return self.meta.get("test_top1")

    def label(self) -> str:
        if self.error:
            return f"{self.name} (invalid)"
        if self.complete:
            return f"{self.name} - {100 * self.top1:.2f}% top-1, {self.meta.get('dataset', {}).get('name', '?')}"
        if self.training:
            s = self.status
            return f"{self.name} - training, epoch {s.get('epoch', 0)}/{s.get('epochs', '?')}"
        return f"{self.name} (incomplete)"


def pid_alive(pid) -> bool:
    """Whether process ``pid`` is running (a zombie, finished but not reaped, is not)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def paths(directory: str | os.PathLike, name: str) -> dict[str, Path]:
    """The file paths that belong to checkpoint ``name`` in ``directory`` (see module doc)."""
    d = Path(directory)
    return {
        "weights": d / f"{name}.pt",
        "meta": d / f"{name}.json",
        "train": d / f"{name}.train.pt",
        "log": d / f"{name}.log.jsonl",
        "status": d / f"{name}.status.json",
    }


def list_checkpoints(directory: str | os.PathLike = DEFAULT_DIR) -> list[CheckpointInfo]:
    """Every checkpoint in ``directory`` that has metadata, complete ones first, then by name.

    Never raises for a bad file: such entries carry ``error``. Half-written files (temporary
    names) are never listed.
    """
    d = Path(directory)
    out = []
    if not d.is_dir():
        return out
    for meta_path in sorted(d.glob("*.json")):
        if meta_path.name.startswith(".") or meta_path.name.endswith(NOT_CHECKPOINT_SUFFIXES):
            continue
        name = meta_path.name[: -len(".json")]
        p = paths(d, name)
        status = None
        if p["status"].is_file():
            try:
                status = read_json(p["status"])
            except CheckpointError:
                status = None
        try:
            meta = read_json(meta_path)
            err = None
            if meta.get("architecture") != "resnet20":
                err = f"{meta_path.name}: architecture {meta.get('architecture')!r} is not 'resnet20'"
            elif meta.get("status") == "complete" and not p["weights"].is_file():
                err = f"{name}.pt missing"
        except CheckpointError as e:
            meta, err = {}, str(e)
        out.append(CheckpointInfo(name, p["weights"], meta, status, err))
    out.sort(key=lambda c: (not c.complete, c.name))
    return out


def write_status(path: Path, **fields) -> None:
    """Atomically write the trainer's status file (``updated`` time added)."""
    save_json({**fields, "updated": time.time()}, path)
