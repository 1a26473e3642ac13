"""Fast exact re-evaluation of clustered nets on a fixed image set (the app's live path).

Two paths, both reusing what did not change:

- ``logits()``: pure fp32, equal to a plain eager fp32 evaluation up to float rounding.
- ``predictions()`` (what :meth:`FastEvaluator.evaluate` reports; the mixed path where the CPU has
  native BF16): a pass of a bf16 copy of the net over all images, with ReLU and residual add fused
  into the convs; the bf16 error of this very net is measured on a fixed random audit sample of 200
  images (fp32 and bf16, both cached like any activation) as its :func:`flip_error` (the error that
  can flip a prediction); the re-check bound is tau = 2 x that error (at least 0.05), and every
  image whose bf16 top-2 logit margin is below tau is re-computed in fp32 (from the deepest cached
  fp32 activation, else from the fp32 activations cached for the rows re-checked under the same
  upstream units, else from the input). If a re-checked image shows a larger error than the
  audit, the bound is widened to 2 x that error and the re-check repeated. An image keeps its bf16
  prediction only when its margin is at least twice the largest flip error observed, so
  predictions equal fp32 ones except, at worst, on near-ties. The bound is statistical: the audit
  is a sample of the images. ``EXPLORER_ENGINE_PRECISION=fp32`` forces the fp32 path.

Reuse:

- The net evaluated is the structurally compressed one (:mod:`explorer.compress`) in its fastest
  exact form (:func:`inference_form`), BatchNorm folded into the convs, inputs channels_last, ReLU
  and residual adds in place, under ``torch.inference_mode``, batch 250.
- The net is cut into 10 units (stem, then the 9 BasicBlocks) plus the head. Each unit gets a
  chained digest (:func:`unit_digests`): the output of unit u for all images depends only on units
  0..u, so it is cached under that digest (and precision); a slider change in a layer of unit c
  reuses the cached output of unit c-1 and recomputes only units c..9.
- Cache policy: one LRU shared by all sessions of a process, bounded in bytes
  (``EXPLORER_ACTIVATION_CACHE_MB``, default 1408 MB, where the bf16 outputs of units 2-8 fit).
  For 10,000 images a unit output is 655 / 328 / 164 MB in fp32 (stages 1 / 2 / 3) and half that
  in bf16; an output is cached only if it is at most a third of the budget, only units 0..8 are
  kept (unit 9 feeds just the classifier), and one evaluation keeps its deepest outputs first until
  the budget is used, so the transient allocation is bounded too. Outputs are kept as the
  per-batch tensors the units produced (no copy).
- Optional preview: a fixed stratified subset (200 images per class), answered from the same
  caches by the bf16 pass alone (no re-check: it may differ from fp32 on near-ties); labelled a
  preview wherever shown and followed by the full, re-checked result.
- In pure fp32 (no native BF16, or ``EXPLORER_ENGINE_PRECISION=fp32``) the full set is evaluated
  as two parts, the preview rows and the rest, each with its own cached activations and logits
  (a share of the cache bound in proportion to its rows), so a full run after its preview
  computes only the other 8,000 images: the preview is exact there and costs the full run nothing.

Measurements behind these choices (speed-ups, exactness over 45 real configurations, memory):
docs/engine.md.
"""
from __future__ import annotations

import copy
import functools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from .compress import CompressedConv, CompressedResNet20
from .data import normalize
from .digest import digest
from .evaluate import Evaluation, evaluation_from_predictions
from .lru import ActivationCache

DEFAULT_CACHE_MB = int(os.environ.get("EXPLORER_ACTIVATION_CACHE_MB", "1408"))
CACHED_UNITS = range(0, 9)


def units(net: CompressedResNet20) -> list[torch.nn.Module]:
    """The 10 sequential units of a compressed ResNet20: stem conv (+ReLU), then 9 blocks."""
    return [net.conv1, *net.layer1, *net.layer2, *net.layer3]


def _run_unit(i: int, unit: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.relu(unit(x), inplace=True) if i == 0 else unit(x)


# oneDNN convolution with fused post-ops (the op TorchInductor's CPU backend emits for conv + ReLU
# and conv + add + ReLU); absent from builds without oneDNN.
_CONV_POINTWISE = getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise", None)


@functools.cache
def _fused_available() -> bool:
    """Whether the fused bf16 conv runs here (probed once on a tiny input; else the eager units)."""
    try:
        x = torch.zeros(1, 8, 4, 4, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        w = torch.zeros(8, 8, 3, 3, dtype=torch.bfloat16)
        _CONV_POINTWISE(x, w, None, [1, 1], [1, 1], [1, 1], 1, "relu", [], "")
        _CONV_POINTWISE.binary(x, x, w, None, [1, 1], [1, 1], [1, 1], 1, "add", 1.0, "relu", [], "")
        return True
    except (AttributeError, RuntimeError, TypeError):
        return False


def _conv_relu(m: CompressedConv, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """ReLU(m(x) [+ residual]) with the ReLU (and the add) fused into the last conv as oneDNN post-ops.

    The separate ReLU and add are full passes over memory-bound activations (docs/engine.md). The
    add is done before the output is rounded, so in bf16 the result differs from the unfused one by
    rounding only (the engine's audit measures the error of exactly this computation); in fp32 it
    is identical."""
    if m.gathered:
        x = F.conv2d(x, m.conv.weight, None, m.conv.stride, 1)
        w, b, stride, pad = m.gather_weight(x.shape[1]), m.shift, [1, 1], [0, 0]
    else:
        w, b, stride, pad = m.conv.weight, m.conv.bias, list(m.conv.stride), [1, 1]
    if residual is None:
        return _CONV_POINTWISE(x, w, b, pad, stride, [1, 1], 1, "relu", [], "")
    return _CONV_POINTWISE.binary(x, residual, w, b, pad, stride, [1, 1], 1, "add", 1.0, "relu", [], "")


def _run_unit_fused(i: int, unit: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """:func:`_run_unit` on an :func:`inference_form` net with fused post-ops (see :func:`_conv_relu`)."""
    if i == 0:
        return _conv_relu(unit, x)
    sc = unit.shortcut(x).contiguous(memory_format=torch.channels_last)
    return _conv_relu(unit.conv2, _conv_relu(unit.conv1, x), sc)


def _head(net: CompressedResNet20, x: torch.Tensor) -> torch.Tensor:
    return net.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _gather_pays(filters: int, out_channels: int) -> bool:
    """Whether k distinct filters + the 1x1 gather beat one dense conv of all Cout filters.

    Measured (batch 250, channels_last, 2 cores, bf16 and fp32): a 3x3 conv on this net's small
    maps costs about as much for 1 filter as for 16 (reading the input dominates) and the gather
    adds a pass over the output, so with 16 channels the dense conv always wins; with 32 or 64
    the k-filter form wins while k is at most half of Cout."""
    return out_channels >= 32 and filters <= out_channels // 2


@torch.no_grad()
def inference_form(net: CompressedResNet20) -> CompressedResNet20:
    """A copy of ``net`` computing the same function (up to float rounding) in the form that runs
    fastest here: a gathered conv (k distinct filters, then a 1x1 gather + affine to Cout
    channels) stays so only where that is faster (:func:`_gather_pays`), else becomes one dense
    conv with the affine folded in (weight[c] = scale[c] * D[index[c]], bias = shift); the
    speed-up is in docs/engine.md.

    ``net`` is not mutated; shapes: as :class:`~explorer.compress.CompressedResNet20`. For the
    engine only: the copy keeps ``net.specs`` (the compressed structure), so MACs, parameters and
    exports are taken from ``net`` itself."""
    net = copy.deepcopy(net)
    for m in list(net.modules()):
        if isinstance(m, CompressedConv) and m.gathered:
            k, cout = m.conv.out_channels, len(m.index)
            if _gather_pays(k, cout):
                continue
            dense = torch.nn.Conv2d(m.conv.in_channels, cout, 3, m.conv.stride, 1, bias=True)
            dense.weight.copy_(m.conv.weight[m.index] * m.scale.view(-1, 1, 1, 1))
            dense.bias.copy_(m.shift)
            m.conv, m.gathered = dense, False
            del m.index, m.scale, m.shift
    return net.eval()


def unit_digests(net: CompressedResNet20) -> list[str]:
    """Chained sha1 digests of the 10 units: digest u identifies the function images -> unit u output."""
    out, prev = [], ""
    for u in units(net):
        parts = [prev]
        for k, v in u.state_dict().items():
            parts += [f"{k}{tuple(v.shape)}{v.dtype}", v]
        prev = digest(*parts)
        out.append(prev)
    return out


def flip_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """The largest error, over images, that can flip a prediction: for logits (N, C) of an
    approximate pass and the exact ones, max over i, j of |e[i, j] - e[i, c_i]| with e = approx -
    exact and c_i the approximate top-1 class. Exact class j outranks c_i only if the approximate
    margin l[c_i] - l[j] is below e[i, c_i] - e[i, j], so an image whose approximate top-2 margin
    is above this error (for it) keeps its prediction. 0.0 for N = 0; inf where any logit is not
    finite (NaN weights, overflow), so that every image is re-checked."""
    if len(approx) == 0:
        return 0.0
    e = (approx - exact).float()
    if not bool(torch.isfinite(e).all()):
        return math.inf
    top = e.gather(1, approx.argmax(1, keepdim=True))
    return float((e - top).abs().max())


def stratified_subset(labels: torch.Tensor, per_class: int = 200, seed: int = 0) -> torch.Tensor:
    """Sorted indices (<= per_class * C,) drawn per class with a fixed seed: the preview subset."""
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c in torch.unique(labels):
        members = torch.nonzero(labels == c).flatten()
        idx.append(members[torch.randperm(len(members), generator=g)[:per_class]])
    return torch.sort(torch.cat(idx)).values


def unit_widths(net: CompressedResNet20) -> tuple[int, ...]:
    """Output channels of the 10 units: the residual stream's width after the stem and each block
    (16 / 32 / 64, or k_s where the stage's stream is clustered)."""
    return (net.specs[0].out_channels, *(s.out_channels for s in net.specs[2::2]))


def _unit_shape(u: int, n: int, widths: tuple[int, ...] | None = None) -> tuple[int, int, int, int]:
    """(n, C, H, W) of unit u's output; C from ``widths`` (:func:`unit_widths`), else the original's."""
    size = 32 if u <= 3 else 16 if u <= 6 else 8
    c = widths[u] if widths is not None else (16 if u <= 3 else 32 if u <= 6 else 64)
    return (n, c, size, size)


class _Prepared:
    """One net as the engine runs it, made once per evaluation: the chained unit digests (cache keys,
    from the compressed net), its :func:`inference_form` and, for the mixed path, a bf16 copy of it."""

    def __init__(self, net: CompressedResNet20, bf16: bool):
        self.digests = unit_digests(net)
        # identifies the function images -> logits (the classifier after the last unit)
        self.head = digest(self.digests[-1], *(x for k, v in net.fc.state_dict().items() for x in (k, v)))
        self.widths = unit_widths(net)
        self.fp32 = inference_form(net)
        self.bf16 = copy.deepcopy(self.fp32).to(torch.bfloat16) if bf16 else None


class FastEvaluator:
    """Exact evaluation of compressed ResNet20s on one labelled image set, reusing unchanged
    upstream activations across calls and threads.

    images: uint8 (N, 3, 32, 32); labels: (N,) int64. ``cache_mb`` bounds the activation cache;
    ``mixed`` selects the bf16 + fp32 re-check path for :meth:`evaluate` (default: on where the CPU
    has native BF16 and ``EXPLORER_ENGINE_PRECISION`` is not ``fp32``); ``split``: in pure fp32,
    evaluate the full set as the preview rows plus the rest (:meth:`_fp32_full`; for callers that
    ask for a preview first, like the app; off with ``cache_mb=0``); ``tau`` is the smallest
    re-check bound (logit units), ``safety`` the factor between the largest bf16 flip error
    observed (:func:`flip_error`) and the bound.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, cache_mb: int = DEFAULT_CACHE_MB,
                 batch_size: int = 250, preview_per_class: int = 200, mixed: bool | None = None,
                 tau: float = 0.05, audit: int = 200, safety: float = 2.0, split: bool = True):
        bound_native_memory()
        self.inputs = normalize(images).contiguous(memory_format=torch.channels_last)
        self.labels = labels
        self.batch_size = batch_size
        self.cache = ActivationCache(cache_mb * 2**20)
        self.preview_index = stratified_subset(labels, preview_per_class)
        rest = torch.ones(len(labels), dtype=torch.bool)
        rest[self.preview_index] = False
        self.rest_index = torch.nonzero(rest).flatten()  # sorted: the full set less the preview rows
        self.mixed = _bf16_supported() if mixed is None else mixed
        # Parts only in pure fp32 (the mixed path's re-checks gather rows from full-set activations)
        # and only where previews come first and something is cached (else: two batch shapes more,
        # and the rest's input gathered, for nothing).
        self.split = split and not self.mixed and cache_mb > 0 and 0 < len(self.rest_index) < len(labels)
        self.tau = tau
        self.safety = safety
        g = torch.Generator().manual_seed(1)
        self.audit_index = torch.sort(torch.randperm(len(labels), generator=g)[: min(audit, len(labels))]).values
        self._stats_lock = threading.Lock()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="explorer-engine")  # thread starts on first use
        self.stats = {"calls": 0, "units_computed": 0, "units_reused": 0, "rechecked": 0, "tau_widenings": 0, "rows_resumed": 0,
                      "max_flip_error": 0.0, "last_tau": 0.0, "last_rechecked": 0}

    def _count(self, **kw):
        with self._stats_lock:
            for k, v in kw.items():
                if k == "max_flip_error":
                    self.stats[k] = max(self.stats[k], v)
                elif k.startswith("last_"):
                    self.stats[k] = v
                else:
                    self.stats[k] += v

    def _rows(self, subset: str) -> torch.Tensor | None:
        return {"full": None, "preview": self.preview_index, "audit": self.audit_index, "rest": self.rest_index}[subset]

    def _plan(self, first: int, n: int, itemsize: int, cap: int, budget: int, widths=None) -> list[int]:
        """Cacheable units from ``first`` on whose outputs for n images (each at most ``cap`` bytes,
        together at most ``budget``) are to be kept, deepest first (fewest bytes per unit of compute
        saved); makes room for them in the cache."""
        chosen, total = [], 0
        for u in sorted((u for u in CACHED_UNITS if u >= first), reverse=True):
            size = int(np.prod(_unit_shape(u, n, widths))) * itemsize
            if size <= cap and total + size <= budget:
                chosen.append(u)
                total += size
        self.cache.reserve(total)
        return chosen

    def _split(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x[i : i + self.batch_size] for i in range(0, len(x), self.batch_size)]

    def _gather(self, chunks, rows: torch.Tensor) -> torch.Tensor:
        """Rows (sorted) of a full-set activation stored as per-batch chunks."""
        bs, parts = self.batch_size, []
        owner = rows // bs
        for c in torch.unique_consecutive(owner).tolist():
            sel = rows[owner == c] - c * bs
            parts.append(chunks[c].index_select(0, sel))
        x = torch.cat(parts) if parts else self.inputs[:0]
        return x.contiguous(memory_format=torch.channels_last)

    def _forward(self, prep: _Prepared, subset: str, bf16: bool, share: float = 1.0) -> torch.Tensor:
        """Logits (rows of ``subset``, 10) through the units, resuming from the deepest cached
        activation (a full-set activation, where there is one, serves the subsets too); the logits
        themselves are cached too (tiny; callers must not write into them), so asking again for a
        net's subset costs nothing. ``share``: the part of the cache bound this subset's outputs may
        use (and of the per-output cap).

        Activations are cached as the per-batch output tensors themselves (no copy into one big
        tensor); the bf16 path runs a bf16 copy of the net (no autocast dtype round trips)."""
        digests, net = prep.digests, prep.bf16 if bf16 else prep.fp32
        us = units(net)
        prec = "bf16:" if bf16 else "fp32:"
        tag, full_tag = f"{prec}{subset}:", f"{prec}full:"
        known = self.cache.get(tag + "logits:" + prep.head)
        if known is not None:
            self._count(calls=1, units_reused=len(us))
            return known
        rows = self._rows(subset)
        start, batches = 0, None
        for u in reversed(CACHED_UNITS):
            hit = self.cache.get(tag + digests[u])
            if hit is not None:
                batches = list(hit)
            elif rows is not None:
                full = self.cache.get(full_tag + digests[u])
                if full is not None:
                    batches = self._split(self._gather(full, rows))
            if batches is not None:
                start = u + 1
                break
        if batches is None:
            src = self.inputs if rows is None else self.inputs.index_select(0, rows).contiguous(
                memory_format=torch.channels_last)
            batches = self._split(src.to(torch.bfloat16) if bf16 else src)
        n = sum(len(b) for b in batches)
        # Each output at most a third of the bound; room is made before computing, so the cache
        # plus the outputs being computed stay within the bound (evaluations run one at a time).
        bound = int(self.cache.max_bytes * share)
        keep = {u: [] for u in self._plan(start, n, 2 if bf16 else 4, bound // 3, bound, prep.widths)}
        out = []
        run = _run_unit_fused if bf16 and _fused_available() else _run_unit
        for x in batches:
            for u in range(start, len(us)):
                x = run(u, us[u], x)
                if u in keep:
                    keep[u].append(x)
            out.append(_head(net, x).float())
        for u, chunks in keep.items():
            self.cache.put(tag + digests[u], tuple(chunks))
        self._count(calls=1, units_computed=len(us) - start, units_reused=start)
        logits = torch.cat(out) if out else torch.empty(0, net.fc.out_features)
        self.cache.put(tag + "logits:" + prep.head, logits)
        return logits

    def _fp32_full(self, prep: _Prepared) -> torch.Tensor:
        """fp32 logits (N, 10) of all images. Without the mixed path, as the preview rows plus the
        rest, each cached on its own with a share of the bound in proportion to its rows (the
        same units are kept as for the whole set), so a full run after its preview computes only
        the rest; with it, as one set (the re-checks gather rows from the full-set activations)."""
        if not self.split:
            return self._forward(prep, "full", bf16=False)
        n = len(self.labels)
        out = torch.empty(n, prep.fp32.fc.out_features)
        for subset in ("preview", "rest"):
            rows = self._rows(subset)
            if len(rows):
                out[rows] = self._forward(prep, subset, bf16=False, share=len(rows) / n)
        return out

    def _on_worker(self, fn, *args):
        """Run ``fn`` on the engine's one worker thread and wait for it. Evaluations run one at a
        time: on 2 cores concurrent passes only interleave (no throughput gained) while each would
        hold its own transient activations, and oneDNN keeps a scratchpad per calling thread
        (docs/engine.md, "Memory")."""
        return self._worker.submit(fn, *args).result()

    def logits(self, net: CompressedResNet20, preview: bool = False) -> torch.Tensor:
        """fp32 logits (N, 10) of ``net`` on the images (or (P, 10) on the preview subset)."""
        return self._on_worker(self._logits, net.eval(), preview).clone()  # not the cached tensor itself

    @torch.inference_mode()
    def _logits(self, net: CompressedResNet20, preview: bool) -> torch.Tensor:
        prep = _Prepared(net, bf16=False)
        if preview:
            return self._forward(prep, "preview", bf16=False, share=self._preview_share())
        return self._fp32_full(prep)

    def _preview_share(self) -> float:
        """The preview's share of the cache bound: its part of the full set where the full set is
        evaluated in parts (:meth:`_fp32_full`), else (a bf16 preview, a subset of its own) all."""
        return len(self.preview_index) / len(self.labels) if self.split else 1.0

    def bf16_logits(self, net: CompressedResNet20, subset: str = "full") -> torch.Tensor:
        """Logits (rows of ``subset``, 10) of the bf16 pass the mixed path re-checks, as float32;
        ``subset``: "full", "preview", "audit" (:attr:`audit_index`) or "rest" (:attr:`rest_index`).
        For measuring the bound."""
        return self._on_worker(self._bf16_logits, net.eval(), subset).clone()

    @torch.inference_mode()
    def _bf16_logits(self, net: CompressedResNet20, subset: str) -> torch.Tensor:
        return self._forward(_Prepared(net, bf16=True), subset, bf16=True)

    @torch.inference_mode()
    def _fp32_rows(self, prep: _Prepared, rows: torch.Tensor) -> torch.Tensor:
        """fp32 logits (len(rows), 10) of the given (sorted) image rows: from the deepest cached
        full-set fp32 activation when there is one; else rows re-checked before under the same
        upstream units resume from their cached fp32 activations ("fp32:rows:" entries, which this
        call refreshes for the units it computes) and the others start from the input."""
        digests, net = prep.digests, prep.fp32
        us = units(net)
        n = len(rows)
        start, known, act, from_full = 0, torch.zeros(n, dtype=torch.bool), None, False
        for u in reversed(CACHED_UNITS):
            full = self.cache.get("fp32:full:" + digests[u])
            if full is not None:
                start, known, act, from_full = u + 1, torch.ones(n, dtype=torch.bool), self._gather(full, rows), True
                break
            entry = self.cache.get("fp32:rows:" + digests[u])
            if entry is not None:
                crows, cact = entry
                pos = torch.searchsorted(crows, rows).clamp(max=len(crows) - 1)
                known = crows[pos] == rows
                start, act = u + 1, cact.index_select(0, pos[known])
                break
        # Outputs for all rows exist only for units from ``start`` on; kept within a twelfth of the
        # bound (the full-set bf16 outputs matter more), none when resuming from a full-set entry.
        twelfth = self.cache.max_bytes // 12
        store = [] if from_full else self._plan(start, n, 4, twelfth, twelfth, prep.widths)
        bufs = {u: torch.empty(_unit_shape(u, n, prep.widths)).contiguous(memory_format=torch.channels_last)
                for u in store}
        logits = torch.empty(n, net.fc.out_features)
        missing = torch.nonzero(~known).flatten()
        groups = [(torch.nonzero(known).flatten(), start, act),
                  (missing, 0, self.inputs.index_select(0, rows[missing]).contiguous(memory_format=torch.channels_last))]
        for idx, first, src in groups:
            for i in range(0, len(idx), self.batch_size):
                sel = idx[i : i + self.batch_size]
                x = src[i : i + self.batch_size]
                for u in range(first, len(us)):
                    x = _run_unit(u, us[u], x)
                    if u in bufs:
                        bufs[u][sel] = x
                logits[sel] = _head(net, x)
        for u in store:
            self.cache.put("fp32:rows:" + digests[u], (rows.clone(), bufs[u]))
        self._count(rows_resumed=0 if from_full else int(known.sum()))
        return logits

    def predictions(self, net: CompressedResNet20, preview: bool = False) -> torch.Tensor:
        """Predicted classes (N,) equal to fp32 ones except possibly on near-ties (see module doc);
        with ``preview``, (P,) on the preview subset from the bf16 pass alone (mixed path).
        Runs on the engine's worker thread (sessions queue; see :meth:`_on_worker`)."""
        return self._on_worker(self._predictions, net.eval(), preview)

    @torch.inference_mode()
    def _predictions(self, net: CompressedResNet20, preview: bool) -> torch.Tensor:
        subset = "preview" if preview else "full"
        prep = _Prepared(net, bf16=self.mixed)
        if not self.mixed:
            logits = (self._forward(prep, "preview", bf16=False, share=self._preview_share()) if preview
                      else self._fp32_full(prep))
            release_free_memory()
            return logits.argmax(1)
        logits = self._forward(prep, subset, bf16=True)
        if preview:
            # The preview is the bf16 pass alone: labelled a preview wherever shown, and followed by
            # the full, re-checked result; re-checking it too would double its cost.
            return logits.argmax(1)
        # The bf16 error of this very net, measured on the fixed audit sample (cached like any subset).
        err = flip_error(self._forward(prep, "audit", bf16=True), self._forward(prep, "audit", bf16=False))
        rows = torch.arange(len(self.labels))
        top2 = logits.topk(2, dim=1).values
        margin = top2[:, 0] - top2[:, 1]
        pred = logits.argmax(1)
        tau = max(self.tau, self.safety * err)
        done = torch.zeros(len(rows), dtype=torch.bool)
        exact = torch.empty(len(rows), logits.shape[1])
        while True:
            idx = torch.nonzero(~(margin >= tau) & ~done).flatten()  # a NaN margin is re-checked too
            if len(idx):
                exact[idx] = self._fp32_rows(prep, rows[idx])
                done[idx] = True
                err = max(err, flip_error(logits[idx], exact[idx]))
            self._count(max_flip_error=err)
            if err * self.safety <= tau or bool(done.all()):
                break
            tau = self.safety * err  # an error larger than the audit showed: widen the bound, re-check more
            self._count(tau_widenings=1)
        pred[done] = exact[done].argmax(1)
        self._count(rechecked=int(done.sum()), last_rechecked=int(done.sum()), last_tau=tau)
        release_free_memory()
        return pred

    def evaluate(self, net: CompressedResNet20, preview: bool = False) -> Evaluation:
        """Top-1, per-class accuracy and confusion matrix of ``net`` (on the preview subset if asked)."""
        pred = self.predictions(net, preview)
        labels = self.labels.index_select(0, self.preview_index) if preview else self.labels
        return evaluation_from_predictions(pred.numpy(), labels.numpy())


_NATIVE_BOUND = False


def bound_native_memory(primitive_cache: int = 128) -> None:
    """Keep native memory of a long-running evaluating process bounded (process-wide, once).

    Two native growths (docs/engine.md, "Memory"): oneDNN keeps one conv primitive (about 5 MB)
    per distinct shape - every k and every re-check batch size - up to 1024 of them
    (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, read at its first use, lowered here unless set); and glibc
    keeps freed multi-MB activation buffers in its heap, which :func:`release_free_memory` hands
    back after each evaluation."""
    global _NATIVE_BOUND
    if _NATIVE_BOUND:
        return
    _NATIVE_BOUND = True
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(primitive_cache))


def release_free_memory() -> None:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim``; no-op elsewhere)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - probe: not glibc raises AttributeError
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _bf16_supported() -> bool:
    """Whether to use the mixed path by default: with native BF16 instructions (AVX-512 BF16 / AMX),
    unless ``EXPLORER_ENGINE_PRECISION=fp32``."""
    if os.environ.get("EXPLORER_ENGINE_PRECISION", "auto") == "fp32":
        return False
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
