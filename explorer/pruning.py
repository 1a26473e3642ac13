"""Plain filter pruning of the blocks' first convs, the baseline that clustering is compared with,
with Torch-Pruning's importance criteria (Fang et al. 2023, "DepGraph"; the ``torch-pruning``
package): L1 norm (Li et al. 2017, "Pruning Filters for Efficient ConvNets"), FPGM (He et al.
2019, "Filter Pruning via Geometric Median"), first-order Taylor (Molchanov et al. 2019,
"Importance Estimation for Neural Network Pruning") and random.

Only the blocks' first convs are pruned: their channels feed nothing but the block's second conv.
The stem and the second convs write the residual stream, whose option-A shortcut (strided identity
plus zero-padded channels) Torch-Pruning's dependency graph cannot trace: it treats the pad as an
element-wise op and mis-maps channels (VainF/Torch-Pruning#64).

Pruning a block's first conv to k filters removes as many of its output channels as merging its
clusters does (``fold_bn`` with k clusters), and the second conv reads k channels either way: the
two nets have the same MACs (:func:`pruned_structure` builds the physically pruned net and counts
them). The pruned net is represented as a ResNet20 with the removed channels *masked* (filter,
BatchNorm scale and shift zero, so the channel is exactly 0 after its ReLU): the same function,
evaluated by the same engine, recovered by the same least squares (which keeps masked channels
masked) - so that only the choice of channels differs between the methods.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .model import conv_layer

CRITERIA = ("l1", "fpgm", "taylor", "random")
TAYLOR_IMAGES = 512


class PruningError(ValueError):
    """A layer that cannot be pruned here, or a bad k or criterion; the message says what to use."""


def check(ks: dict[str, int], criterion: str) -> None:
    """Raise PruningError unless every layer of ``ks`` is a block's first conv with k in
    1..filters and ``criterion`` is one of :data:`CRITERIA`."""
    if criterion not in CRITERIA:
        raise PruningError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    for name, k in ks.items():
        layer = conv_layer(name)
        if layer.residual:
            raise PruningError(f"{name} writes the residual stream (option-A shortcut); only the blocks' first convs "
                               f"(layer*.*.conv1) are pruned")
        if not 1 <= k <= layer.filters:
            raise PruningError(f"{name}: k = {k} is outside 1..{layer.filters}")


def _importance(criterion: str, seed: int):
    import torch_pruning as tp

    # L1 and FPGM score the conv's own filters, as their papers define them ("first": the group's
    # root layer); Taylor sums the first-order terms of every parameter the channel owns (conv
    # filter, BN affine, the second conv's input kernels), Molchanov et al.'s group criterion.
    if criterion == "l1":
        return tp.importance.MagnitudeImportance(p=1, group_reduction="first")
    if criterion == "fpgm":
        return tp.importance.FPGMImportance(group_reduction="first")
    if criterion == "taylor":
        return tp.importance.TaylorImportance()
    torch.manual_seed(seed)  # RandomImportance draws from torch's global generator
    return tp.importance.RandomImportance()


def channel_scores(model: nn.Module, ks: dict[str, int], criterion: str, train_images: torch.Tensor | None = None,
                   train_labels: torch.Tensor | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Importance of every output channel of each layer in ``ks``: {layer: (Cout,) float64}, higher =
    kept first. Torch-Pruning's group importance over the layer's dependency group (conv1 ->
    bn1 -> ReLU -> conv2 input). ``taylor`` needs uint8 training images and labels: the gradient of
    the cross-entropy over the first 512 images of :func:`explorer.clustering.training_permutation`
    (never the test split). ``model`` is not changed. Raises PruningError."""
    import torch_pruning as tp

    from .clustering import training_permutation
    from .data import normalize

    check(ks, criterion)
    work = _traceable(model)
    if criterion == "taylor":
        if train_images is None or train_labels is None:
            raise PruningError("the taylor criterion needs the training images and labels (gradients)")
        idx = training_permutation(len(train_images))[:TAYLOR_IMAGES]
        work.zero_grad()
        for i in range(0, len(idx), 128):
            b = idx[i : i + 128]
            F.cross_entropy(work(normalize(train_images[b])), train_labels[b], reduction="sum").backward()
    dg = tp.DependencyGraph().build_dependency(work, example_inputs=torch.zeros(1, 3, 32, 32))
    imp = _importance(criterion, seed)
    modules = dict(work.named_modules())
    out = {}
    for name in ks:
        conv = modules[name]
        group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(conv.out_channels)))
        out[name] = imp(group).detach().double().numpy()
    return out


def _traceable(model: nn.Module) -> nn.Module:
    """A copy whose parameters require gradients: the dependency graph is traced through autograd
    (the Explorer's base model has them switched off)."""
    work = copy.deepcopy(model).eval()
    for p in work.parameters():
        p.requires_grad_(True)
    return work


def prune(model: nn.Module, ks: dict[str, int], criterion: str, train_images: torch.Tensor | None = None,
          train_labels: torch.Tensor | None = None, seed: int = 0) -> tuple[nn.Module, dict[str, np.ndarray]]:
    """A copy of ``model`` with each layer in ``ks`` pruned to its k most important filters by
    ``criterion`` (the others masked: filter, BN scale and shift zero). Returns (masked model, kept
    channel indices per layer, sorted). ``model`` is not mutated. Raises PruningError."""
    scores = channel_scores(model, ks, criterion, train_images, train_labels, seed)
    new = copy.deepcopy(model).eval()
    modules = dict(new.named_modules())
    kept = {}
    for name, k in ks.items():
        _mask(modules, name, k, scores[name], kept)
    return new, kept


@torch.no_grad()
def _mask(modules, name, k, score, kept) -> None:
    """Keep the k highest-scoring channels of ``name`` (ties: the lower index), zero the others."""
    order = np.argsort(-score, kind="stable")
    keep = np.sort(order[:k])
    dead = torch.as_tensor(np.setdiff1d(np.arange(len(order)), keep), dtype=torch.long)
    bn = modules[conv_layer(name).bn]
    modules[name].weight[dead] = 0.0
    bn.weight[dead] = 0.0
    bn.bias[dead] = 0.0
    kept[name] = keep


def pruned_structure(model: nn.Module, kept: dict[str, np.ndarray]) -> nn.Module:
    """The physically pruned net (Torch-Pruning removes the masked channels of each layer in
    ``kept`` and the matching inputs of the block's second conv): what the masked net stands for,
    to count its MACs and parameters. ``model`` is not mutated."""
    import torch_pruning as tp

    work = _traceable(model)
    dg = tp.DependencyGraph().build_dependency(work, example_inputs=torch.zeros(1, 3, 32, 32))
    modules = dict(work.named_modules())
    for name, keep in kept.items():
        conv = modules[name]
        drop = sorted(set(range(conv.out_channels)) - set(int(i) for i in keep))
        if drop:
            dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=drop).prune()
    return work


def recover(model: nn.Module, masked: nn.Module, ks: dict[str, int], recovery: str,
            train_images: torch.Tensor) -> nn.Module:
    """A copy of the masked pruned net after ``recovery``: "none", "bn" (BatchNorm re-estimated on
    2,000 training images) or "lsq" (:func:`explorer.recovery.lsq_recover` from the first pruned
    layer on, against the unpruned ``model``; masked channels stay masked). Every fit reads uint8
    training images only (:func:`explorer.clustering.calibration_subset`), never the test split."""
    from .clustering import Clustering, ClusteringConfig, calibration_subset, recalibrate_bn, training_reference
    from .model import CONV_LAYER_NAMES
    from .recovery import lsq_recover

    net = copy.deepcopy(masked)
    if recovery == "bn":
        recalibrate_bn(net, calibration_subset(train_images, 2000))
    elif recovery == "lsq":
        cfg = ClusteringConfig(recovery="lsq")
        ref = training_reference(model, cfg, train_images)
        lsq_recover(net, Clustering(cfg, {}), ref, start=min(CONV_LAYER_NAMES.index(n) for n in ks))
    elif recovery != "none":
        raise PruningError(f"recovery must be none, bn or lsq, got {recovery!r}")
    return net
