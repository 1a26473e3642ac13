"""Resumable JSON result files of the analyses (:mod:`.sensitivity`, :mod:`.search`, :mod:`.report`),
the one cached evaluator they share (:class:`Evaluations`), and the exact fp32
:class:`~explorer.pipeline.Explorer` they measure with (:func:`make_explorer`).

A result file is one JSON object ``{"header": {...}, ...}`` rewritten atomically (temp file +
rename, :func:`explorer.checkpoints.save_json`) after every new result, so an interrupted run loses
at most the point it was computing. The header pins what the results were measured on: the
checkpoint's weights (sha1 of its state dict), the dataset identity and the number of test images.
Resuming against a different checkpoint (e.g. one the trainer has rewritten since) or another
dataset raises :class:`ResultsMismatch` instead of silently mixing numbers.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from .. import checkpoints as ckpt
from ..data import CIFAR10Tensors, DatasetIdentity, load_cifar10, synthetic_cifar10
from ..digest import state_digest
from ..engine import stratified_subset

RESULTS_VERSION = 1


class ResultsMismatch(RuntimeError):
    """A result file belongs to other weights, data or options: the message says which and how to
    start over."""


def default_checkpoint() -> str:
    """``checkpoints/resnet20_cifar10.pt``, the shipped checkpoint every command defaults to."""
    return str(ckpt.DEFAULT_DIR / f"{ckpt.DEFAULT_NAME}.pt")


def beside(checkpoint: str | os.PathLike, suffix: str) -> Path:
    """``checkpoints/<name>.pt`` -> ``checkpoints/<name><suffix>`` (e.g. ``.sensitivity.json``)."""
    p = Path(checkpoint)
    return p.with_name(p.stem + suffix)


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
    from ..pipeline import Explorer

    return Explorer(model, data, name, activation_cache_mb=cache_mb, mixed=False)


def header(explorer, **extra) -> dict:
    """What a result file was measured on; ``extra`` (e.g. options) is stored alongside."""
    b = explorer.baseline
    return {
        "version": RESULTS_VERSION,
        "checkpoint": explorer.name,
        "weights_sha1": state_digest(explorer.model),
        "dataset": explorer.data.identity.to_dict(),
        "test_images": int(len(explorer.data.test_labels)),
        "baseline_top1": b.top1,
        "baseline_per_class": b.per_class_dict(),
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


class Evaluations:
    """``explorer.run`` with every result kept in ``doc[store]`` (keyed by the configuration and the
    latency batches) and ``save()`` called after each new one, so an interrupted analysis loses at
    most the evaluation it was computing and a rerun replays the rest for free. ``record`` turns a
    :class:`~explorer.pipeline.PruneResult` into the stored JSON (``PruneResult.summary`` by
    default); ``new`` counts the evaluations made by this object. Used by the search (records of
    :func:`explorer.analysis.search.evaluation_record`) and the report (summaries)."""

    def __init__(self, explorer, doc: dict, save: Callable[[], None], store: str = "runs",
                 record: Callable | None = None, progress: bool = False, required: str | None = None):
        self.explorer, self.save, self.progress = explorer, save, progress
        self.required = required  # a stored record without this field is measured again
        self.store = doc.setdefault(store, {})
        self.record = record or (lambda result, source: result.summary())
        self.new = 0

    def __call__(self, config, source: str = "", latency: tuple[int, ...] = ()) -> dict:
        key = config.key() + (f"|latency={list(latency)}" if latency else "")
        hit = self.store.get(key)
        if hit is None or (self.required is not None and self.required not in hit):
            t = time.perf_counter()
            hit = self.record(self.explorer.run(config, latency_batches=latency), source)
            hit["seconds"] = round(time.perf_counter() - t, 3)
            self.store[key] = hit
            self.new += 1
            self.save()
            if self.progress:
                print(f"  evaluated {len(config.active)} layers ({config.metric}, {config.granularity}, "
                      f"recalibrate_bn={config.recalibrate_bn}): top-1 {100 * hit['top1']:.2f}% "
                      f"in {hit['seconds']:.0f} s", file=sys.stderr)
        return hit
