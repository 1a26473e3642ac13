"""How many clusters each conv layer of a checkpoint can be given.

k-means cannot make more clusters than a layer has distinct points, and a fine-tuned checkpoint
keeps only the k distinct filters of each clustered layer (the shipped
``resnet20_cifar10_p58_kd_ft``: 9 of 16 in each stage-1 conv1, 19 of 32, 38 of 64). Such a layer
offers k = 1..distinct (k = distinct gives the same net) or k = its filter count (unchanged); a k
in between cannot be clustered. :func:`layer_limits` gives every layer's limit, for sliders and
forms, and :func:`check` turns a configuration that asks for more into one ClusteringError line
before any k-means runs.

The points are counted exactly as :func:`explorer.clustering.cluster_layer` clusters them: float64
:func:`explorer.clustering.layer_points` of the configuration's granularity and ``fold_bn``, unit
length for the cosine metric. The data space (``space="data"``) maps the points by an invertible
linear map, which keeps equal points equal and distinct points distinct, so its count is the
weight space's.

A clustered residual stream (``ClusteringConfig.stream``) is limited the same way by its distinct
channels: a channel's point is the concatenation of every writer's folded [filter, bias]
(:func:`explorer.clustering.stream_points`), so a fine-tuned stream-clustered checkpoint offers
k = 1..its distinct channels (:func:`stream_limits`). Its lower bound, from the option-A shortcut,
needs no model: :func:`explorer.clustering.stream_min_k`.
"""
from __future__ import annotations

import numpy as np
from torch import nn

from .clustering import ClusteringConfig, ClusteringError, layer_points, stream_points
from .digest import digest
from .lru import LRUCache
from .model import CONV_LAYERS, STREAM_STAGES, conv_layer, stream_width, stream_writers

_COUNTS = LRUCache(1024)


def distinct_points(model: nn.Module, layer: str, config: ClusteringConfig) -> int:
    """Number of distinct points k-means would cluster in conv ``layer`` of ``model`` (a ResNet20,
    not mutated) under ``config``'s granularity, ``fold_bn`` and metric: at most Cout filters, or
    Cout * Cin kernels with kernel granularity. Cached by the layer's weights and options.
    Raises KeyError for an unknown layer."""
    info = conv_layer(layer)
    conv, bn = model.get_submodule(layer), model.get_submodule(info.bn)
    fold = config.fold_bn and config.granularity == "filter"
    key = (digest(conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var), config.granularity, fold,
           config.metric)
    n = _COUNTS.get(key)
    if n is None:
        pts = layer_points(conv.weight, bn, config.granularity, fold)
        if config.metric == "cosine":
            pts = pts / np.maximum(np.linalg.norm(pts, axis=1), 1e-12)[:, None]
        n = int(len(np.unique(pts, axis=0)))
        _COUNTS.put(key, n)
    return n


def layer_limits(model: nn.Module, config: ClusteringConfig) -> dict[str, int]:
    """Every conv layer's largest k that can be clustered, at most its filter count (equal to it for
    a layer whose filters are all distinct), in forward order."""
    return {l.name: min(l.filters, distinct_points(model, l.name, config)) for l in CONV_LAYERS}


def distinct_stream_channels(model: nn.Module, stage: int) -> int:
    """Number of distinct channels of stage ``stage``'s residual stream in ``model``: distinct rows of
    the concatenated folded [filter, bias] points of all its writers, at most the stream's width.
    Cached by the writers' weights."""
    tensors = []
    for name in stream_writers(stage):
        conv, bn = model.get_submodule(name), model.get_submodule(conv_layer(name).bn)
        tensors += [conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var]
    key = ("stream", stage, digest(*tensors))
    n = _COUNTS.get(key)
    if n is None:
        n = int(len(np.unique(np.concatenate(stream_points(model, stage), 1), axis=0)))
        _COUNTS.put(key, n)
    return n


def stream_limits(model: nn.Module) -> dict[int, int]:
    """Every stage's largest stream k that can be clustered (1..3 -> at most its width)."""
    return {s: min(stream_width(s), distinct_stream_channels(model, s)) for s in STREAM_STAGES}


def problems(model: nn.Module, config: ClusteringConfig, layers=None) -> list[str]:
    """One phrase per clustered layer (of ``layers``, default all) whose k exceeds its distinct
    points, e.g. ``"layer1.0.conv1 holds 9 distinct filters (of 16), so k = 12 cannot be clustered;
    choose k <= 9, or 16 to leave it unchanged"``; [] when every k can be clustered."""
    out = []
    for name, k in config.active.items():
        if layers is not None and name not in layers:
            continue
        info = conv_layer(name)
        n = distinct_points(model, name, config)
        if k > n:
            what = "filters" if config.granularity == "filter" else "kernels"
            total = info.filters if config.granularity == "filter" else info.filters * info.filter_shape[0]
            out.append(f"{name} holds {n} distinct {what} (of {total}), so k = {k} cannot be clustered; "
                       f"choose k <= {n}, or {info.filters} to leave it unchanged")
    for stage, k in config.active_stream.items():
        if layers is not None and not set(stream_writers(stage)) & set(layers):
            continue
        n = distinct_stream_channels(model, stage)
        if k > n:
            w = stream_width(stage)
            out.append(f"the stage-{stage} residual stream holds {n} distinct channels (of {w}), so stream k = {k} "
                       f"cannot be clustered; choose k <= {n}, or {w} to leave it unchanged")
    return out


def check(model: nn.Module, config: ClusteringConfig, layers=None) -> ClusteringConfig:
    """Return ``config`` when every clustered layer's k (of ``layers``, default all) can be
    clustered on ``model``; raise ClusteringError naming each layer that cannot (:func:`problems`,
    joined in one line)."""
    found = problems(model, config, layers)
    if found:
        raise ClusteringError("; ".join(found) if len(found) == 1 else
                              f"{len(found)} layers ask for more clusters than they have distinct points: "
                              + "; ".join(found))
    return config


def tied_config(model: nn.Module) -> ClusteringConfig | None:
    """The configuration that clusters ``model`` exactly as its weights already are (a clustered,
    fine-tuned checkpoint holds duplicate filters and, with clustered residual streams, duplicate
    stream channels): every stage's stream k at its distinct channels where fewer than its width
    (its writers then keep their own k), every other conv at its distinct filters where fewer than
    its filter count. k-means then finds the duplicates themselves, so the compressed net is the
    one these weights hold (its real MACs and unique parameters) and its top-1 the checkpoint's.
    Euclidean filters in weight space and no recovery (a re-fit would change the fine-tuned
    weights); BN folded where the duplicates survive folding
    (always with a clustered stream, whose members are identical after BN), else raw filters. None
    when nothing is duplicated.

    Raises ClusteringError when the result does not validate (not expected for a ResNet20)."""
    from dataclasses import replace

    stream = {s: n for s, n in stream_limits(model).items() if n < stream_width(s)}
    writers = {w for s in stream for w in stream_writers(s)}

    def ties(fold):
        cfg = ClusteringConfig(fold_bn=fold)  # euclidean, filter granularity, weight space, no recovery
        return cfg, {name: n for name, n in layer_limits(model, cfg).items()
                     if n < conv_layer(name).filters and name not in writers}

    def score(t):  # more layers tied, then fewer distinct filters
        return len(t), -sum(t.values())

    # BN folded where the duplicates survive it (members then merge: no gather), else raw filters
    # (tied fine-tuning ties the filters, not their BatchNorm).
    cfg, ks = ties(True)
    if not stream:
        raw_cfg, raw = ties(False)
        if score(raw) > score(ks):
            cfg, ks = raw_cfg, raw
    if not ks and not stream:
        return None
    out = replace(cfg, ks=ks, stream=stream)
    out.validate()
    return out
