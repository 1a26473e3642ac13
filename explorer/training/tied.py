"""Clustered convs that stay clustered while they train: the modules and conversions behind
cluster-preserving fine-tuning (:mod:`explorer.training.finetune`).

Plain training would pull the filters of a cluster apart again and lose the structural savings,
so the clusters are tied by construction:

- Each clustered conv is replaced by a :class:`TiedConv` whose only weight is its k distinct
  filters D (k, Cin, 3, 3); its Cout output channels are ``conv(x, D)[:, labels] * scales``
  (scales: the per-filter norm of the cosine metric, fixed; all 1 for euclidean). After every step
  the full filter bank ``D[labels] * scales`` is exactly clustered, by construction, not by a
  projection that rounding could break.
- Gradients of D are divided by the cluster sizes, i.e. each centroid moves by the *mean* of its
  members' gradients: projected gradient descent in the original weight space ("average the
  gradients within each cluster, then re-project"), so a cluster of 30 filters does not take 30x
  larger steps than a singleton.
- With ``fold_bn`` and wherever the compressed net merged a block's first conv (clustered channels
  identical after BN + ReLU, so the block's second conv also shrinks), the BatchNorm after a
  clustered conv is tied too: one BatchNorm over the k centroid outputs, gathered after it, with
  gamma kept >= 1e-3 after each step (merging needs positive per-channel gains). Clustering the
  fine-tuned checkpoint again with the same configuration (what the app does) therefore finds
  exactly the same clusters. Every other BatchNorm trains normally.
- With ``fold_bn`` the clustered layers' BatchNorms are identities (+ the clustered bias) after
  :func:`explorer.clustering.apply`; :func:`rebase_batchnorms` first sets their running statistics
  to measured ones (gamma/beta adjusted so that the eval-mode function is unchanged), so that
  training-mode normalisation starts from the same function.

:func:`explorer.compress.compress` of the fine-tuned net (:func:`materialize`) yields the same
smaller architecture (same k per layer, same merges).
"""
from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..clustering import Clustering, ClusteringConfig, ClusteringError, bn_affine, calibration_subset, prune
from ..compress import compress, representatives
from ..data import normalize
from ..model import conv_layer, resnet20

MIN_TIED_GAMMA = 1e-3


# ---------------------------------------------------------------- tied modules

class TiedConv(nn.Module):
    """A clustered 3x3 conv parametrised by its k distinct filters; optionally with the tied
    BatchNorm of its clusters.

    centroids: (k, Cin, 3, 3) parameter; labels: (Cout,) int64 buffer; scales: (Cout,) float buffer,
    the fixed per-filter factor of the cosine metric (all 1 for euclidean); bn: a BatchNorm2d over
    the k centroid outputs, or None; gains: (Cout,) fixed per-channel factor after a tied BN.
    forward: (N, Cin, H, W) -> (N, Cout, H/stride, W/stride) =
    ``conv(x, centroids)[:, labels] * scales`` without bn, ``bn(conv(x, centroids))[:, labels] * gains``
    with it.
    """

    def __init__(self, centroids: torch.Tensor, labels: torch.Tensor, scales: torch.Tensor, stride: int,
                 bn: nn.BatchNorm2d | None = None, gains: torch.Tensor | None = None):
        super().__init__()
        k = centroids.shape[0]
        self.centroids = nn.Parameter(centroids.detach().clone().float())
        self.register_buffer("labels", labels.detach().clone().long())
        self.register_buffer("scales", scales.detach().clone().float())
        self.register_buffer("gains", (torch.ones_like(self.scales) if gains is None else gains.detach().clone().float()))
        self.register_buffer("counts", torch.bincount(self.labels, minlength=k).float().clamp_min(1))
        self.stride = stride
        self.bn = bn
        post = self.gains if bn is not None else self.scales
        self.unit = bool(torch.all(post == 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._expanded(x) if self.training else self._gathered(x)

    def _gathered(self, x: torch.Tensor) -> torch.Tensor:
        """The definition (the eval-mode forward): the k-filter conv, ``bn`` over the k channels
        (called as a module), then each member's channel gathered from its cluster's."""
        z = F.conv2d(x, self.centroids, None, self.stride, 1)
        if self.bn is not None:
            z = self.bn(z)
        z = z.index_select(1, self.labels)
        if self.unit:
            return z
        post = self.gains if self.bn is not None else self.scales
        return z * post.view(1, -1, 1, 1).to(z.dtype)

    def _expanded(self, x: torch.Tensor) -> torch.Tensor:
        """The training-mode forward, same function: the conv runs with the expanded filter bank
        (each member a copy of its centroid) rather than on the k centroids followed by a channel
        gather, whose scatter-add backward over the (N, Cout, H, W) activation costs more than the
        extra MACs (a distilled tied step on the 2-core AVX-512 CPU, bf16 channels_last: 156 ->
        116-127 ms). The gradient reaching a centroid is the same sum over its members. Eval mode keeps
        the k-filter conv and calls ``bn`` as a module; in training ``bn`` is not called (its
        forward hooks do not fire; :func:`rebase_batchnorms` hooks it in eval mode)."""
        w = self.centroids.index_select(0, self.labels)
        if self.bn is None:
            if not self.unit:
                w = w * self.scales.view(-1, 1, 1, 1)
            return F.conv2d(x, w, None, self.stride, 1)
        return self._tied_batchnorm(F.conv2d(x, w, None, self.stride, 1))

    def _tied_batchnorm(self, z: torch.Tensor) -> torch.Tensor:
        """``bn`` over the k clusters applied to the Cout member channels of ``z``: members are
        equal, so per-channel statistics equal their cluster's, and the running statistics of the
        k-channel ``bn`` are updated from its first member's (nn.BatchNorm2d's semantics:
        momentum, or a cumulative average when momentum is None)."""
        bn, labels = self.bn, self.labels
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                factor = 1.0 / float(bn.num_batches_tracked)
        mean = var = None  # None without running statistics (track_running_stats=False)
        if bn.running_mean is not None:
            mean, var = bn.running_mean[labels], bn.running_var[labels]  # copies, updated below
        weight = bn.weight[labels] if bn.weight is not None else torch.ones_like(self.gains)
        bias = bn.bias[labels] if bn.bias is not None else torch.zeros_like(self.gains)
        if not self.unit:
            weight, bias = weight * self.gains, bias * self.gains
        out = F.batch_norm(z, mean, var, weight, bias, bn.training or mean is None, factor, bn.eps)
        if bn.training and mean is not None:
            with torch.no_grad():  # from each cluster's first member (deterministic); empty ones keep theirs
                n = labels.numel()
                first = torch.full_like(bn.running_mean, n, dtype=torch.long).scatter_reduce_(
                    0, labels, torch.arange(n, device=labels.device), reduce="amin")
                present = first < n
                bn.running_mean[present] = mean[first[present]]
                bn.running_var[present] = var[first[present]]
        return out

    def filters(self) -> torch.Tensor:
        """The full filter bank (Cout, Cin, 3, 3) = centroids[labels] * scales: exactly clustered."""
        return self.centroids.detach()[self.labels] * self.scales.view(-1, 1, 1, 1)

    @torch.no_grad()
    def average_gradients(self) -> None:
        """Turn the summed member gradients of each centroid (and tied BN parameter) into means."""
        if self.centroids.grad is not None:
            self.centroids.grad.div_(self.counts.view(-1, 1, 1, 1))
        if self.bn is not None:
            for p in (self.bn.weight, self.bn.bias):
                if p.grad is not None:
                    p.grad.div_(self.counts)

    @torch.no_grad()
    def project(self) -> None:
        """Keep tied BN gains positive (so merged channels stay mergeable)."""
        if self.bn is not None:
            self.bn.weight.clamp_(min=MIN_TIED_GAMMA)


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    head, _, attr = path.rpartition(".")
    return (model.get_submodule(head) if head else model), attr


def tied_layers(model: nn.Module) -> dict[str, TiedConv]:
    """{layer name: TiedConv} of a tied model, in forward order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, TiedConv)}


def merged_layers(compressed) -> set[str]:
    """Layers whose clustered channels the compressed net merged (k filters, no gather)."""
    return {s.name for s in compressed.specs if s.filters < conv_layer(s.name).filters and not s.gathered}


def tied_bn_layers(clustering: Clustering, compressed) -> set[str]:
    """Layers whose BatchNorm is tied during fine-tuning: the merged ones, and with ``fold_bn``
    every clustered layer (its folded filter and bias are what was clustered)."""
    merged = merged_layers(compressed)
    return merged | set(clustering.layers) if clustering.config.fold_bn else merged


@torch.no_grad()
def tie(model: nn.Module, clustering: Clustering, tied_bn: set[str] = frozenset(),
        must_tie: set[str] = frozenset()) -> nn.Module:
    """A trainable copy of a clustered ResNet20 (the output of :func:`explorer.clustering.apply`)
    with every clustered conv replaced by a :class:`TiedConv`; layers in ``tied_bn`` also get their
    BatchNorm tied (and the model's BatchNorm replaced by an identity): use it for merged layers
    and for every clustered layer of a ``fold_bn`` configuration (see :func:`tied_bn_layers`).
    A layer whose channels are not proportional within its clusters after BatchNorm keeps its own
    per-channel BatchNorm (fold_bn with cosine and BN re-estimation); for one in ``must_tie`` (the
    merged layers) that raises ClusteringError. The eval-mode function is unchanged (up to float
    rounding). Raises ClusteringError for kernel granularity."""
    if clustering.config.granularity != "filter":
        raise ClusteringError("fine-tuning keeps filter clusters; kernel granularity is not supported")
    tied = copy.deepcopy(model).float()
    for name, res in clustering.layers.items():
        conv = tied.get_submodule(name)
        bn_path = conv_layer(name).bn
        bn = tied.get_submodule(bn_path)
        labels = torch.as_tensor(res.labels, dtype=torch.long)
        scales = res.scales.float().clone()
        k = int(labels.max()) + 1
        rep = representatives(labels, scales, k)
        s = scales[rep].view(-1, 1, 1, 1)
        w = conv.weight.detach().float()
        safe = torch.where(s > 0, s, torch.ones_like(s))
        d = torch.where(s > 0, w[rep] / safe, torch.zeros_like(w[rep]))
        tbn, gains = None, None
        if name in tied_bn:
            # Eval-mode channel i = A_i z_c + B_i (z_c = conv(x, D_c), A_i = a_i s_i, B_i = b_i). The
            # BN can be tied when (A_i, B_i) = g_i (A_rep, B_rep) within each cluster: the tied BN
            # over k channels is the exact affine A_rep z + B_rep (mean 0, var 1 - eps), g_i a
            # fixed gain.
            a, b = bn_affine(bn)
            big_a, big_b = a * scales, b
            ar, br = big_a[rep][labels], big_b[rep][labels]
            safe_ar = torch.where(ar != 0, ar, torch.ones_like(ar))
            g = torch.where(ar != 0, big_a / safe_ar, torch.zeros_like(ar))
            if bool((ar != 0).all()) and torch.allclose(big_b, g * br, rtol=1e-4, atol=1e-5):
                tbn = nn.BatchNorm2d(k, eps=bn.eps, momentum=bn.momentum)
                tbn.weight.copy_(big_a[rep])
                tbn.bias.copy_(big_b[rep])
                tbn.running_mean.zero_()
                tbn.running_var.fill_(1.0 - bn.eps)
                gains = g
                parent, attr = _parent(tied, bn_path)
                setattr(parent, attr, nn.Identity())
            elif name in must_tie:
                raise ClusteringError(f"{name}: the merged channels of a cluster differ after BatchNorm")
        parent, attr = _parent(tied, name)
        setattr(parent, attr, TiedConv(d, labels, scales, conv.stride[0], tbn, gains))
    return tied.eval()


@torch.no_grad()
def rebase_batchnorms(model: nn.Module, bns: list[nn.BatchNorm2d], images: torch.Tensor, batch_size: int = 500
                      ) -> None:
    """Set the running statistics of ``bns`` to the batch statistics (mean, biased variance) of
    their inputs on uint8 ``images`` and change weight/bias so that each BN's eval-mode affine
    y = a x + b stays exactly the same. Afterwards training-mode normalisation starts from the
    eval-mode function. Model in eval mode throughout; nothing else changes."""
    sums = {id(m): [0.0, 0.0, 0] for m in bns}

    def hook(m, inp, out):
        x = inp[0].detach().double()
        s = sums[id(m)]
        s[0] = s[0] + x.sum((0, 2, 3))
        s[1] = s[1] + (x * x).sum((0, 2, 3))
        s[2] += x.shape[0] * x.shape[2] * x.shape[3]

    handles = [m.register_forward_hook(hook) for m in bns]
    model.eval()
    try:
        for i in range(0, len(images), batch_size):
            model(normalize(images[i : i + batch_size]))
    finally:
        for h in handles:
            h.remove()
    for m in bns:
        s0, s1, n = sums[id(m)]
        mean = s0 / n
        var = (s1 / n - mean * mean).clamp_min(0)
        a = m.weight.double() / torch.sqrt(m.running_var.double() + m.eps)
        b = m.bias.double() - a * m.running_mean.double()
        m.running_mean.copy_(mean.float())
        m.running_var.copy_(var.float())
        m.weight.copy_((a * torch.sqrt(var + m.eps)).float())
        m.bias.copy_((b + a * mean).float())


@torch.no_grad()
def materialize(tied: nn.Module) -> nn.Module:
    """The plain ResNet20 (eval mode) computing the same function as ``tied``: clustered filters
    written out as centroids[labels] * scales, tied BatchNorms expanded per channel
    (weight g_i gamma_c, bias g_i beta_c, mean s_i mu_c, var s_i^2 (var_c + eps) - eps, so that
    BN_i(s_i z) = g_i BN_c(z))."""
    plain = resnet20()
    state = plain.state_dict()
    src = tied.state_dict()
    for k in state:
        if k in src:
            state[k] = src[k].detach().clone().float() if src[k].is_floating_point() else src[k].clone()
    for name, t in tied_layers(tied).items():
        state[f"{name}.weight"] = t.filters().clone()
        if t.bn is not None:
            bn_path = conv_layer(name).bn
            s, g, lab, eps = t.scales.clamp_min(1e-12), t.gains, t.labels, t.bn.eps
            state[f"{bn_path}.weight"] = g * t.bn.weight.detach()[lab]
            state[f"{bn_path}.bias"] = g * t.bn.bias.detach()[lab]
            state[f"{bn_path}.running_mean"] = s * t.bn.running_mean[lab]
            state[f"{bn_path}.running_var"] = s * s * (t.bn.running_var[lab] + eps) - eps
            state[f"{bn_path}.num_batches_tracked"] = t.bn.num_batches_tracked.clone()
    plain.load_state_dict(state)
    return plain.eval()


def tied_clustering(tied: nn.Module, config: ClusteringConfig, template: Clustering) -> Clustering:
    """The Clustering that describes the tied model's current filters (labels and scales unchanged,
    replacement weights and centroids updated), for :func:`explorer.compress.compress`."""
    layers = {}
    for name, t in tied_layers(tied).items():
        old = template.layers[name]
        cent = t.centroids.detach().reshape(t.centroids.shape[0], -1).numpy().astype(np.float32)
        layers[name] = replace(old, weight=t.filters().float().contiguous(), scales=t.scales.clone(),
                               centroids=cent)
    return replace(template, config=config, layers=layers)  # the clustered streams (labels) carry over


def distinct_filters(weight: torch.Tensor) -> int:
    """Number of bit-distinct filters in a (Cout, Cin, kh, kw) weight."""
    return len(torch.unique(weight.reshape(weight.shape[0], -1), dim=0))


def distinct_directions(weight: torch.Tensor, tol: float = 1e-5) -> int:
    """Number of distinct filter directions (unit vectors equal within ``tol`` per entry, zero
    filters counted as one direction): what stays shared under the cosine metric, where each
    filter keeps its own norm. Equals :func:`distinct_filters` for euclidean clusters of nonzero
    filters."""
    w = weight.detach().double().reshape(weight.shape[0], -1)
    u = w / w.norm(dim=1, keepdim=True).clamp_min(1e-30)
    reps: list[torch.Tensor] = []
    for row in u:
        if not any(float((row - r).abs().max()) <= tol for r in reps):
            reps.append(row)
    return len(reps)


def prepare(base: nn.Module, config: ClusteringConfig, data, rebase_images: int = 2000):
    """Cluster ``base`` with ``config`` and build the tied model. Returns (clustered model,
    clustering, compressed net, tied model, merged layers). Raises ClusteringError."""
    config.validate()
    if not config.clustered:
        raise ClusteringError("the configuration clusters no layer; nothing to fine-tune")
    model, clustering = prune(base, config, data.train_images, data.train_labels)  # labels: seeds > 1 picks on them
    small = compress(model, clustering)
    merged = merged_layers(small)
    tied = tie(model, clustering, tied_bn_layers(clustering, small), must_tie=merged)
    if config.fold_bn:  # the clustered layers' BatchNorms are identities (+ bias) after apply()
        bns = []
        for name, t in tied_layers(tied).items():
            bns.append(t.bn if t.bn is not None else tied.get_submodule(conv_layer(name).bn))
        rebase_batchnorms(tied, bns, calibration_subset(data.train_images, min(rebase_images, len(data.train_images)),
                                                        config.seed))
    return model, clustering, small, tied, merged

