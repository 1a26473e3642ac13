"""Centripetal fine-tuning (``method="centripetal"``): the filters of a cluster start from their own
values and are pulled together during training, instead of being replaced by their centroid at
step 0 (Ding et al. 2019, "Centripetal SGD for Pruning Very Deep Convolutional Networks with
Complicated Structure", CVPR).

The clusters are the k-means clusters of the configuration (:func:`explorer.clustering.prune`,
the same labels the other methods use). Every clustered conv's filters and its BatchNorm's scale
and shift (what makes two channels identical after BN) are trained with the C-SGD update:

- the gradient of each member is replaced by its cluster's mean gradient, so that the members
  move together and their differences are not driven apart by the loss;
- after each step every member moves a fraction ``strength`` of the way to its cluster's mean,
  ``w_i <- w_i + strength (mean_c(w) - w_i)``: the within-cluster differences shrink by
  ``(1 - strength)`` per step (and by weight decay), i.e. by ``(1 - strength)^steps`` over the run
  (``3e-3`` over 30 epochs of 390 steps: e^-35), while the net keeps its accuracy throughout.

What is evaluated and saved each epoch is the *projected* net (:func:`project`: every member set
to its cluster's mean, its BatchNorm's running statistics averaged too), exactly clustered and
mergeable. Early in a run the averaged statistics are only an estimate of the mean filter's (the
members still differ), so early points of the curve are approximate; by the end the members agree
to about ``(1 - strength)^steps`` and the projection changes almost nothing. The trained net never
collapses: it starts from the base weights, not from the centroids (epoch 0 of the recovery curve
is the configuration's clustered net with its recovery, for comparison with the other methods).
Needs ``fold_bn``, the euclidean metric and filter granularity (a cluster's filters and
BatchNorms become equal, which is what those clusters merge).
"""
from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn

from ..clustering import Clustering
from ..model import conv_layer

DEFAULT_STRENGTH = 3e-3
MIN_GAMMA = 1e-3


def _cluster_mean(x: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(Cout, ...) -> (Cout, ...): each row replaced by the mean of its cluster's rows."""
    k = counts.shape[0]
    sums = torch.zeros((k, *x.shape[1:]), dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    return (sums / counts.view(-1, *([1] * (x.dim() - 1))).to(x))[labels]


class CentripetalGroups:
    """The clustered parameters of a plain ResNet20: for each clustered layer, its conv weight
    (Cout, Cin, 3, 3) and its BatchNorm's weight and bias (Cout,), with the cluster labels (Cout,)
    and whether the layer merges (a block's first conv; the residual-stream writers do not need
    positive BatchNorm scales)."""

    def __init__(self, model: nn.Module, clustering: Clustering):
        self.groups = []
        for name, res in clustering.layers.items():
            labels = torch.as_tensor(res.labels, dtype=torch.long)
            device = model.get_submodule(name).weight.device
            labels = labels.to(device)
            counts = torch.bincount(labels).float().clamp_min(1)
            bn = model.get_submodule(conv_layer(name).bn)
            self.groups.append((name, labels, counts, [model.get_submodule(name).weight, bn.weight, bn.bias],
                                not conv_layer(name).residual))

    @torch.no_grad()
    def average_gradients(self) -> None:
        """Replace each member's gradient by its cluster's mean gradient."""
        for _, labels, counts, params, _ in self.groups:
            for p in params:
                if p.grad is not None:
                    p.grad.copy_(_cluster_mean(p.grad, labels, counts))

    @torch.no_grad()
    def pull(self, strength: float) -> None:
        """The centripetal step: each member moves ``strength`` of the way to its cluster's mean."""
        for _, labels, counts, params, merges in self.groups:
            for p in params:
                p.add_(_cluster_mean(p, labels, counts) - p, alpha=strength)
            if merges:  # a block's first conv merges only with positive BatchNorm scales (explorer.compress)
                params[1].clamp_(min=MIN_GAMMA)

    @torch.no_grad()
    def spread(self) -> float:
        """Largest distance of a member's filter from its cluster's mean filter, relative to the
        mean filter norm (0 = exactly clustered)."""
        worst = 0.0
        for _, labels, counts, params, _ in self.groups:
            w = params[0].reshape(params[0].shape[0], -1)
            mean = _cluster_mean(w, labels, counts)
            worst = max(worst, float((w - mean).norm(dim=1).max() / mean.norm(dim=1).mean().clamp_min(1e-12)))
        return worst


@torch.no_grad()
def project(model: nn.Module, groups: CentripetalGroups) -> nn.Module:
    """A CPU eval-mode copy of ``model`` with every clustered filter (Cout, Cin, 3, 3), BatchNorm
    scale, shift and running statistic (Cout,) set to its cluster's mean: exactly clustered, and
    mergeable where the clusters' BatchNorm scales are positive. The averaged running variance
    overstates the mean filter's while the members still differ (Jensen); C-SGD (Ding et al. 2019)
    ends with the members equal, where it is exact."""
    out = copy.deepcopy(model).float().cpu().eval()
    for name, labels, counts, _, _ in groups.groups:
        labels, counts = labels.cpu(), counts.cpu()
        conv, bn = out.get_submodule(name), out.get_submodule(conv_layer(name).bn)
        for t in (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var):
            t.copy_(_cluster_mean(t, labels, counts))
    return out


def projected_clustering(projected: nn.Module, clustering: Clustering) -> Clustering:
    """The Clustering describing a projected net (labels of ``clustering``, the projected filters as
    replacement weights), for :func:`explorer.compress.compress`. Valid for euclidean clusters
    (scales 1), the only ones centripetal fine-tuning takes."""
    layers = {n: replace(r, weight=projected.get_submodule(n).weight.detach().clone(), bias=None)
              for n, r in clustering.layers.items()}
    return replace(clustering, layers=layers)  # the clustered streams (labels) carry over
