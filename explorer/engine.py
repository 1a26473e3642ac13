"""Fast exact re-evaluation of clustered nets on a fixed image set (the app's live path).

Two paths, both reusing what did not change:

- ``logits()``: pure fp32, equal to a plain eager fp32 evaluation up to float rounding.
- ``predictions()`` (what :meth:`FastEvaluator.evaluate` reports): a bf16 pass (CPU autocast,
  AVX-512 BF16) over all images, then an fp32 re-check of every image whose bf16 top-2 logit
  margin is below a bound tau, plus a fixed random audit sample. The audit measures the bf16 error
  |logit_bf16 - logit_fp32| on this very net; if its maximum exceeds tau / 4 the bound is doubled and
  the re-check repeated, so an image keeps its bf16 prediction only when its margin is at least
  four times the largest error observed. Predictions therefore equal fp32 ones except, at worst, on
  near-ties (tests check this on several random configurations).

Reuse:

- The net evaluated is the structurally compressed one (:mod:`explorer.compress`): only the k
  distinct filters of a clustered conv are computed, BatchNorm is folded into the convs, inputs are
  channels_last, and everything runs under ``torch.inference_mode``.
- The net is cut into 10 units (stem, then the 9 BasicBlocks) plus the head. Each unit gets a
  chained digest: sha1(previous digest + the unit's weights and shapes). The output of unit u for
  all images depends only on units 0..u, so it is cached under that digest (and precision); a slider
  change in a layer of unit c reuses the cached output of unit c-1 and recomputes only units c..9.
- Cache policy: one LRU shared by all sessions of a process, bounded in bytes
  (``EXPLORER_ACTIVATION_CACHE_MB``, default 1536 MB). For 10,000 images a unit output is 655 /
  328 / 164 MB in fp32 (stages 1 / 2 / 3) and half that in bf16; an output is cached only if it is
  at most a third of the budget, only units 0..8 are kept (unit 9 feeds just the classifier), and
  one evaluation keeps its deepest outputs first until the budget is used, so the transient
  allocation is bounded too.
- Optional preview: a fixed stratified subset (200 images per class), answered from the same
  caches; labelled a preview wherever shown and followed by the full result.
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
CACHED_UNITS = range(0, 9)


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


def _unit_shape(u: int, n: int) -> tuple[int, int, int, int]:
    if u <= 3:
        return (n, 16, 32, 32)
    if u <= 6:
        return (n, 32, 16, 16)
    return (n, 64, 8, 8)


class FastEvaluator:
    """Exact evaluation of compressed ResNet20s on one labelled image set, reusing unchanged
    upstream activations across calls and threads.

    images: uint8 (N, 3, 32, 32); labels: (N,) int64. ``cache_mb`` bounds the activation cache;
    ``mixed`` selects the bf16 + fp32 re-check path for :meth:`evaluate` (fp32 otherwise).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, cache_mb: int = DEFAULT_CACHE_MB,
                 batch_size: int = 1000, preview_per_class: int = 200, mixed: bool | None = None,
                 tau: float = 1.0, audit: int = 200):
        self.inputs = normalize(images).contiguous(memory_format=torch.channels_last)
        self.labels = labels
        self.batch_size = batch_size
        self.cache = ActivationCache(cache_mb * 2**20)
        self.preview_index = stratified_subset(labels, preview_per_class)
        self.mixed = _bf16_supported() if mixed is None else mixed
        self.tau = tau
        g = torch.Generator().manual_seed(1)
        self.audit_index = torch.randperm(len(labels), generator=g)[: min(audit, len(labels))]
        self._stats_lock = threading.Lock()
        self.stats = {"calls": 0, "units_computed": 0, "units_reused": 0, "rechecked": 0, "tau_doublings": 0,
                      "max_bf16_error": 0.0}

    def _count(self, **kw):
        with self._stats_lock:
            for k, v in kw.items():
                self.stats[k] = max(self.stats[k], v) if k == "max_bf16_error" else self.stats[k] + v

    def _forward(self, net: CompressedResNet20, preview: bool, bf16: bool) -> torch.Tensor:
        """Logits (N or P, 10) through the units, resuming from the deepest cached activation."""
        us = units(net)
        digests = unit_digests(net)
        tag = ("bf16:" if bf16 else "fp32:") + ("preview:" if preview else "")
        full_tag = "bf16:" if bf16 else "fp32:"
        start, cached = 0, None
        for u in reversed(CACHED_UNITS):
            cached = self.cache.get(tag + digests[u])
            if cached is None and preview:  # the full-set activation serves the preview too
                full = self.cache.get(full_tag + digests[u])
                cached = None if full is None else full.index_select(0, self.preview_index)
            if cached is not None:
                start = u + 1
                break
        if cached is not None:
            source = cached
        elif preview:
            source = self.inputs.index_select(0, self.preview_index).contiguous(memory_format=torch.channels_last)
        else:
            source = self.inputs
        n = len(source)
        dtype = torch.bfloat16 if bf16 else torch.float32
        # Keep the deepest outputs first (fewest bytes per unit of compute saved) until the budget is
        # used, so that the transient allocation never exceeds the cache bound either.
        keep, budget = {}, self.cache.max_bytes
        for u in sorted((u for u in range(start, len(us)) if u in CACHED_UNITS), reverse=True):
            shape = _unit_shape(u, n)
            size = int(np.prod(shape)) * (2 if bf16 else 4)
            if size <= min(budget, self.cache.max_bytes // 3):
                keep[u] = torch.empty(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
                budget -= size
        out = torch.empty(n, net.fc.out_features)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else _null()
        with ctx:
            for i in range(0, n, self.batch_size):
                x = source[i : i + self.batch_size]
                for u in range(start, len(us)):
                    x = _run_unit(u, us[u], x)
                    if u in keep:
                        keep[u][i : i + len(x)] = x
                out[i : i + len(x)] = net.fc(F.adaptive_avg_pool2d(x, 1).flatten(1)).float()
        for u, t in keep.items():
            self.cache.put(tag + digests[u], t)
        self._count(calls=1, units_computed=len(us) - start, units_reused=start)
        return out

    @torch.inference_mode()
    def logits(self, net: CompressedResNet20, preview: bool = False) -> torch.Tensor:
        """fp32 logits (N, 10) of ``net`` on the images (or (P, 10) on the preview subset)."""
        return self._forward(net.eval(), preview, bf16=False)

    @torch.inference_mode()
    def _fp32_rows(self, net: CompressedResNet20, rows: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(rows), self.batch_size):
            x = self.inputs.index_select(0, rows[i : i + self.batch_size]).contiguous(memory_format=torch.channels_last)
            out.append(net(x))
        return torch.cat(out) if out else torch.empty(0, net.fc.out_features)

    @torch.inference_mode()
    def predictions(self, net: CompressedResNet20, preview: bool = False) -> torch.Tensor:
        """Predicted classes (N,) equal to fp32 ones except possibly on near-ties (see module doc)."""
        net = net.eval()
        if not self.mixed:
            return self._forward(net, preview, bf16=False).argmax(1)
        logits = self._forward(net, preview, bf16=True)
        rows = self.preview_index if preview else torch.arange(len(self.labels))
        top2 = logits.topk(2, dim=1).values
        margin = top2[:, 0] - top2[:, 1]
        pred = logits.argmax(1)
        audit = torch.isin(rows, self.audit_index)
        tau = self.tau
        done = torch.zeros(len(rows), dtype=torch.bool)
        exact = torch.empty(len(rows), logits.shape[1])
        while True:
            need = ((margin < tau) | audit) & ~done
            idx = torch.nonzero(need).flatten()
            if len(idx):
                exact[idx] = self._fp32_rows(net, rows[idx])
                done[idx] = True
                self._count(rechecked=len(idx))
            checked = torch.nonzero(done).flatten()
            err = float((logits[checked] - exact[checked]).abs().max()) if len(checked) else 0.0
            self._count(max_bf16_error=err)
            if err <= tau / 4 or bool(done.all()):
                break
            tau *= 2
            self._count(tau_doublings=1)
        pred[done] = exact[done].argmax(1)
        return pred

    def evaluate(self, net: CompressedResNet20, preview: bool = False) -> Evaluation:
        """Top-1, per-class accuracy and confusion matrix of ``net`` (on the preview subset if asked)."""
        pred = self.predictions(net, preview)
        labels = self.labels.index_select(0, self.preview_index) if preview else self.labels
        return evaluation_from_predictions(pred.numpy(), labels.numpy())


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _bf16_supported() -> bool:
    """Whether to use the mixed path by default: only when asked (``EXPLORER_ENGINE_PRECISION=mixed``)
    and with native BF16 instructions (AVX-512 BF16 / AMX). Off by default: on the shipped checkpoint
    (trained with label smoothing, so top-2 margins are small) about a third of the images fell under
    the re-check bound, and re-checking them from the input cost more than the bf16 pass saved."""
    if os.environ.get("EXPLORER_ENGINE_PRECISION", "fp32") != "mixed":
        return False
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
