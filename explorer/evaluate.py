"""Evaluation on the CIFAR-10 test split: top-1, per-class accuracy and confusion matrix
(``sklearn.metrics``), deltas against a baseline that read like "bird: 74.0% -> 71.0% (-3.0)",
and the one per-class table builder (:func:`per_class_table`) behind every per-class table of the
CLIs, the report, fine-tuning metadata and the app.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import confusion_matrix

from .data import CLASSES, normalize


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module,
    images: torch.Tensor,
    batch_size: int = 500,
    precision: str = "fp32",
    channels_last: bool = True,
) -> torch.Tensor:
    """Logits of ``model`` for uint8 images (N, 3, 32, 32) -> float32 (N, num_classes).

    The model is run in eval mode on CPU; ``precision`` is ``fp32`` (reported numbers) or ``bf16``
    (CPU autocast, for quick monitoring during training only). The model is not mutated except for
    being put in eval mode for the duration of the call.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    try:
        with ctx:
            for i in range(0, len(images), batch_size):
                x = normalize(images[i : i + batch_size]).to(device)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                out.append(model(x).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 10)


@dataclass(frozen=True)
class Evaluation:
    """Results on one labelled split.

    top1: fraction in [0, 1]; per_class: (C,) fractions; confusion: (C, C) counts with rows = true
    class, columns = predicted class; predictions: (N,) int64.
    """

    top1: float
    per_class: np.ndarray
    confusion: np.ndarray
    predictions: np.ndarray
    classes: tuple[str, ...] = CLASSES

    def per_class_dict(self) -> dict[str, float]:
        """{class name: accuracy fraction}, in class order (the JSON form of the result files)."""
        return {c: float(a) for c, a in zip(self.classes, self.per_class)}

    def to_dict(self) -> dict:
        return {"top1": self.top1, "per_class": self.per_class_dict(), "confusion": self.confusion.tolist()}


def per_class_table(columns: Mapping[str, "Evaluation | Mapping[str, float] | Sequence[float]"],
                    baseline: str | None = None, classes: Sequence[str] = CLASSES) -> pd.DataFrame:
    """One row per class: a ``class`` column, then one column per entry of ``columns`` (accuracy
    fractions from an :class:`Evaluation`, a ``{class: fraction}`` mapping or a sequence in class
    order; ``None`` entries are left out). With ``baseline`` (a key of ``columns``), each other
    column also gets its change against it (fractions): ``delta`` when there is one other column,
    else ``delta <name>``.

    Raises KeyError when a mapping lacks a class or ``baseline`` is not a column.
    """
    table = pd.DataFrame({"class": list(classes)})
    for name, values in columns.items():
        if values is None:
            continue
        if isinstance(values, Evaluation):
            values = values.per_class
        elif isinstance(values, Mapping):
            values = [values[c] for c in classes]
        table[name] = np.asarray(values, dtype=np.float64)
    if baseline is not None:
        others = [n for n in table.columns[1:] if n != baseline]
        for name in others:
            table["delta" if len(others) == 1 else f"delta {name}"] = table[name] - table[baseline]
    return table


def evaluation_from_predictions(predictions, labels, classes: tuple[str, ...] = CLASSES) -> Evaluation:
    """Top-1, per-class accuracy and confusion matrix (``sklearn.metrics.confusion_matrix``) from
    predicted and true labels, both (N,) ints in [0, C)."""
    predictions = np.asarray(predictions, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels):
        cm = confusion_matrix(labels, predictions, labels=list(range(len(classes))))
    else:  # sklearn refuses empty inputs
        cm = np.zeros((len(classes), len(classes)), dtype=np.int64)
    support = cm.sum(axis=1)
    per_class = np.divide(np.diag(cm), support, out=np.zeros(len(classes)), where=support > 0)
    top1 = float((predictions == labels).mean()) if len(labels) else 0.0
    return Evaluation(top1, per_class, cm, predictions, classes)


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, precision: str = "fp32",
             batch_size: int = 500) -> Evaluation:
    """Evaluate ``model`` on uint8 images (N, 3, 32, 32) with labels (N,). fp32 by default."""
    logits = predict_logits(model, images, batch_size=batch_size, precision=precision)
    return evaluation_from_predictions(logits.argmax(1).numpy(), labels.numpy())


@dataclass(frozen=True)
class Comparison:
    """A pruned evaluation against its baseline; deltas are pruned - baseline, in fractions."""

    baseline: Evaluation
    pruned: Evaluation

    @property
    def top1_delta(self) -> float:
        return self.pruned.top1 - self.baseline.top1

    @property
    def per_class_delta(self) -> np.ndarray:
        return self.pruned.per_class - self.baseline.per_class

    @property
    def confusion_delta(self) -> np.ndarray:
        return self.pruned.confusion.astype(np.int64) - self.baseline.confusion.astype(np.int64)

    def table(self) -> pd.DataFrame:
        """:func:`per_class_table` of baseline and pruned: columns class, baseline, pruned, delta."""
        return per_class_table({"baseline": self.baseline, "pruned": self.pruned}, "baseline", self.baseline.classes)

    def rows(self) -> list[dict]:
        """One dict per class: class, baseline, pruned, delta (fractions), as :meth:`table`."""
        return self.table().to_dict("records")

    def lines(self) -> list[str]:
        """Human-readable lines, e.g. ``bird: 74.0% -> 71.0% (-3.0)``, then the overall top-1."""
        out = [f"{r['class']:>10}: {100 * r['baseline']:.1f}% -> {100 * r['pruned']:.1f}% ({100 * r['delta']:+.1f})"
               for r in self.rows()]
        out.append(f"{'top-1':>10}: {100 * self.baseline.top1:.2f}% -> {100 * self.pruned.top1:.2f}% "
                   f"({100 * self.top1_delta:+.2f})")
        return out
