"""Data-aware clustering statistics and least-squares recovery of a clustered ResNet20, in closed
form on a few thousand *training* images (no gradient step, never the test split).

Two methods, both from the channel-pruning literature and adapted here to clustered filters:

- **Output-error metric** for k-means (the ``space="data"`` option of
  :class:`explorer.clustering.ClusteringConfig`). With ``Sigma = E[p p^T]`` the second moment of a
  conv layer's input patches p (Cin*kh*kw values, plus a constant 1 when the BatchNorm is folded
  into a [filter, bias] point), replacing filter w by centroid c changes that filter's output by
  ``(w - c)^T Sigma (w - c)`` in mean square. k-means on ``L^T w`` (``Sigma = L L^T``, Cholesky)
  therefore minimises the layer's output error, and the centroid of a cluster is still the mean of
  its members' filters. Statistics: :func:`reference`.
- **Least-squares reconstruction** (``recovery="lsq"``): every conv from the first clustered layer
  on, in forward order, and the classifier are re-fitted by ridge regression so that the clustered
  net reproduces the original net's pre-activation outputs at sampled positions, its inputs taken
  from the already re-fitted clustered net (He et al. 2017, "Channel Pruning for Accelerating Very
  Deep Neural Networks", arXiv:1707.06168, section 3; Luo et al. 2017, ThiNet). For a block's
  second conv the target is the original block's output before the ReLU minus the clustered net's
  own shortcut, so it also absorbs the error carried along the residual stream (He et al. 2017,
  section 4.1, multi-branch networks). Filters of one cluster stay tied (one shared filter, fitted
  to the members' targets), so the re-fitted net has the same distinct filters and the same merges
  and :func:`explorer.compress.compress` builds the same smaller architecture.

Everything here runs in fp32 on the CPU; see ``docs/recovery.md`` for the measurements.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .digest import digest
from .lru import ActivationCache, LRUCache
from .model import CONV_LAYERS

POSITIONS_PER_IMAGE = 32
RIDGE = 1e-3  # relative to the mean diagonal of P^T P: keeps duplicated (merged) input columns solvable


class RecoveryError(ValueError):
    """Recovery asked for without what it needs (training images, a filter-granularity clustering)."""


# ---------------------------------------------------------------- forward with taps

def _blocks(model: nn.Module):
    for stage in (model.layer1, model.layer2, model.layer3):
        yield from stage


def _sample_positions(n_images: int, size: int, per_image: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(n, y, x) index tensors of ``per_image`` distinct output positions per image, each (M,)."""
    per_image = min(per_image, size * size)
    flat = torch.stack([torch.randperm(size * size, generator=generator)[:per_image] for _ in range(n_images)])
    n = torch.arange(n_images).repeat_interleave(per_image)
    flat = flat.reshape(-1)
    return n, flat // size, flat % size


def patches(x: torch.Tensor, pos: tuple[torch.Tensor, ...], stride: int) -> torch.Tensor:
    """Input patches of a 3x3, padding-1 conv at output positions ``pos`` = (n, y, x), each (M,):
    x (N, Cin, H, W) -> (M, 9*Cin) in (dy, dx, channel) order, the order of
    ``weight.permute(0, 2, 3, 1).reshape(Cout, -1)`` (gathered from channels_last memory without a
    transposing copy)."""
    xp = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # (N, H+2, W+2, C), a view of channels_last memory
    n, y, xx = pos
    d = torch.arange(3)
    rows = (y * stride)[:, None] + d[None, :]  # (M, 3)
    cols = (xx * stride)[:, None] + d[None, :]
    return xp[n[:, None, None], rows[:, :, None], cols[:, None, :]].reshape(len(n), -1)  # (M, 3, 3, C)


def hwc_to_chw(cin: int) -> torch.Tensor:
    """Index map from (channel, dy, dx) order (``weight.view(Cout, -1)``) into the (dy, dx,
    channel) order of :func:`patches`: ``chw_vector = hwc_vector[hwc_to_chw(cin)]``."""
    return torch.arange(9 * cin).view(3, 3, cin).permute(2, 0, 1).reshape(-1)


def _at(y: torch.Tensor, pos: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Values of y (N, C, H, W) at positions pos -> (M, C)."""
    n, r, c = pos
    return y[n, :, r, c]


def _conv(conv: nn.Conv2d, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    """conv(x) in float32, computed in bf16 where asked: a re-fit only needs its inputs to about
    three digits, and on CPUs with native BF16 the conv is several times faster."""
    if not bf16:
        return conv(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return conv(x).float()


# ---------------------------------------------------------------- reference statistics

@dataclass(frozen=True)
class LayerReference:
    """What the original net computes at one conv layer, on the reference images.

    positions: (n, y, x) output positions sampled, each (M,); gram: (D+1, D+1) float64
    ``P~^T P~ / M`` with P~ = [input patches in (channel, dy, dx) order, 1] of the original net
    (D = Cin*9); target: (M, Cout) float32, the original pre-activation output at those positions
    (post-BN; for a block's second conv, post-BN plus the shortcut: the block's output before its
    ReLU)."""

    name: str
    positions: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    gram: np.ndarray
    target: torch.Tensor


@dataclass(frozen=True)
class Reference:
    """The original net on ``images`` (uint8 (N, 3, 32, 32), training split): per-layer references,
    the input of each of the 9 blocks (bf16, channels_last; a re-fit starts at the first changed
    block) and the logits (N, 10)."""

    images: torch.Tensor
    layers: dict[str, LayerReference]
    block_inputs: tuple[torch.Tensor, ...]
    logits: torch.Tensor
    key: str | None = None  # the caller's digest of model and images, with the positions drawn (cache keys of what it feeds)

    def sigma(self, name: str, with_bias: bool) -> np.ndarray:
        """Second moment of layer ``name``'s input patches, (channel, dy, dx) order: (D, D), or
        (D+1, D+1) augmented with the constant input of a folded bias (last)."""
        g = self.layers[name].gram
        return g if with_bias else g[:-1, :-1]


def _gram_chw(p: torch.Tensor, cin: int) -> np.ndarray:
    """P~^T P~ / M of HWC patches p (M, 9*cin), returned in (channel, dy, dx) order plus the constant."""
    p = torch.cat([p.float(), torch.ones(len(p), 1)], 1)
    g = (p.T @ p).double().div_(len(p))
    order = torch.cat([hwc_to_chw(cin), torch.tensor([9 * cin])])
    return g[order][:, order].numpy()


_REFERENCES = LRUCache(2)  # each entry about 80 MB for 512 images (block inputs in bf16)
_LOCK = threading.Lock()


@torch.no_grad()
def reference(model: nn.Module, images: torch.Tensor, digest: str | None = None,
              per_image: int = POSITIONS_PER_IMAGE, seed: int = 0) -> Reference:
    """Statistics of the original net on uint8 training images (N, 3, 32, 32): for every conv layer
    the second moment of its input patches (for the output-error metric) and its pre-activation
    outputs at ``per_image`` sampled positions per image (the least-squares targets).

    Cached by ``digest`` (the caller's digest of the model's weights and of the images) when given.
    One fp32 forward pass (about 1-2 s for 512 images on 2 cores).
    """
    from .data import normalize

    key = (digest, per_image, seed) if digest is not None else None
    if key is not None:
        with _LOCK:
            hit = _REFERENCES.get(key)
        if hit is not None:
            return hit
    model = model.eval()
    g = torch.Generator().manual_seed(seed)
    x = normalize(images).contiguous(memory_format=torch.channels_last)
    layers: dict[str, LayerReference] = {}
    inputs = []

    def tap(name, inp, out_pre, stride):
        pos = _sample_positions(len(images), out_pre.shape[-1], per_image, g)
        layers[name] = LayerReference(name, pos, _gram_chw(patches(inp, pos, stride), inp.shape[1]),
                                      _at(out_pre, pos).float().clone())

    h = model.bn1(model.conv1(x))
    tap("conv1", x, h, 1)
    h = F.relu(h)
    for i, block in enumerate(_blocks(model)):
        prefix = f"layer{i // 3 + 1}.{i % 3}"
        inputs.append(h.to(torch.bfloat16))
        z1 = block.bn1(block.conv1(h))
        tap(f"{prefix}.conv1", h, z1, block.stride)
        u = F.relu(z1)
        out = block.bn2(block.conv2(u)) + block.shortcut(h)
        tap(f"{prefix}.conv2", u, out, 1)
        h = F.relu(out)
    logits = model.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))
    # The key names the positions too: what is cached under it (k-means in this metric, re-fitted
    # prefixes) depends on them.
    ref = Reference(images, layers, tuple(inputs), logits.float(),
                    None if digest is None else f"{digest}:{per_image}:{seed}")
    if key is not None:
        with _LOCK:
            _REFERENCES.put(key, ref)
    return ref


def whitening(sigma: np.ndarray) -> np.ndarray:
    """L (D, D) lower-triangular with ``L L^T = Sigma + eps I`` (eps = 1e-6 of the mean diagonal, so
    that a rank-deficient Sigma, e.g. from dead input channels, still factors). Points w map to
    ``w @ L`` (= (L^T w)^T), whose squared distances are the output-error metric."""
    eps = 1e-6 * max(float(np.trace(sigma)) / len(sigma), 1e-12)
    return np.linalg.cholesky(sigma + eps * np.eye(len(sigma)))


# ---------------------------------------------------------------- least squares

def _solve(gram: torch.Tensor, rhs: torch.Tensor, lam: float) -> torch.Tensor:
    """(G + lam * mean(diag G) * I)^-1 rhs in float64: gram (D, D), rhs (D, C) -> (D, C)."""
    a = gram.double()
    a = a + lam * float(a.diagonal().mean().clamp_min(1e-12)) * torch.eye(a.shape[0], dtype=a.dtype)
    b = rhs.double()
    try:
        return torch.cholesky_solve(b, torch.linalg.cholesky(a))
    except RuntimeError:  # not positive definite in floating point
        return torch.linalg.lstsq(a, b).solution


def ridge(p: torch.Tensor, t: torch.Tensor, lam: float = RIDGE) -> torch.Tensor:
    """Ridge regression ``argmin_W ||P W - T||^2 + lam' ||W||^2`` with lam' = lam times the mean
    diagonal of P^T P: p (M, D), t (M, C) -> W (D, C) float64. The products P^T P and P^T T are
    float32 matmuls (the cost), the normal equations are solved in float64 (Cholesky; lstsq when
    P^T P + lam' I is not positive definite in floating point)."""
    p, t = p.float(), t.float()
    return _solve(p.T @ p, p.T @ t, lam)


def fit_tied(p: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, m: torch.Tensor, bias: str,
             lam: float = RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one shared filter per cluster to the members' targets.

    Channel i's output is modelled as ``m_i * (P d_{labels_i}) + beta_i``; p (M, D) input patches,
    t (M, Cout) targets, labels (Cout,), m (Cout,) the fixed per-channel factor (BatchNorm scale
    times the cosine metric's filter norm; 1 when folded). ``bias="channel"``: beta_i free per
    channel (a BatchNorm shift); ``"cluster"``: ``beta_i = m_i c_{labels_i}`` (a folded bias, tied so
    members stay identical and merge). Minimises ``sum_i ||m_i P d + beta_i - t_i||^2`` + ridge, in
    closed form: the members' targets combine into one, ``sum_i m_i t_i / sum_i m_i^2``.

    Returns (d (k, D) float32, beta (Cout,) float32). Raises ValueError for another ``bias``.
    """
    if bias not in ("channel", "cluster"):
        raise ValueError(f"bias must be 'channel' or 'cluster', got {bias!r}")
    k = int(labels.max()) + 1
    p, t, m = p.float(), t.float(), m.float()
    onehot = torch.zeros(len(labels), k)
    onehot[torch.arange(len(labels)), labels] = 1.0
    msq = (onehot * (m**2)[:, None]).sum(0).clamp_min(1e-24)  # (k,)
    combine = onehot * m[:, None] / msq[None, :]  # (Cout, k): member targets -> cluster target
    gram = p.T @ p  # (D, D), the expensive product, shared by all clusters
    psum = p.sum(0)  # (D,)
    n = float(len(p))
    if bias == "channel":
        # Free per-channel shifts: solve on centred data, then each shift is its channel's mean
        # residual. Centring is done on the Gram matrix, not on P (one pass less over P).
        pmean, tmean = psum / n, t.mean(0)
        gram_c = gram.double() - n * torch.outer(pmean.double(), pmean.double())
        rhs = (p.T @ (t @ combine)).double() - n * torch.outer(pmean.double(), (tmean @ combine).double())
        d = _solve(gram_c, rhs, lam).T  # (k, D)
        beta = tmean.double() - m.double() * (d[labels] @ pmean.double())
        return d.float(), beta.float()
    # Tied folded bias: a constant input column, [P, 1].
    tc = t @ combine  # (M, k)
    gram_a = torch.zeros(gram.shape[0] + 1, gram.shape[0] + 1, dtype=torch.float64)
    gram_a[:-1, :-1] = gram.double()
    gram_a[:-1, -1] = gram_a[-1, :-1] = psum.double()
    gram_a[-1, -1] = n
    rhs = torch.cat([(p.T @ tc).double(), tc.sum(0, keepdim=True).double()], 0)
    da = _solve(gram_a, rhs, lam).T  # (k, D+1)
    d, c = da[:, :-1], da[:, -1]
    return d.float(), (m.double() * c[labels]).float()


@dataclass(frozen=True)
class _Tying:
    labels: torch.Tensor  # (Cout,) cluster of each filter
    scales: torch.Tensor  # (Cout,) filter norm multiplying the shared direction (1 for euclidean)
    folded: bool  # the BatchNorm is the identity plus a (tied) bias


def _tying(name: str, conv: nn.Conv2d, clustering) -> _Tying:
    res = clustering.layers.get(name) if clustering is not None else None
    cout = conv.weight.shape[0]
    if res is None:
        return _Tying(torch.arange(cout), torch.ones(cout), False)
    return _Tying(torch.as_tensor(res.labels, dtype=torch.long), res.scales.float().clone(), res.bias is not None)


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return a, bn.bias - a * bn.running_mean


@torch.no_grad()
def _refit_conv(name: str, conv: nn.Conv2d, bn: nn.BatchNorm2d, inp: torch.Tensor, stride: int,
                ref: LayerReference, clustering, offset: torch.Tensor | None = None) -> None:
    """Re-fit ``conv`` (and the shift of ``bn``) in place from the clustered net's input ``inp``
    (N, Cin, H, W) to the reference targets (minus ``offset`` (M, Cout), the shortcut)."""
    tie = _tying(name, conv, clustering)
    # A pruned channel (BN scale and shift both zero: exactly 0 after its ReLU) stays pruned.
    dead = (bn.weight == 0) & (bn.bias == 0)
    p = patches(inp, ref.positions, stride)
    t = ref.target - offset if offset is not None else ref.target
    a, _ = _bn_scale_shift(bn)
    m = a * tie.scales
    # A zero-norm filter of the cosine metric (scale 0) gets a zero target weight: it stays zero.
    d, beta = fit_tied(p, t, tie.labels, m, "cluster" if tie.folded else "channel")
    cout, cin = conv.weight.shape[:2]
    w = d[tie.labels] * tie.scales[:, None]  # (Cout, 9*Cin) in (dy, dx, channel) order
    conv.weight.copy_(w.view(cout, 3, 3, cin).permute(0, 3, 1, 2))
    if tie.folded:
        # Folded BatchNorm: the identity plus a bias, bias_i = s_i c_j, tied so members stay mergeable.
        bn.bias.copy_(beta)
    else:
        bn.bias.copy_(beta + a * bn.running_mean)
    if bool(dead.any()):
        conv.weight[dead] = 0.0
        bn.bias[dead] = 0.0


def _native_bf16() -> bool:
    from .engine import _bf16_supported

    return _bf16_supported()


def first_clustered(clustering) -> int | None:
    """Registry index (0..18) of the first clustered layer, or None when nothing is clustered."""
    names = [c.name for c in CONV_LAYERS]
    idx = [names.index(n) for n in clustering.layers]
    return min(idx) if idx else None


# Re-fitted prefixes of recent recoveries: for the block boundaries from the input of layer2.1 on,
# the re-fitted weights before the boundary and the clustered net's activation there on the
# reference images (fp32, 512 images: 17 MB for the inputs of layer2.1, layer2.2 and layer3.0, 8 MB
# for those of layer3.1 and layer3.2; about 70 MB for one configuration with its weights, so the
# default bound holds about two). A slider move re-fits from the block it changed, not from the
# first clustered layer; the result is bit-identical to a full re-fit (the same operations on the
# same numbers). Earlier boundaries are not kept: their activations are the largest (33 MB each)
# and the stage-1 fits they would skip the cheapest (144 inputs per filter against 576 in stage 3).
# Shared by all sessions of a process, bounded in bytes.
PREFIX_CACHE_MB = int(os.environ.get("EXPLORER_LSQ_PREFIX_CACHE_MB", "160"))
_FIRST_KEPT = 4  # block index of layer2.1: its input is the first boundary kept
_PREFIXES = ActivationCache(PREFIX_CACHE_MB * 2**20)


def _layer_key(key: str, name: str, conv: nn.Conv2d, bn: nn.BatchNorm2d, tie: _Tying | None) -> str:
    """The chained key after layer ``name``: everything its re-fit reads (the applied weights and
    BatchNorm, its tying) on top of everything before it."""
    parts = [key, name, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var]
    if tie is not None:
        parts += [tie.labels, tie.scales, str(tie.folded)]
    return digest(*parts, length=24)


@torch.no_grad()
def lsq_recover(model: nn.Module, clustering, ref: Reference, refit_classifier: bool = True,
                bf16: bool | None = None, start: int | None = None) -> nn.Module:
    """Least-squares recovery, in place, of a clustered ResNet20 (``clustering``'s centroid filters
    already written by :func:`explorer.clustering.apply`; ``ref`` from :func:`reference` on the
    original net).

    Every conv from the first clustered layer on is re-fitted in forward order on ``ref``'s images
    and positions: a clustered layer keeps its clusters (one shared filter per cluster, cosine
    scales kept, folded biases tied), an unclustered one is re-fitted freely; the BatchNorm scale is
    kept and its shift re-fitted (this is the BN re-estimation of this recovery). Then the
    classifier is re-fitted to the original logits (``refit_classifier``). The forward passes run
    in bf16 where the CPU has native BF16 (``bf16=None``), the fits in float32/float64. Returns
    ``model`` (eval mode).

    Where a recent recovery from the same reference re-fitted the same layers with the same inputs
    up to a block boundary (a slider move downstream of it), its re-fitted weights and activation
    there are reused (:data:`PREFIX_CACHE_MB`): same result, bit for bit, and only the blocks from
    the changed one on are re-fitted.

    ``start``: re-fit from this registry index on instead of the first clustered layer (a pruned
    net, :mod:`explorer.pruning`, has no clusters; its masked channels stay masked).

    Raises RecoveryError for kernel granularity (a kernel codebook ties parts of filters, which this
    closed form does not keep).
    """
    from .data import normalize

    if clustering.config.granularity != "filter":
        raise RecoveryError("least-squares recovery needs granularity=filter; use recovery=bn for kernels")
    start = first_clustered(clustering) if start is None else start
    model = model.eval()
    if start is None:
        return model
    if bf16 is None:
        bf16 = _native_bf16()
    names = [c.name for c in CONV_LAYERS]
    blocks = list(_blocks(model))
    convs = [(model.conv1, model.bn1)] + [cb for b in blocks for cb in ((b.conv1, b.bn1), (b.conv2, b.bn2))]

    # Chained keys: keys[i] covers everything the re-fits of layers 0..i-1 read.
    keys = [None] * (len(names) + 1)
    if ref.key is not None:
        keys[0] = digest(ref.key, str((start, bf16)), length=24)
        for i, (conv, bn) in enumerate(convs):
            tie = _tying(names[i], conv, clustering) if i >= start else None
            keys[i + 1] = _layer_key(keys[i], names[i], conv, bn, tie)

    def boundary_key(b):  # before block b's first conv (registry index 1 + 2b)
        return None if keys[0] is None else "lsq:" + keys[1 + 2 * b]

    def maybe_refit(name, conv, bn, inp, stride, offset=None):
        if names.index(name) >= start:
            _refit_conv(name, conv, bn, inp, stride, ref.layers[name], clustering, offset)

    first_block = max(0, (start - 1) // 2)  # registry index 1 + 2b is block b's first conv
    # Boundaries worth keeping: those after at least one re-fit (the stem's, when it is re-fitted).
    lowest = max(_FIRST_KEPT, first_block if start == 0 else first_block + 1)
    resume = None
    for b in range(len(blocks) - 1, lowest - 1, -1) if keys[0] is not None else ():
        hit = _PREFIXES.get(boundary_key(b))
        if hit is not None:
            resume = b, hit
            break
    if resume is not None:
        # ``h`` is the cached tensor itself (no copy): nothing below writes into its input (a
        # stride-1 shortcut returns it as is), so the entry stays as stored.
        first_block, (h, *weights) = resume
        done = range(start, 1 + 2 * first_block)  # the layers re-fitted before the boundary
        for i, (w, beta) in zip(done, zip(weights[0::2], weights[1::2])):
            convs[i][0].weight.copy_(w)
            convs[i][1].bias.copy_(beta)
    elif start == 0:
        x = normalize(ref.images).contiguous(memory_format=torch.channels_last)
        maybe_refit("conv1", model.conv1, model.bn1, x, 1)
        h = F.relu(model.bn1(_conv(model.conv1, x, bf16)))
    else:  # everything upstream is unchanged: start from the original net's activations
        h = ref.block_inputs[first_block].float()
    for i in range(first_block, len(blocks)):
        block, prefix = blocks[i], f"layer{i // 3 + 1}.{i % 3}"
        if keys[0] is not None and i >= lowest and (resume is None or i > resume[0]):
            done = range(start, 1 + 2 * i)
            snap = [t.clone() for j in done for t in (convs[j][0].weight, convs[j][1].bias)]
            _PREFIXES.put(boundary_key(i), (h, *snap))
        maybe_refit(f"{prefix}.conv1", block.conv1, block.bn1, h, block.stride)
        u = F.relu(block.bn1(_conv(block.conv1, h, bf16)))
        sc = block.shortcut(h)
        maybe_refit(f"{prefix}.conv2", block.conv2, block.bn2, u, 1, _at(sc, ref.layers[f"{prefix}.conv2"].positions))
        h = F.relu(block.bn2(_conv(block.conv2, u, bf16)) + sc)
    if refit_classifier:
        feats = F.adaptive_avg_pool2d(h, 1).flatten(1)
        wb = ridge(torch.cat([feats, torch.ones(len(feats), 1)], 1), ref.logits)  # (65, 10)
        model.fc.weight.copy_(wb[:-1].T.float())
        model.fc.bias.copy_(wb[-1].float())
    return model
