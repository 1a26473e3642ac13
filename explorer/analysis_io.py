"""Shared plumbing of the analysis CLIs (:mod:`explorer.sensitivity`, :mod:`explorer.search`,
:mod:`explorer.report`, :mod:`explorer.finetune`): building an :class:`~explorer.pipeline.Explorer`
from command-line flags, and resumable JSON result files.

A result file is one JSON object ``{"header": {...}, ...}`` rewritten atomically (temp file +
rename, :func:`explorer.checkpoints.save_json`) after every new result, so an interrupted run loses
at most the point it was computing. The header pins what the results were measured on: the
checkpoint's weights (sha1 of its state dict), the dataset identity and the number of test images.
Resuming against a different checkpoint (e.g. one the trainer has rewritten since) or another
dataset raises :class:`ResultsMismatch` instead of silently mixing numbers.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import torch

from . import checkpoints as ckpt
from .data import CLASSES, CIFAR10Tensors, DatasetIdentity, load_cifar10, synthetic_cifar10
from .engine import stratified_subset

RESULTS_VERSION = 1


class ResultsMismatch(RuntimeError):
    """A result file belongs to other weights, data or options: the message says which and how to
    start over."""


def weights_digest(model: torch.nn.Module) -> str:
    """sha1 (hex, 16 chars) over the model's state dict (names, shapes and float32 bytes)."""
    h = hashlib.sha1()
    for k, v in model.state_dict().items():
        h.update(f"{k}{tuple(v.shape)}".encode())
        h.update(v.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def default_checkpoint() -> str:
    return str(ckpt.DEFAULT_DIR / f"{ckpt.DEFAULT_NAME}.pt")


def beside(checkpoint: str | os.PathLike, suffix: str) -> Path:
    """``checkpoints/<name>.pt`` -> ``checkpoints/<name><suffix>`` (e.g. ``.sensitivity.json``)."""
    p = Path(checkpoint)
    return p.with_name(p.stem + suffix)


def add_common_args(p: argparse.ArgumentParser) -> None:
    """--checkpoint, --data, --test-per-class, --threads, --cache-mb and the hidden --synthetic."""
    p.add_argument("--checkpoint", default=default_checkpoint(),
                   help="ResNet20 state dict (.pt) to analyse (default: the shipped checkpoint)")
    p.add_argument("--data", default=None, help="local CIFAR-10 directory (default $EXPLORER_DATA, else download)")
    p.add_argument("--test-per-class", type=int, default=0, metavar="N",
                   help="evaluate on a fixed stratified subset of N test images per class instead of the full "
                        "test split (quick trial runs; the result file records the subset and refuses to mix)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--cache-mb", type=int, default=None,
                   help="activation cache of the evaluation engine in MB (default $EXPLORER_ACTIVATION_CACHE_MB "
                        "or 1408; 3072 also keeps more stage-1 outputs, which speeds up sweeps of stage-1 layers)")
    p.add_argument("--synthetic", type=int, default=0, help=argparse.SUPPRESS)


def load_data(data_root: str | None, test_per_class: int = 0, synthetic: int = 0) -> CIFAR10Tensors:
    """The dataset, optionally with the test split cut to a stratified subset of ``test_per_class``
    images per class (sorted indices, seed 0). ``synthetic`` > 0: random data of that many training
    images (tests only). Raises DataNotFoundError."""
    data = synthetic_cifar10(synthetic, max(20, synthetic // 2), seed=1234) if synthetic else load_cifar10(data_root)
    if test_per_class > 0:
        idx = stratified_subset(data.test_labels, test_per_class, seed=0)
        ident = DatasetIdentity(f"{data.identity.name}, test subset {test_per_class}/class", data.identity.fingerprint)
        data = CIFAR10Tensors(data.train_images, data.train_labels, data.test_images[idx], data.test_labels[idx], ident)
    return data


def make_explorer(model: torch.nn.Module, data: CIFAR10Tensors, name: str, cache_mb: int | None = None):
    """An :class:`~explorer.pipeline.Explorer` whose engine runs the exact fp32 path.

    The engine's mixed path (bf16 forward, near-ties re-checked in fp32) suits the app. Analysis
    sweeps visit many badly damaged nets, whose small logit margins send a large share of the test
    images through fp32 re-checks; the fp32 path reuses the cached upstream activations instead and
    is exact throughout."""
    from .pipeline import Explorer

    return Explorer(model, data, name, activation_cache_mb=cache_mb, mixed=False)


def explorer_from_args(args):
    """An fp32 :func:`make_explorer` for ``args.checkpoint`` on the data the flags select. Raises
    CheckpointError or DataNotFoundError."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model = ckpt.load_model(args.checkpoint)
    data = load_data(args.data, args.test_per_class, args.synthetic)
    return make_explorer(model, data, Path(args.checkpoint).stem, args.cache_mb)


def header(explorer, **extra) -> dict:
    """What a result file was measured on; ``extra`` (e.g. options) is stored alongside."""
    b = explorer.baseline
    return {
        "version": RESULTS_VERSION,
        "checkpoint": explorer.name,
        "weights_sha1": weights_digest(explorer.model),
        "dataset": explorer.data.identity.to_dict(),
        "test_images": int(len(explorer.data.test_labels)),
        "baseline_top1": b.top1,
        "baseline_per_class": {c: float(a) for c, a in zip(CLASSES, b.per_class)},
        **extra,
    }


_PINNED = ("version", "weights_sha1", "dataset", "test_images")


def open_results(path: str | os.PathLike, head: dict, restart: bool = False) -> dict:
    """The result file at ``path`` if it exists and matches ``head`` (weights, dataset, test set),
    else a new ``{"header": head}``. ``restart`` ignores an existing file (it is overwritten at the
    first save). Raises ResultsMismatch for a file measured on something else, CheckpointError for
    an unreadable one."""
    path = Path(path)
    if restart or not path.is_file():
        return {"header": head}
    doc = ckpt.read_json(path)
    old = doc.get("header", {})
    for key in _PINNED:
        if old.get(key) != head.get(key):
            raise ResultsMismatch(
                f"{path.name} was measured with {key} = {json.dumps(old.get(key))}, now {json.dumps(head.get(key))} "
                f"(the checkpoint or the data changed since). Pass --restart to discard it, or --out to write "
                f"elsewhere.")
    doc["header"] = {**old, **head}
    return doc


def save_results(doc: dict, path: str | os.PathLike) -> None:
    """Atomic rewrite of a result file. Raises CheckpointError on I/O errors."""
    ckpt.save_json(doc, path)
