"""Fast exact re-evaluation of clustered nets on a fixed image set (the app's live path).

Exact: everything runs in fp32, so logits equal a plain eager fp32 evaluation up to float
rounding. Fast, because it never recomputes what did not change:

- The net evaluated is the structurally compressed one (:mod:`explorer.compress`): only the k
  distinct filters of a clustered conv are computed, BatchNorm is folded into the convs, inputs are
  channels_last, and everything runs under ``torch.inference_mode``.
- The net is cut into 10 units (stem, then the 9 BasicBlocks) plus the head. Each unit gets a
  chained digest: sha1(previous digest + the unit's weights and shapes). The output of unit u for
  all images depends only on units 0..u, so it is cached under that digest; a slider change in a
  layer of unit c reuses the cached output of unit c-1 and recomputes only units c..9.
- Cache policy: one LRU shared by all sessions of a process, bounded in bytes
  (``EXPLORER_ACTIVATION_CACHE_MB``, default 1536 MB). Unit outputs are 655 MB (stage 1), 328 MB
  (stage 2) and 164 MB (stage 3) for 10,000 images; an output is cached only if it is at most a
  third of the budget, so with the default only stage-2 and stage-3 outputs are kept and changes
  in stage 1 recompute from the images.
- Optional preview: a fixed stratified subset (200 images per class) answered first, from the same
  cache; it is labelled a preview wherever shown and followed by the full result.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F

from .compress import CompressedResNet20
from .data import normalize
from .evaluate import Evaluation, evaluation_from_predictions

DEFAULT_CACHE_MB = int(os.environ.get("EXPLORER_ACTIVATION_CACHE_MB", "1536"))


def units(net: CompressedResNet20) -> list[torch.nn.Module]:
    """The 10 sequential units of a compressed ResNet20: stem conv (+ReLU), then 9 blocks."""
    return [net.conv1, *net.layer1, *net.layer2, *net.layer3]


def _run_unit(i: int, unit: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.relu(unit(x)) if i == 0 else unit(x)


def unit_digests(net: CompressedResNet20) -> list[str]:
    """Chained sha1 digests of the 10 units: digest u identifies the function images -> unit u output."""
    out, prev = [], b""
    for u in units(net):
        h = hashlib.sha1(prev)
        for k, v in u.state_dict().items():
            h.update(f"{k}{tuple(v.shape)}{v.dtype}".encode())
            h.update(v.detach().contiguous().cpu().numpy().tobytes())
        prev = h.digest()
        out.append(h.hexdigest())
    return out


class ActivationCache:
    """Thread-safe LRU of activation tensors bounded by total bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._data: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            t = self._data.get(key)
            if t is not None:
                self._data.move_to_end(key)
            return t

    def put(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._data:
                return
            self._data[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._data.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.bytes = 0


def stratified_subset(labels: torch.Tensor, per_class: int = 200, seed: int = 0) -> torch.Tensor:
    """Sorted indices (<= per_class * C,) drawn per class with a fixed seed: the preview subset."""
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c in torch.unique(labels):
        members = torch.nonzero(labels == c).flatten()
        idx.append(members[torch.randperm(len(members), generator=g)[:per_class]])
    return torch.sort(torch.cat(idx)).values


class FastEvaluator:
    """Exact fp32 evaluation of compressed ResNet20s on one labelled image set, with reuse of
    unchanged upstream activations across calls (and across threads).

    images: uint8 (N, 3, 32, 32); labels: (N,) int64. ``cache_mb`` bounds the activation cache.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, cache_mb: int = DEFAULT_CACHE_MB,
                 batch_size: int = 1000, preview_per_class: int = 200):
        self.inputs = normalize(images).contiguous(memory_format=torch.channels_last)
        self.labels = labels
        self.batch_size = batch_size
        self.cache = ActivationCache(cache_mb * 2**20)
        self.preview_index = stratified_subset(labels, preview_per_class)
        self.stats = {"calls": 0, "units_computed": 0, "units_reused": 0}

    @torch.inference_mode()
    def logits(self, net: CompressedResNet20, preview: bool = False) -> torch.Tensor:
        """fp32 logits (N, 10) of ``net`` on the images (or (P, 10) on the preview subset)."""
        net = net.eval()
        us = units(net)
        digests = unit_digests(net)
        tag = "preview:" if preview else ""
        start, cached = 0, None
        for u in range(len(us) - 1, -1, -1):
            cached = self.cache.get(tag + digests[u])
            if cached is None and preview:  # the full-set activation serves the preview too
                full = self.cache.get(digests[u])
                cached = None if full is None else full.index_select(0, self.preview_index)
            if cached is not None:
                start = u + 1
                break
        source = cached if cached is not None else (
            self.inputs.index_select(0, self.preview_index).contiguous(memory_format=torch.channels_last)
            if preview else self.inputs)
        n = len(source)
        keep = {}
        for u in range(start, len(us)):
            shape = _unit_shape(u, n)
            size = int(np.prod(shape)) * 4
            if size <= self.cache.max_bytes // 3:
                keep[u] = torch.empty(shape).contiguous(memory_format=torch.channels_last)
        out = torch.empty(n, net.fc.out_features)
        for i in range(0, n, self.batch_size):
            x = source[i : i + self.batch_size]
            for u in range(start, len(us)):
                x = _run_unit(u, us[u], x)
                if u in keep:
                    keep[u][i : i + len(x)] = x
            out[i : i + len(x)] = net.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
        for u, t in keep.items():
            self.cache.put(tag + digests[u], t)
        self.stats["calls"] += 1
        self.stats["units_computed"] += len(us) - start
        self.stats["units_reused"] += start
        return out

    def evaluate(self, net: CompressedResNet20, preview: bool = False) -> Evaluation:
        """Top-1, per-class accuracy and confusion matrix of ``net`` (on the preview subset if asked)."""
        logits = self.logits(net, preview)
        labels = self.labels.index_select(0, self.preview_index) if preview else self.labels
        return evaluation_from_predictions(logits.argmax(1).numpy(), labels.numpy())


def _unit_shape(u: int, n: int) -> tuple[int, int, int, int]:
    if u <= 3:
        return (n, 16, 32, 32)
    if u <= 6:
        return (n, 32, 16, 16)
    return (n, 64, 8, 8)
