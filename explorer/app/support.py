"""What the Streamlit app needs besides widgets and view state (:mod:`.state`), kept free of
Streamlit so it can be tested directly:

- which checkpoints the app offers (:func:`usable_checkpoints`) and how they are labelled;
- checkpoint uploads (:func:`check_upload`): size-limited, loaded with ``weights_only=True`` and
  validated like shipped checkpoints, kept in the uploading session's memory only;
- the message shown when there is no dataset (:func:`data_error_message`);
- results for a configuration: ``Explorer.run`` (exact shortcut for "nothing clustered" there);
- download payloads (:func:`config_json`, :func:`compressed_zip`);
- the optional "train a new checkpoint" and "fine-tune this configuration" launchers
  (:func:`launch_training`, :func:`launch_finetune`): one detached ``python -m explorer.train`` or
  ``python -m explorer.finetune`` at a time, off unless enabled (:func:`training_enabled`).
"""
from __future__ import annotations

import dataclasses
import fcntl
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .. import checkpoints as ckpt
from ..clustering import ClusteringConfig
from ..digest import digest

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
ENV_CHECKPOINTS = "EXPLORER_CHECKPOINTS"
ENV_ALLOW_TRAINING = "EXPLORER_ALLOW_TRAINING"
ENV_LOG_DIR = "EXPLORER_LOG_DIR"


# ---------------------------------------------------------------- checkpoints

def checkpoint_dir() -> Path:
    """``$EXPLORER_CHECKPOINTS`` or the repository's ``checkpoints/``."""
    d = os.environ.get(ENV_CHECKPOINTS)
    return Path(d).expanduser() if d else ckpt.DEFAULT_DIR


def usable_checkpoints(infos: list[ckpt.CheckpointInfo]) -> list[ckpt.CheckpointInfo]:
    """Checkpoints the app can explore, in the order of :func:`explorer.checkpoints.list_checkpoints`
    (complete first): complete ones, and ones still in training (or stopped before the end) whose
    ``.pt`` exists. Entries with an ``error`` are left out (the app lists them separately)."""
    return [i for i in infos if i.error is None and (i.complete or i.path.is_file())]


def checkpoint_label(info: ckpt.CheckpointInfo) -> str:
    """The picker's label: accuracy and dataset for complete checkpoints, training progress (and the
    words "in training") otherwise."""
    if info.complete:
        return info.label()
    if info.training:
        s = info.status or {}
        what = "fine-tuning" if "finetune" in info.meta else "in training"
        return f"{info.name} - {what}, epoch {_epoch(s.get('epoch'))}/{s.get('epochs', '?')}"
    done = info.meta.get("epochs_done")
    return f"{info.name} - incomplete ({done}/{info.meta.get('epochs', '?')} epochs, trainer not running)"


def _epoch(e) -> str:
    try:
        return f"{float(e):.1f}".rstrip("0").rstrip(".")
    except (TypeError, ValueError):
        return "?"


MAX_WEIGHTS_BYTES = 64 * 2**20  # a ResNet20 state dict is ~1.1 MB


def read_weights(path: str | os.PathLike) -> tuple[bytes, str]:
    """The bytes of a ``.pt`` weights file and their content digest (sha256 prefix).

    The app keys its loaded models by this digest, so identical weights under several names share
    one model, and a file rewritten by a running trainer (atomically, once per epoch) is a new one.
    The model is then built from these very bytes (:func:`model_from_bytes`), never from a second
    read that could see a newer epoch. Raises CheckpointError when the file is missing, unreadable
    or implausibly large."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_WEIGHTS_BYTES:
            raise ckpt.CheckpointError(f"{path.name}: {size / 2**20:.0f} MB is too large for a ResNet20 state dict")
        data = path.read_bytes()
    except FileNotFoundError:
        raise ckpt.CheckpointError(f"{path.name}: no such checkpoint file") from None
    except OSError as e:
        raise ckpt.CheckpointError(f"{path.name}: unreadable ({e.strerror or e})") from None
    return data, digest(data, algorithm="sha256", length=20)


def model_from_bytes(data: bytes, source: str):
    """A ResNet20 in eval mode from the bytes of a ``.pt`` state dict:
    :func:`explorer.checkpoints.load_model` on the bytes (``torch.load(..., weights_only=True)``, no
    pickle code runs, then :func:`explorer.checkpoints.validate_state_dict`). Raises CheckpointError."""
    return ckpt.load_model(data, source)


# ---------------------------------------------------------------- uploads

MAX_UPLOAD_MB = 20  # keep in step with server.maxUploadSize in .streamlit/config.toml
MAX_UPLOAD_BYTES = MAX_UPLOAD_MB * 2**20
UPLOAD_PREFIX = "upload:"  # picker key of a session's uploaded checkpoint; never a file name in checkpoints/
# Uploaded checkpoints' Explorers: at most this many per server process, each with a small activation
# cache, so visitors' uploads can neither evict the shipped checkpoints' models nor grow memory unbounded.
MAX_UPLOAD_EXPLORERS = 2
UPLOAD_ACTIVATION_CACHE_MB = 256
_SAVE_HINT = "upload a ResNet20 state dict saved with torch.save(model.state_dict(), 'name.pt')"


class UploadError(ckpt.CheckpointError):
    """An uploaded file is not a usable checkpoint; the message is one line: what is wrong, what to do."""


@dataclass(frozen=True)
class UploadedCheckpoint:
    """A validated upload, held in the uploading session's state only (never written to disk).
    ``key`` is its picker entry, ``name`` the sanitised file stem (used for download names),
    ``digest`` the content digest (as :func:`read_weights`)."""

    key: str
    name: str
    filename: str
    weights: bytes = dataclasses.field(repr=False)
    digest: str

    @property
    def label(self) -> str:
        return f"{self.name} - uploaded, this session only ({len(self.weights) / 2**20:.1f} MB)"


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(text)).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def upload_name(filename: str) -> str:
    """A safe display/download stem for an uploaded file name: no directories, only letters, digits,
    '_', '-' and '.', at most 64 characters ("uploaded" when nothing is left)."""
    base = re.split(r"[\\/]", str(filename))[-1]
    if base.lower().endswith(".pt"):
        base = base[:-3]
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("._-")[:64]
    return base or "uploaded"


def check_upload(filename: str, data: bytes, max_bytes: int = MAX_UPLOAD_BYTES) -> UploadedCheckpoint:
    """Validate an uploaded checkpoint: a ``.pt`` name, at most ``max_bytes``, loadable with
    ``torch.load(..., weights_only=True)`` (no pickle code runs) and a ResNet20 state dict with the
    right keys, shapes and finite values (as :func:`model_from_bytes`). Returns the upload; raises
    UploadError with a one-line reason and what to do. Nothing is written to disk."""
    shown = _one_line(str(filename), 80)
    if not str(filename).lower().endswith(".pt"):
        raise UploadError(f"{shown}: only .pt files are accepted; {_SAVE_HINT}")
    size = len(data)
    if size > max_bytes:
        raise UploadError(f"{shown}: {size / 2**20:.1f} MB is over the {max_bytes / 2**20:.0f} MB upload limit "
                          f"(a ResNet20 state dict is about 1.1 MB); {_SAVE_HINT}")
    if size == 0:
        raise UploadError(f"{shown}: the file is empty; {_SAVE_HINT}")
    try:
        state = ckpt.load_torch(data, shown)
    except ckpt.UnsafeCheckpointError:
        raise UploadError(f"{shown}: refused, it holds pickled objects other than tensors (which could run "
                          f"code); {_SAVE_HINT}") from None
    except ckpt.CheckpointError:
        raise UploadError(f"{shown}: not a readable PyTorch file (truncated or corrupt?); {_SAVE_HINT}") from None
    try:
        ckpt.validate_state_dict(state, shown)
    except ckpt.CheckpointError as e:
        raise UploadError(_one_line(f"{e}; {_SAVE_HINT}")) from None
    name = upload_name(filename)
    return UploadedCheckpoint(f"{UPLOAD_PREFIX}{name}", name, shown, bytes(data), digest(data, algorithm="sha256", length=20))


def data_error_message(error: Exception) -> str:
    """The app's message when no dataset is usable: the loader's reason and fix, and how to restart
    the app with it (the ``--data`` flag of the CLIs is ``EXPLORER_DATA`` for the app)."""
    return (_one_line(str(error), 600) + " For this app: restart it with "
            "`EXPLORER_DATA=DIR streamlit run streamlit_app.py`.")


# ---------------------------------------------------------------- results

def preview_text(explorer, evaluation) -> str:
    """The label of a preview result: which images, which precision, that the full result follows."""
    n = len(explorer.engine.preview_index)
    how = "bf16, not re-checked" if explorer.engine.mixed else "fp32"
    return (f"Preview on {n:,} test images ({n // 10:,} per class, {how}): top-1 {100 * evaluation.top1:.2f}%. "
            f"The full result on all {len(explorer.engine.labels):,} follows.")


def config_json(config: ClusteringConfig) -> bytes:
    """The configuration as JSON, exactly what ``python -m explorer.prune --config FILE`` reads."""
    return (config.to_json() + "\n").encode()


def compressed_zip(result, source: str, dataset: dict | None = None) -> bytes:
    """A zip with the structurally compressed model of ``result`` as written by
    :func:`explorer.compress.save_compressed` (``<source>_clustered.pt`` + ``.json`` with the specs,
    the configuration, top-1 and dataset), the configuration JSON and a short README."""
    from ..compress import save_compressed

    name = f"{source}_clustered"
    extra = {"clustering": result.config.to_dict(), "source": source, "top1": result.evaluation.top1,
             "baseline_top1": result.comparison.baseline.top1,
             "params": result.compression.params, "macs": result.compression.macs}
    if dataset:
        extra["dataset"] = dataset
    with tempfile.TemporaryDirectory() as tmp:
        pt, js = save_compressed(result.compressed, tmp, name, extra=extra)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            z.write(pt, pt.name)
            z.write(js, js.name)
            z.writestr("clustering.json", config_json(result.config))
            z.writestr("README.txt",
                       f"Clustered ResNet20 from checkpoint {source!r} (top-1 {100 * result.evaluation.top1:.2f}%).\n"
                       f"Load:   from explorer.compress import load_compressed; "
                       f"model = load_compressed('{pt.name}')  # keep {js.name} beside it\n"
                       f"Inputs: float (N, 3, 32, 32) normalised like explorer.data.normalize; output (N, 10) logits.\n"
                       f"Redo:   python -m explorer.prune --config clustering.json --save DIR\n")
    return buf.getvalue()


# ---------------------------------------------------------------- training from the app

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_EPOCHS = 500


class LaunchError(RuntimeError):
    """Training could not be started: the message says why (disabled, already running, bad name)."""


def training_enabled(secrets: Mapping | None = None) -> bool:
    """Whether visitors may start training: ``EXPLORER_ALLOW_TRAINING=1`` (or true/yes/on), or
    ``allow_training = true`` in the ``[explorer]`` table of ``.streamlit/secrets.toml``. Off by
    default: a shared server should not let every visitor start a multi-hour job."""
    env = os.environ.get(ENV_ALLOW_TRAINING, "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    try:
        section = (secrets or {}).get("explorer", {}) or {}
        return bool(section.get("allow_training", False))
    except Exception:  # secrets objects raise various errors when no secrets file exists
        return False


def log_dir() -> Path:
    """Where the app writes trainer logs and its launch record: ``$EXPLORER_LOG_DIR`` or ``logs/``."""
    d = os.environ.get(ENV_LOG_DIR)
    return Path(d).expanduser() if d else REPO_ROOT / "logs"


@dataclass(frozen=True)
class LaunchRecord:
    """A run started from the app: process id, checkpoint name, log file, start time, command, and
    ``kind``: "train" (``python -m explorer.train``) or "finetune" (``python -m explorer.finetune``)."""

    pid: int
    name: str
    log: str
    started: float
    cmd: list
    kind: str = "train"

    @property
    def alive(self) -> bool:
        return ckpt.pid_alive(self.pid)

    @property
    def what(self) -> str:
        """"training" or "fine-tuning", for messages."""
        return "fine-tuning" if self.kind == "finetune" else "training"


def last_launch(logs: Path | None = None) -> LaunchRecord | None:
    """The most recent launch record, or None."""
    path = (logs or log_dir()) / "launch.json"
    try:
        d = json.loads(path.read_text())
        return LaunchRecord(int(d["pid"]), str(d["name"]), str(d["log"]), float(d["started"]), list(d["cmd"]),
                            str(d.get("kind", "train")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def live_status(ckpt_dir: Path, name: str) -> dict | None:
    """The status file of run ``name`` in ``ckpt_dir`` while its process is alive and running (also
    before its first epoch has written the metadata that lists it as a checkpoint), else None."""
    path = ckpt.paths(ckpt_dir, name)["status"]
    try:
        s = ckpt.read_json(path) if path.is_file() else None
    except ckpt.CheckpointError:
        return None
    return s if s and s.get("state") == "running" and ckpt.pid_alive(s.get("pid")) else None


def running_training(ckpt_dir: Path, logs: Path | None = None) -> str | None:
    """A description of a trainer or fine-tuning run that is running now (a live status file in
    ``ckpt_dir``, listed as a checkpoint or not yet, or the app's last launch still alive), or None."""
    for info in ckpt.list_checkpoints(ckpt_dir):
        if info.training:
            return f"{info.name} (pid {info.status.get('pid')})"
    for path in sorted(Path(ckpt_dir).glob("*.status.json")):
        name = path.name[: -len(".status.json")]
        s = live_status(Path(ckpt_dir), name)
        if s is not None:
            return f"{name} (pid {s.get('pid')})"
    rec = last_launch(logs)
    if rec is not None and rec.alive:
        return f"{rec.name} (pid {rec.pid}, started from the app)"
    return None


def _check_new_name(name: str, ckpt_dir: Path) -> None:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise LaunchError("name: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit")
    if ckpt.paths(ckpt_dir, name)["meta"].exists() or ckpt.paths(ckpt_dir, name)["weights"].exists():
        raise LaunchError(f"a checkpoint named {name!r} already exists in {ckpt_dir}; choose another name")


def _launch(kind: str, name: str, args: list[str], ckpt_dir: Path, logs: Path, before=None) -> LaunchRecord:
    """Start ``python -m explorer.<kind> ARGS`` detached (own session, stdin closed, stdout+stderr to
    ``<logs>/<kind>-<name>.log``) under the launch lock, unless a run is in progress (LaunchError).
    ``before(logs)`` runs under the lock just before the start (writes the run's inputs)."""
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / ".launch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        busy = running_training(ckpt_dir, logs)
        if busy:
            raise LaunchError(f"a training or fine-tuning run is already in progress: {busy}; one at a time")
        if before is not None:
            before(logs)
        log_path = logs / f"{kind}-{name}.log"
        cmd = [sys.executable, "-m", f"explorer.{kind}", *args]
        with open(log_path, "ab") as out:
            out.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} started from the app: {' '.join(cmd)}\n".encode())
            out.flush()
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True)
        rec = LaunchRecord(proc.pid, name, str(log_path), time.time(), cmd, kind)
        ckpt.save_json(rec.__dict__, logs / "launch.json")
        # Reap the child when it ends so it does not linger as a zombie of the server process.
        threading.Thread(target=proc.wait, name=f"reap-{kind}-{proc.pid}", daemon=True).start()
        return rec


def launch_training(name: str, epochs: int, seed: int, ckpt_dir: Path | None = None, logs: Path | None = None,
                    extra_args: tuple[str, ...] = ()) -> LaunchRecord:
    """Start ``python -m explorer.train --epochs E --seed S --name NAME --out DIR`` detached from the
    app (own session, stdin closed, stdout+stderr to ``<logs>/train-<name>.log``), so it survives
    the server and never blocks it. At most one run (training or fine-tuning) at a time (checked
    under a file lock against live status files and the previous launch). The dataset comes from
    the environment (``EXPLORER_DATA``), as for the app. Raises LaunchError with the reason."""
    ckpt_dir = Path(ckpt_dir or checkpoint_dir())
    logs = Path(logs or log_dir())
    _check_new_name(name, ckpt_dir)
    if not (isinstance(epochs, int) and 1 <= epochs <= MAX_EPOCHS):
        raise LaunchError(f"epochs must be in 1..{MAX_EPOCHS}")
    if not (isinstance(seed, int) and 0 <= seed < 2**31):
        raise LaunchError("seed must be in 0..2^31-1")
    return _launch("train", name, ["--epochs", str(epochs), "--seed", str(seed), "--name", name,
                                   "--out", str(ckpt_dir), "--quiet", *extra_args], ckpt_dir, logs)


# ---------------------------------------------------------------- fine-tuning from the app

FINETUNE_METHODS = {"plain": "cross-entropy on the training labels",
                    "distill": "plus knowledge distillation from the unclustered checkpoint (Hinton et al. 2015)"}


def finetune_problem(info: ckpt.CheckpointInfo | None, config: ClusteringConfig, model=None) -> str | None:
    """Why the checkpoint ``info`` (None: this session's upload) cannot be fine-tuned with
    ``config``, in one line with what to do, or None when it can. ``model``: its loaded ResNet20,
    for the distinct-filter limit (:mod:`explorer.limits`)."""
    from .. import limits
    from ..clustering import ClusteringError

    if info is None:
        return ("an uploaded checkpoint stays in this browser session's memory and a fine-tuning run is a separate "
                "process that reads the checkpoint directory; save the file there (or run python -m "
                "explorer.finetune --checkpoint FILE) to fine-tune it")
    if not info.complete:
        return (f"{info.name} is still {'in training' if info.training else 'incomplete'}; fine-tune it once its "
                f"training has finished")
    try:
        config.validate()
    except ClusteringError as e:
        return str(e)
    if not config.clustered:
        return ("nothing is clustered: set at least one layer's k below its filter count (or a residual stream's "
                "k below its width), then fine-tune")
    if config.granularity != "filter":
        return ("fine-tuning keeps whole-filter clusters tied; kernel granularity cannot be fine-tuned, choose "
                "granularity filter")
    if model is not None:
        found = limits.problems(model, config)
        if found:
            return "; ".join(found)
    return None


def default_finetune_name(base: str, ckpt_dir: Path) -> str:
    """``<base>_ft``, or ``<base>_ft2``, ``_ft3``... when taken (cut to fit the 64-character names)."""
    for i in range(1, 1000):
        name = f"{base[:58]}_ft{'' if i == 1 else i}"
        if not (ckpt.paths(ckpt_dir, name)["meta"].exists() or ckpt.paths(ckpt_dir, name)["weights"].exists()):
            return name
    return f"{base[:50]}_ft{int(time.time())}"


def launch_finetune(info: ckpt.CheckpointInfo | None, config: ClusteringConfig, name: str, epochs: int,
                    distill: float = 0.0, temperature: float = 4.0, lr: float = 0.02, model=None,
                    ckpt_dir: Path | None = None, logs: Path | None = None,
                    extra_args: tuple[str, ...] = ()) -> LaunchRecord:
    """Start ``python -m explorer.finetune --checkpoint <info.path> --config <logs>/finetune-<name>.config.json
    --epochs E --lr LR --distill A --temperature T --name NAME --out DIR`` detached, exactly like
    :func:`launch_training` (same lock, one run of either kind at a time, log
    ``<logs>/finetune-<name>.log``). The run writes ``<DIR>/<name>.pt`` + ``.json`` every epoch (the
    picker lists it, "fine-tuning", then with its accuracy) and at the end its compressed export
    ``<DIR>/compressed/<name>.pt`` + ``.json`` + ``.onnx``. ``distill`` 0 is plain fine-tuning.
    Raises LaunchError with the reason (:func:`finetune_problem`, a bad name or setting, a run in
    progress)."""
    ckpt_dir = Path(ckpt_dir or checkpoint_dir())
    logs = Path(logs or log_dir())
    problem = finetune_problem(info, config, model if model is not None else _model_of(info))
    if problem:
        raise LaunchError(f"cannot fine-tune: {problem}")
    _check_new_name(name, ckpt_dir)
    if not (isinstance(epochs, int) and 1 <= epochs <= MAX_EPOCHS):
        raise LaunchError(f"epochs must be in 1..{MAX_EPOCHS}")
    if not (0 <= distill <= 1 and temperature > 0 and 0 < lr <= 1):
        raise LaunchError("distillation weight must be in 0..1, temperature > 0, learning rate in (0, 1]")
    cfg_path = logs / f"finetune-{name}.config.json"
    args = ["--checkpoint", str(info.path), "--config", str(cfg_path), "--epochs", str(epochs), "--lr", repr(float(lr)),
            "--distill", repr(float(distill)), "--temperature", repr(float(temperature)), "--name", name,
            "--out", str(ckpt_dir), "--quiet", *extra_args]
    return _launch("finetune", name, args, ckpt_dir, logs, before=lambda _: ckpt.save_bytes(config_json(config), cfg_path))


def _model_of(info: ckpt.CheckpointInfo | None):
    try:
        return ckpt.load_model(info.path) if info is not None and info.path.is_file() else None
    except ckpt.CheckpointError:
        return None


def finetune_export(ckpt_dir: Path, name: str) -> list[Path]:
    """The compressed export a fine-tuning run wrote for checkpoint ``name``:
    ``<ckpt_dir>/compressed/<name>.pt``, ``.json``, ``.onnx`` (those that exist; [] for none)."""
    d = Path(ckpt_dir) / "compressed"
    return [p for p in (d / f"{name}{s}" for s in (".pt", ".json", ".onnx")) if p.is_file()]


def export_zip(paths: list[Path], name: str) -> bytes:
    """A zip of a compressed export's files (:func:`finetune_export`) and a README saying how to load them."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for p in paths:
            z.write(p, p.name)
        z.writestr("README.txt",
                   f"Compressed export of the fine-tuned checkpoint {name!r} (structurally smaller ResNet20).\n"
                   f"PyTorch: from explorer.compress import load_compressed; model = load_compressed('{name}.pt')"
                   f"  # keep {name}.json beside it\n"
                   f"ONNX:    onnxruntime.InferenceSession('{name}.onnx')\n"
                   f"Inputs: float (N, 3, 32, 32) normalised like explorer.data.normalize; output (N, 10) logits.\n")
    return buf.getvalue()


def tail(path: str | Path, lines: int = 8, max_bytes: int = 16_384) -> str:
    """The last ``lines`` lines of a text file (empty when unreadable)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])
