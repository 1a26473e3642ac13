"""Filter-level pruning by clustering: k-means over each conv layer's filters, every filter
replaced by its cluster centroid (Son et al. 2018, "Clustering Convolutional Kernels to Compress
Deep Neural Networks"; k-means++ from scikit-learn, Arthur & Vassilvitskii 2007).

Flow: ``ClusteringConfig`` (which layers, which k, options) -> :func:`cluster_model` (k-means per
layer, cached) -> :func:`apply` (a new model with centroid filters; optional BatchNorm
re-estimation) -> :mod:`explorer.evaluate` / :mod:`explorer.compress`.

Options:

- ``metric="euclidean"``: k-means on the raw filters. ``"cosine"``: k-means on L2-normalised
  filters (spherical k-means, Dhillon & Modha 2001); each filter keeps its own norm, so a cluster
  shares one direction and the per-filter scale lives in the following BatchNorm.
- ``granularity="filter"``: one point per output filter (Cin*kh*kw values). ``"kernel"``: one point
  per 2D kernel (kh*kw values), as in the first write-up of this idea; no structural savings.
- ``fold_bn``: fold the following BatchNorm into each filter first (weights scaled by
  gamma/sqrt(var+eps), plus a bias) and cluster [folded filter, bias]; clustered channels are then
  identical after ReLU, which lets :mod:`explorer.compress` merge them.
- ``space="weight"``: k-means on the filters as they are. ``"data"``: k-means in the metric of the
  layer's own output error, ``(w - c)^T Sigma (w - c)`` with Sigma the second moment of the layer's
  input patches on training images (:mod:`explorer.recovery`); the centroid stays the members' mean.
- ``recovery``: what repairs the net after the filters are replaced, without a gradient step.
  ``"none"``; ``"bn"``: re-estimate every BatchNorm's running statistics on ``recalibrate_bn``
  training images (Li et al. 2017, "Revisiting Batch Normalization for Practical Domain
  Adaptation"); ``"lsq"``: least-squares reconstruction of the original net's outputs, layer by
  layer (He et al. 2017; :func:`explorer.recovery.lsq_recover`), on ``recalibrate_bn`` images.
- ``seeds=S``: run k-means with seeds ``seed .. seed+S-1`` and keep the net with the best top-1 on
  held-out *training* images (never the test split).
- ``stream={stage: k}``: coupled clustering of a stage's residual-stream *channels* (issue 14).
  Every conv that writes the stream of stage s (:func:`explorer.model.stream_writers`: the stem
  and the blocks' second convs) shares ONE assignment of the stream's channels to k clusters, and
  each writer's filters of a cluster are replaced by the mean of that writer's folded filters, so
  every channel of a cluster carries identical values after BatchNorm and the residual add, and
  :func:`explorer.compress.compress` narrows the stream itself to k channels. Needs ``fold_bn``,
  filter granularity and the euclidean metric; a writer of a clustered stream cannot also have a
  per-layer k. The option-A shortcut (He et al. 2016) constrains stages 2 and 3 (see
  :func:`cluster_stream`), so there k must exceed the previous stage's cluster count.

All training images used here come from one fixed permutation of the training split: statistics,
re-fits and BN re-estimation use its first images, the seed choice its last 2,000.
"""
from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, field, replace
from typing import Mapping

import numpy as np
import torch
from torch import nn

from .digest import digest
from .lru import LRUCache
from .urlquery import last_value
from .model import (CONV_LAYER_NAMES, STREAM_STAGES, conv_layer, shortcut_source, stream_stage_of, stream_width,
                    stream_writers)

METRICS = ("euclidean", "cosine")
GRANULARITIES = ("filter", "kernel")
SPACES = ("weight", "data")
RECOVERIES = ("none", "bn", "lsq")
HOLDOUT_IMAGES = 2_000  # the last images of the fixed training permutation: seed choice only
MAX_RECALIBRATION_IMAGES = 48_000  # the rest of the training split
DEFAULT_CALIBRATION = {"bn": 2000, "lsq": 512}  # images; lsq's cost grows with them, its accuracy barely
MAX_SEEDS = 10
MAX_SEED = 2**31 - 1  # KMeans rejects seeds outside 0..2**32-1; URLs clamp to this range
MAX_N_INIT = 20  # URLs clamp to this range too, so that every valid config survives a URL roundtrip


class ClusteringError(ValueError):
    """A configuration that cannot be applied: the message names the layer and the valid range."""


@dataclass(frozen=True)
class ClusteringConfig:
    """Per-layer cluster counts and options. JSON- and URL-serialisable.

    ks: layer name -> k. A layer that is absent, or whose k equals its filter count, is left as is.
    metric: "euclidean" | "cosine"; granularity: "filter" | "kernel"; fold_bn: cluster BN-folded
    filters; space: "weight" | "data" (output-error metric); recovery: "none" | "bn" | "lsq";
    recalibrate_bn: training images used by the recovery (0 with recovery "none"; a legacy
    ``recalibrate_bn=N`` without a recovery means "bn"); seed, n_init: k-means; seeds: best of that
    many k-means seeds by held-out training accuracy; stream: stage (1..3) -> k, the coupled
    clustering of that stage's residual-stream channels (a stage that is absent, or whose k equals
    its width, is left as is).
    """

    ks: Mapping[str, int] = field(default_factory=dict)
    metric: str = "euclidean"
    granularity: str = "filter"
    fold_bn: bool = False
    recalibrate_bn: int = 0
    seed: int = 0
    n_init: int = 3
    space: str = "weight"
    recovery: str = "none"
    seeds: int = 1
    stream: Mapping[int, int] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "ks", dict(sorted(self.ks.items(), key=lambda kv: _layer_order(kv[0]))))
        object.__setattr__(self, "stream", dict(sorted(self.stream.items(), key=lambda kv: repr(kv[0]))))
        # One meaning per pair: recalibration images imply a recovery, a recovery has images.
        if self.recovery == "none" and isinstance(self.recalibrate_bn, int) and self.recalibrate_bn > 0:
            object.__setattr__(self, "recovery", "bn")
        elif self.recovery in DEFAULT_CALIBRATION and self.recalibrate_bn == 0:
            object.__setattr__(self, "recalibrate_bn", DEFAULT_CALIBRATION[self.recovery])

    # ------------------------------------------------------------ validation
    def validate(self) -> "ClusteringConfig":
        """Return self. Raises ClusteringError for an unknown layer, k < 1, k > filter count, or a
        bad option."""
        for name, k in self.ks.items():
            if name not in CONV_LAYER_NAMES:
                raise ClusteringError(f"unknown conv layer {name!r}; valid names: {', '.join(CONV_LAYER_NAMES)}")
            n = conv_layer(name).filters
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
                raise ClusteringError(f"{name}: k must be an integer, got {k!r}")
            if k < 1:
                raise ClusteringError(f"{name}: k = {k} < 1; choose k in 1..{n}")
            if k > n:
                raise ClusteringError(f"{name}: k = {k} exceeds its {n} filters; choose k in 1..{n}")
        if self.metric not in METRICS:
            raise ClusteringError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.granularity not in GRANULARITIES:
            raise ClusteringError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if not 0 <= self.recalibrate_bn <= MAX_RECALIBRATION_IMAGES:
            raise ClusteringError(f"recalibrate_bn must be in 0..{MAX_RECALIBRATION_IMAGES} images")
        if not 0 <= self.seed <= MAX_SEED:
            raise ClusteringError(f"seed must be in 0..{MAX_SEED}, got {self.seed}")
        if not 1 <= self.n_init <= MAX_N_INIT:
            raise ClusteringError(f"n_init must be in 1..{MAX_N_INIT}, got {self.n_init}")
        if self.space not in SPACES:
            raise ClusteringError(f"space must be one of {SPACES}, got {self.space!r}")
        if self.recovery not in RECOVERIES:
            raise ClusteringError(f"recovery must be one of {RECOVERIES}, got {self.recovery!r}")
        if self.granularity == "kernel" and (self.space == "data" or self.recovery == "lsq"):
            raise ClusteringError("space=data and recovery=lsq need granularity=filter (a kernel codebook "
                                  "ties parts of filters); choose granularity=filter, or space=weight with "
                                  "recovery none or bn")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or not 1 <= self.seeds <= MAX_SEEDS:
            raise ClusteringError(f"seeds must be in 1..{MAX_SEEDS}, got {self.seeds!r}")
        if not 0 <= self.seed + self.seeds - 1 <= MAX_SEED:
            raise ClusteringError(f"seed + seeds - 1 must be at most {MAX_SEED}")
        self._validate_stream()
        return self

    def _validate_stream(self) -> None:
        for stage, k in self.stream.items():
            if isinstance(stage, bool) or stage not in STREAM_STAGES:
                raise ClusteringError(f"unknown residual-stream stage {stage!r}; valid stages: 1, 2, 3")
            w = stream_width(stage)
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
                raise ClusteringError(f"stream stage {stage}: k must be an integer, got {k!r}")
            if not 1 <= k <= w:
                raise ClusteringError(f"stream stage {stage}: k = {k} is outside 1..{w} (its {w} channels)")
        active = self.active_stream
        if not active:
            return
        stages = ", ".join(f"stage {s}" for s in active)
        if not self.fold_bn:
            raise ClusteringError(f"stream clustering ({stages}) needs fold_bn: stream channels are merged only when "
                                  "they are identical after BatchNorm and the residual add; add fold_bn")
        if self.granularity != "filter":
            raise ClusteringError(f"stream clustering ({stages}) needs granularity=filter")
        if self.metric != "euclidean":
            raise ClusteringError(f"stream clustering ({stages}) needs metric=euclidean: the cosine metric keeps each "
                                  "filter's norm, so the channels of a cluster would differ")
        for stage in active:
            lo = stream_min_k(stage, self.stream)
            if self.stream[stage] < lo:
                prev = f"{lo - 1} clusters" if stage - 1 in active else f"{lo - 1} (unclustered) channels"
                raise ClusteringError(
                    f"stream stage {stage}: k = {self.stream[stage]} is below {lo}; the option-A shortcut copies the "
                    f"{prev} of stage {stage - 1} into it and zero-pads the rest, which can share a cluster only with "
                    f"each other, so choose k in {lo}..{stream_width(stage)}")
            both = [n for n in stream_writers(stage) if n in self.active]
            if both:
                raise ClusteringError(
                    f"{', '.join(both)} write{'s' if len(both) == 1 else ''} the stage-{stage} residual stream, which "
                    f"stream k = {self.stream[stage]} clusters; remove the per-layer k of "
                    f"{'that layer' if len(both) == 1 else 'those layers'} or the stream k")

    @property
    def active_stream(self) -> dict[int, int]:
        """Stages whose residual stream is clustered (k below its width), in forward order."""
        return {s: k for s, k in sorted(self.stream.items()) if s in STREAM_STAGES and k < stream_width(s)}

    @property
    def clustered(self) -> bool:
        """Whether anything is clustered: a layer (:attr:`active`) or a residual stream."""
        return bool(self.active or self.active_stream)

    def with_stream(self, stage: int, k: int) -> "ClusteringConfig":
        """A copy with stage ``stage``'s stream at ``k`` (k = its width removes the entry)."""
        stream = dict(self.stream)
        if k >= stream_width(stage):
            stream.pop(stage, None)
        else:
            stream[stage] = int(k)
        return replace(self, stream=stream)

    @property
    def active(self) -> dict[str, int]:
        """Layers that are actually clustered (k below the filter count), in forward order."""
        return {n: k for n, k in self.ks.items() if k < conv_layer(n).filters}

    def with_k(self, layer: str, k: int) -> "ClusteringConfig":
        """A copy with ``layer`` set to ``k`` (k = filter count removes the entry)."""
        ks = dict(self.ks)
        if k >= conv_layer(layer).filters:
            ks.pop(layer, None)
        else:
            ks[layer] = int(k)
        return replace(self, ks=ks)

    @classmethod
    def uniform(cls, k: int, **options) -> "ClusteringConfig":
        """Every conv layer at min(k, its filter count) - the first write-up used k = 3."""
        return cls(ks={n: min(k, conv_layer(n).filters) for n in CONV_LAYER_NAMES}, **options)

    # ------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        """JSON-ready. The options added later (space, recovery lsq, seeds) appear only when they
        differ from what an older file meant without them, so keys of shipped result files stay
        valid (``recalibrate_bn`` > 0 alone means recovery "bn")."""
        d = {"ks": self.active, "metric": self.metric, "granularity": self.granularity,
             "fold_bn": self.fold_bn, "recalibrate_bn": self.recalibrate_bn, "seed": self.seed,
             "n_init": self.n_init}
        if self.space != "weight":
            d["space"] = self.space
        if self.recovery == "lsq":
            d["recovery"] = self.recovery
        if self.seeds != 1:
            d["seeds"] = self.seeds
        if self.active_stream:
            d["stream"] = {str(s): k for s, k in self.active_stream.items()}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def key(self) -> str:
        """Canonical string: equal for configurations that give the same model."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: Mapping) -> "ClusteringConfig":
        """Strict: raises ClusteringError on unknown fields or invalid values."""
        if not isinstance(d, Mapping):
            raise ClusteringError("a clustering configuration must be a JSON object")
        unknown = set(d) - {"ks", *OPTION_FIELDS}
        if unknown:
            raise ClusteringError(f"unknown configuration fields: {', '.join(sorted(unknown))}")
        ks = d.get("ks", {})
        if not isinstance(ks, Mapping):
            raise ClusteringError("ks must map layer names to integers")
        opts = {k: d[k] for k in OPTION_FIELDS if k in d}
        choices = {"metric": METRICS, "granularity": GRANULARITIES, "space": SPACES, "recovery": RECOVERIES}
        for name, allowed in choices.items():
            if name in opts and not isinstance(opts[name], str):  # a list would not even hash
                raise ClusteringError(f"{name} must be one of {allowed}, got {opts[name]!r}")
        for name in ("recalibrate_bn", "seed", "n_init", "seeds"):
            if name in opts and (isinstance(opts[name], bool) or not isinstance(opts[name], int)):
                raise ClusteringError(f"{name} must be an integer")
        if "fold_bn" in opts and not isinstance(opts["fold_bn"], bool):
            raise ClusteringError("fold_bn must be true or false")
        if "stream" in opts:
            raw = opts["stream"]
            if not isinstance(raw, Mapping):
                raise ClusteringError('stream must map stages to integers, e.g. {"1": 8}')
            stream = {}
            for s, k in raw.items():
                try:
                    stage = int(s)
                except (TypeError, ValueError):
                    raise ClusteringError(f"unknown residual-stream stage {s!r}; valid stages: 1, 2, 3") from None
                stream[stage] = k
            opts["stream"] = stream
        return cls(ks=dict(ks), **opts).validate()

    @classmethod
    def from_json(cls, text: str) -> "ClusteringConfig":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ClusteringError(f"not valid JSON: {e}") from None

    def to_query(self) -> dict[str, str]:
        """URL query parameters, readable when shared: ``metric=cosine&k.layer3.2.conv2=16``.
        Options at their defaults are left out."""
        q: dict[str, str] = {}
        default = ClusteringConfig()
        for name in ("metric", "granularity", "space", "seed", "n_init", "seeds"):
            if getattr(self, name) != getattr(default, name):
                q[name] = str(getattr(self, name))
        # BN re-estimation keeps its older, shared form: recalibrate_bn=N alone means recovery=bn.
        if self.recovery == "lsq":
            q["recovery"] = "lsq"
        if self.recovery == "bn" or self.recalibrate_bn != DEFAULT_CALIBRATION.get(self.recovery, 0):
            q["recalibrate_bn"] = str(self.recalibrate_bn)
        if self.fold_bn:
            q["fold_bn"] = "1"
        for n, k in self.active.items():
            q[f"k.{n}"] = str(k)
        for s, k in self.active_stream.items():
            q[f"{STREAM_KEY}{s}"] = str(k)
        return q

    @classmethod
    def from_query(cls, params: Mapping[str, object]) -> tuple["ClusteringConfig", list[str]]:
        """Parse URL query parameters leniently: returns (config, warnings). Never raises; bad values
        are clamped into range or dropped with a warning, so the result is always valid. Values may be
        strings or lists of strings (repeated keys: the last wins). Keys that are not clustering
        options are ignored silently (other parts of the page own them)."""
        warns: list[str] = []
        d = cls()

        def last(v) -> str:
            return last_value(v, limit=100)

        def as_int(name, lo, hi, default):
            if name not in params:
                return default
            raw = last(params[name])
            try:
                v = int(raw.strip())
            except ValueError:
                warns.append(f"{name}={raw[:30]!r} is not an integer; using {default}")
                return default
            if not lo <= v <= hi:
                c = min(max(v, lo), hi)
                warns.append(f"{name}={v} is outside {lo}..{hi}; using {c}")
                return c
            return v

        def as_choice(name, choices, default):
            if name not in params:
                return default
            raw = last(params[name]).strip().lower()
            if raw not in choices:
                warns.append(f"{name}={raw[:30]!r} is not one of {', '.join(choices)}; using {default}")
                return default
            return raw

        metric = as_choice("metric", METRICS, d.metric)
        granularity = as_choice("granularity", GRANULARITIES, d.granularity)
        space = as_choice("space", SPACES, d.space)
        recovery = as_choice("recovery", RECOVERIES, d.recovery)
        fold = as_choice("fold_bn", ("0", "1", "true", "false"), "0") in ("1", "true")
        recal = as_int("recalibrate_bn", 0, MAX_RECALIBRATION_IMAGES, d.recalibrate_bn)
        seeds = as_int("seeds", 1, MAX_SEEDS, d.seeds)
        seed = as_int("seed", 0, MAX_SEED - seeds + 1, d.seed)
        n_init = as_int("n_init", 1, MAX_N_INIT, d.n_init)
        if granularity == "kernel" and (space == "data" or recovery == "lsq"):
            warns.append("space=data and recovery=lsq need granularity=filter; using space=weight, recovery=bn")
            space, recovery = "weight", ("bn" if recovery == "lsq" else recovery)
        if recovery == "none" and "recovery" in params and recal > 0:
            recal = 0  # an explicit "no recovery" wins over a stale image count
        ks = {}
        for key in params:
            if not isinstance(key, str) or not key.startswith("k."):
                continue
            name = key[2:]
            if name not in CONV_LAYER_NAMES:
                warns.append(f"unknown layer {name[:40]!r} in the URL; ignored")
                continue
            n = conv_layer(name).filters
            k = as_int(key, 1, n, n)
            if k < n:
                ks[name] = k
        stream: dict[int, int] = {}
        for key in params:
            if isinstance(key, str) and key.startswith(STREAM_KEY) and key[len(STREAM_KEY):] not in ("1", "2", "3"):
                warns.append(f"unknown residual-stream stage {key[:40]!r} in the URL (stages: s.1, s.2, s.3); ignored")
        for stage in STREAM_STAGES:  # in order: a stage's lower bound depends on the one before
            key, w = f"{STREAM_KEY}{stage}", stream_width(stage)
            if key not in params:
                continue
            k = as_int(key, 1, w, w)
            lo = stream_min_k(stage, stream)
            if k < lo:
                warns.append(f"{key}={k} is below {lo} (the option-A shortcut of stage {stage}); using {lo}")
                k = lo
            if k < w:
                stream[stage] = k
        if stream:
            if granularity != "filter":
                warns.append("stream clustering needs granularity=filter; the s.<stage> values are ignored")
                stream = {}
            else:
                if metric != "euclidean":
                    warns.append("stream clustering needs metric=euclidean; using metric=euclidean")
                    metric = "euclidean"
                if not fold:
                    warns.append("stream clustering needs fold_bn; using fold_bn=1")
                    fold = True
                for stage in stream:
                    for name in stream_writers(stage):
                        if name in ks:
                            warns.append(f"k.{name} is ignored: it writes the stage-{stage} residual stream, which "
                                         f"s.{stage} clusters")
                            del ks[name]
        cfg = cls(ks=ks, metric=metric, granularity=granularity, fold_bn=fold, recalibrate_bn=recal,
                  seed=seed, n_init=n_init, space=space, recovery=recovery, seeds=seeds, stream=stream)
        return cfg, warns


STREAM_KEY = "s."  # URL parameter prefix of a stage's stream k: s.1, s.2, s.3


def stream_min_k(stage: int, stream: Mapping[int, int]) -> int:
    """Smallest k that stage ``stage``'s stream can be clustered to, given the stream ks of the stages
    before it: 1 for stage 1; for stages 2 and 3, one more than the previous stage's cluster count
    (its width when it is not clustered), because the option-A shortcut copies every cluster of the
    previous stage into its own group of channels and the zero-padded channels form another."""
    if stage == 1:
        return 1
    prev = stream.get(stage - 1, stream_width(stage - 1))
    prev = prev if isinstance(prev, (int, np.integer)) and 1 <= prev < stream_width(stage - 1) else stream_width(stage - 1)
    return int(prev) + 1


OPTION_FIELDS = ("metric", "granularity", "fold_bn", "recalibrate_bn", "seed", "n_init", "space", "recovery", "seeds",
                 "stream")


def _layer_order(name: str) -> int:
    try:
        return CONV_LAYER_NAMES.index(name)
    except ValueError:
        return len(CONV_LAYER_NAMES)


# ---------------------------------------------------------------- per-layer k-means

@dataclass(frozen=True)
class LayerClustering:
    """k-means result for one conv layer.

    labels: (P,) int64 cluster of each point (P = Cout filters, or Cout*Cin kernels);
    centroids: (k, D) float32 in the space k-means ran in (D = Cin*kh*kw [+1 bias with fold_bn], or
    kh*kw for kernels; unit-norm directions for cosine); inertia: within-cluster sum of squared
    distances (in that space); points: (P, D) the clustered points, for plots;
    weight: (Cout, Cin, kh, kw) the replacement filters; bias: (Cout,) with fold_bn, else None;
    scales: (Cout,) per-filter norm that multiplies the shared direction (1 for euclidean).
    """

    name: str
    k: int
    labels: np.ndarray
    centroids: np.ndarray
    inertia: float
    points: np.ndarray
    weight: torch.Tensor
    bias: torch.Tensor | None
    scales: torch.Tensor


@dataclass(frozen=True)
class Clustering:
    """The configuration and the per-layer results of :func:`cluster_model`."""

    config: ClusteringConfig
    layers: dict[str, LayerClustering]
    chosen_seed: int | None = None  # with seeds > 1: the k-means seed whose net was kept
    holdout_top1: dict[int, float] | None = None  # with seeds > 1: held-out training top-1 per seed
    stream: dict[int, "StreamClustering"] = field(default_factory=dict)  # clustered residual streams by stage


@dataclass(frozen=True)
class StreamClustering:
    """The coupled clustering of one stage's residual-stream channels (:func:`cluster_stream`).

    stage: 1..3; k: clusters; labels: (W,) int64 cluster of each stream channel (W = 16, 32, 64);
    groups: (W,) int64 the shortcut group of each channel: -1 for the channels the option-A shortcut
    zero-pads, else the previous stage's cluster (its channel when that stage is not clustered)
    that the shortcut copies in; all 0 for stage 1. A cluster never spans two groups.
    inertia: within-cluster sum of squared distances over all writers, in the space clustered.
    writers: the convs that write the stream (:func:`explorer.model.stream_writers`); each has its
    :class:`LayerClustering` with these labels in :attr:`Clustering.layers`.
    """

    stage: int
    k: int
    labels: np.ndarray
    groups: np.ndarray
    inertia: float
    writers: tuple[str, ...]


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as a per-channel affine y = a * x + b; returns (a, b), each (C,)."""
    a = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    b = bn.bias.detach() - a * bn.running_mean
    return a, b


def layer_points(weight: torch.Tensor, bn: nn.BatchNorm2d | None, granularity: str, fold_bn: bool) -> np.ndarray:
    """The points k-means clusters for one conv layer, float64 (P, D).

    weight: (Cout, Cin, kh, kw). filter granularity: P = Cout, D = Cin*kh*kw (+1 bias column when
    ``fold_bn``, with the BN affine folded into the filter). kernel granularity: P = Cout*Cin,
    D = kh*kw (fold_bn is ignored, since a kernel has no BN of its own).
    """
    w = weight.detach().double()
    if granularity == "kernel":
        return w.reshape(-1, w.shape[2] * w.shape[3]).numpy()
    if fold_bn:
        a, b = bn_affine(bn)
        w = w * a.double().view(-1, 1, 1, 1)
        return torch.cat([w.reshape(w.shape[0], -1), b.double().view(-1, 1)], 1).numpy()
    return w.reshape(w.shape[0], -1).numpy()


def kmeans(points: np.ndarray, k: int, seed: int = 0, n_init: int = 3) -> tuple[np.ndarray, np.ndarray, float]:
    """scikit-learn KMeans (k-means++ init, Lloyd) on points (P, D): returns labels (P,),
    centroids (k, D) and inertia. Deterministic for a seed.

    Raises ClusteringError when there are fewer distinct points than k.
    """
    from sklearn.cluster import KMeans

    distinct = len(np.unique(points, axis=0))
    if distinct < k:
        raise ClusteringError(f"only {distinct} distinct points for k = {k}; choose k <= {distinct}")
    if k == len(points):
        return np.arange(len(points)), points.copy(), 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on near-duplicate points is harmless here
        km = KMeans(n_clusters=k, init="k-means++", n_init=n_init, random_state=seed).fit(points)
    return km.labels_.astype(np.int64), km.cluster_centers_, float(km.inertia_)


def cluster_layer(name: str, weight: torch.Tensor, bn: nn.BatchNorm2d | None, k: int,
                  config: ClusteringConfig, sigma: np.ndarray | None = None) -> LayerClustering:
    """Cluster one conv layer's filters (or kernels) into k clusters and build its replacement.

    weight: (Cout, Cin, kh, kw). ``sigma``: with ``config.space == "data"``, the second moment of
    the layer's input patches, (D, D) for D = Cin*kh*kw, or (D+1, D+1) with ``fold_bn`` (the last
    row and column for the constant input of the bias): k-means then runs on the points ``w @ L``
    (``Sigma = L L^T``), whose squared distances are the layer's mean squared output error, and a
    cluster's replacement filter is the mean of its members (cosine: the mean direction in that
    space, each member keeping its own length there). Returns a :class:`LayerClustering`.

    Raises ClusteringError for k out of 1..Cout, fewer distinct points than k, or a missing or
    wrongly shaped ``sigma`` in the data space.
    """
    cout = weight.shape[0]
    if not 1 <= k <= cout:
        raise ClusteringError(f"{name}: k = {k} is outside 1..{cout}")
    pts = layer_points(weight, bn, config.granularity, config.fold_bn and config.granularity == "filter")
    if config.space == "data":
        return _cluster_data_space(name, weight, pts, k, config, sigma)
    norms = np.linalg.norm(pts, axis=1)
    space = pts
    if config.metric == "cosine":
        space = pts / np.maximum(norms, 1e-12)[:, None]
    try:
        labels, centroids, inertia = kmeans(space, k, config.seed, config.n_init)
    except ClusteringError as e:
        raise ClusteringError(f"{name}: {e}") from None
    if config.metric == "cosine":
        units = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
        centroids = units
        replaced = units[labels] * norms[:, None]
        scales = norms
    else:
        replaced = centroids[labels]
        scales = np.ones(len(pts))
    return _layer_result(name, k, weight, config, labels, centroids, inertia, pts, replaced, scales)


def _layer_result(name, k, weight, config, labels, centroids, inertia, points, replaced, scales) -> LayerClustering:
    shape, cout = weight.shape, weight.shape[0]
    bias = None
    if config.granularity == "kernel":
        new_w = torch.from_numpy(np.ascontiguousarray(replaced)).view(shape)
        scales = np.ones(cout)
    elif config.fold_bn:
        new_w = torch.from_numpy(np.ascontiguousarray(replaced[:, :-1])).view(shape)
        bias = torch.from_numpy(np.ascontiguousarray(replaced[:, -1])).float()
    else:
        new_w = torch.from_numpy(np.ascontiguousarray(replaced)).view(shape)
    return LayerClustering(name, k, labels, np.asarray(centroids, dtype=np.float32), inertia,
                           np.asarray(points, dtype=np.float32), new_w.float().contiguous(), bias,
                           torch.from_numpy(np.asarray(scales, dtype=np.float64)).float())


def _cluster_data_space(name, weight, pts, k, config, sigma) -> LayerClustering:
    from .recovery import whitening

    if sigma is None or sigma.shape != (pts.shape[1], pts.shape[1]):
        got = "none" if sigma is None else f"{sigma.shape}"
        raise ClusteringError(f"{name}: space=data needs the second moment of the layer's input patches, "
                              f"({pts.shape[1]}, {pts.shape[1]}); got {got}")
    L = whitening(sigma)
    z = pts @ L  # rows z_i = (L^T w_i)^T: ||z_i - z_j||^2 = (w_i - w_j)^T Sigma (w_i - w_j)
    lengths = np.linalg.norm(z, axis=1)
    space = z / np.maximum(lengths, 1e-12)[:, None] if config.metric == "cosine" else z
    try:
        labels, centroids, inertia = kmeans(space, k, config.seed, config.n_init)
    except ClusteringError as e:
        raise ClusteringError(f"{name}: {e}") from None
    onehot = np.zeros((len(pts), k))
    onehot[np.arange(len(pts)), labels] = 1.0
    if config.metric == "cosine":
        units = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
        # back to weights: the shared direction units_j L^-1, each member scaled by its own length
        directions = np.linalg.solve(L.T, units.T).T
        replaced, scales, centroids = directions[labels] * lengths[:, None], lengths, units
    else:
        # the members' mean, computed in weight space so that it is exact whatever k-means' last step
        means = (onehot.T @ pts) / onehot.sum(0)[:, None]
        replaced, scales = means[labels], np.ones(len(pts))
        centroids = means @ L
    return _layer_result(name, k, weight, config, labels, centroids, inertia, space, replaced, scales)


_CACHE = LRUCache(512)  # each entry at most ~150 KB


def cluster_model(model: nn.Module, config: ClusteringConfig, reference=None) -> Clustering:
    """Run k-means for every active layer of ``config`` on ``model``'s filters (model unchanged).

    ``reference``: an :class:`explorer.recovery.Reference` of ``model`` on training images, needed
    for ``space="data"`` (its per-layer second moments). Results are cached by (layer weights + BN
    digest, layer, k, options, statistics digest), so the app's repeated requests cost nothing.
    Raises ClusteringError for invalid configurations or a data space without a reference.
    """
    config.validate()
    if config.space == "data" and reference is None:
        raise ClusteringError("space=data needs statistics of the layers' inputs on training images "
                              "(use clustering.prune with the training images)")
    modules = dict(model.named_modules())
    layers = {}
    for name, k in config.active.items():
        conv, bn = modules[name], modules[conv_layer(name).bn]
        key = (digest(conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var), name, k,
               config.metric, config.granularity, config.fold_bn, config.seed, config.n_init, config.space,
               reference.key if config.space == "data" else None)
        res = _CACHE.get(key)
        if res is None:
            sigma = reference.sigma(name, config.fold_bn) if config.space == "data" else None
            res = cluster_layer(name, conv.weight, bn, k, config, sigma)
            _CACHE.put(key, res)
        layers[name] = res
    stream: dict[int, StreamClustering] = {}
    for stage, k in config.active_stream.items():
        prev = stream.get(stage - 1)
        source = prev.labels if prev is not None else (np.arange(stream_width(stage - 1)) if stage > 1 else None)
        key = ("stream", stage, k, digest(*[t for n in stream_writers(stage) for t in _conv_bn_tensors(modules, n)]),
               None if source is None else source.tobytes(), config.seed, config.n_init, config.space,
               reference.key if config.space == "data" else None)
        hit = _CACHE.get(key)
        if hit is None:
            sigmas = [reference.sigma(n, True) for n in stream_writers(stage)] if config.space == "data" else None
            hit = cluster_stream(model, stage, k, config, source, sigmas)
            _CACHE.put(key, hit)
        stream[stage], writer_layers = hit
        layers.update(writer_layers)
    layers = dict(sorted(layers.items(), key=lambda kv: _layer_order(kv[0])))
    return Clustering(config, layers, stream=stream)


def _conv_bn_tensors(modules, name):
    conv, bn = modules[name], modules[conv_layer(name).bn]
    return conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var


def stream_groups(stage: int, source_labels: np.ndarray | None) -> np.ndarray:
    """(W,) int64 shortcut group of each channel of stage ``stage``'s stream (see
    :class:`StreamClustering`): all 0 for stage 1; for stages 2 and 3 -1 on the zero-padded channels
    and ``source_labels[c]`` on a channel the option-A shortcut copies from channel c of the
    previous stage (``source_labels``: that stage's (W_prev,) cluster labels, or None for an
    unclustered previous stage, whose every channel is its own group)."""
    if stage == 1:
        return np.zeros(stream_width(1), dtype=np.int64)
    src = shortcut_source(stage).numpy()
    source = np.arange(stream_width(stage - 1)) if source_labels is None else np.asarray(source_labels)
    return np.where(src >= 0, source[np.maximum(src, 0)], -1).astype(np.int64)


def stream_points(model: nn.Module, stage: int) -> list[np.ndarray]:
    """Each writer's BN-folded [filter, bias] points of stage ``stage``'s stream, float64 (W, D_w + 1),
    in :func:`explorer.model.stream_writers` order (:func:`layer_points` with ``fold_bn``)."""
    modules = dict(model.named_modules())
    return [layer_points(modules[n].weight, modules[conv_layer(n).bn], "filter", True) for n in stream_writers(stage)]


def grouped_kmeans(points: np.ndarray, groups: np.ndarray, k: int, seed: int = 0, n_init: int = 3
                   ) -> tuple[np.ndarray, float]:
    """k-means of points (P, D) into k clusters, none of which spans two ``groups`` (P,): returns
    labels (P,) in 0..k-1 (the groups' clusters in order of their sorted group ids) and inertia.

    Each group gets one cluster, then clusters are handed out one at a time to the group whose
    k-means (scikit-learn, :func:`kmeans`) inertia falls most with one more (greedy; about k
    k-means runs on the small groups). Raises ClusteringError when k is below the number of groups
    or above the number of distinct points counted per group."""
    ids = np.unique(groups)
    members = [np.flatnonzero(groups == g) for g in ids]
    if k < len(ids):
        raise ClusteringError(f"k = {k} is below the {len(ids)} groups the shortcut imposes; choose k >= {len(ids)}")
    caps = [len(np.unique(points[m], axis=0)) for m in members]
    if sum(caps) < k:
        raise ClusteringError(f"only {sum(caps)} distinct channels for k = {k}; choose k <= {sum(caps)}")

    def run(i, kk):
        pts = points[members[i]]
        if kk == 1:
            return np.zeros(len(pts), dtype=np.int64), float(((pts - pts.mean(0)) ** 2).sum())
        labels, _, inertia = kmeans(pts, kk, seed, n_init)
        return labels, inertia

    alloc = [1] * len(ids)
    cur = [run(i, 1) for i in range(len(ids))]
    nxt = [run(i, 2) if caps[i] >= 2 else None for i in range(len(ids))]
    while sum(alloc) < k:
        gain, i = max((cur[i][1] - nxt[i][1], -i) for i in range(len(ids)) if nxt[i] is not None)
        i = -i
        alloc[i] += 1
        cur[i] = nxt[i]
        nxt[i] = run(i, alloc[i] + 1) if alloc[i] < caps[i] else None
    labels = np.empty(len(points), dtype=np.int64)
    offset = 0
    for i, m in enumerate(members):
        labels[m] = cur[i][0] + offset
        offset += alloc[i]
    return labels, float(sum(c[1] for c in cur))


def cluster_stream(model: nn.Module, stage: int, k: int, config: ClusteringConfig,
                   source_labels: np.ndarray | None = None, sigmas: list[np.ndarray] | None = None
                   ) -> tuple[StreamClustering, dict[str, LayerClustering]]:
    """Coupled clustering of stage ``stage``'s residual-stream channels into k clusters.

    A channel's point is the concatenation, over every writer of the stream
    (:func:`explorer.model.stream_writers`), of its BN-folded [filter, bias] (D_w + 1 values per
    writer; in the data space, ``config.space == "data"``, each writer's part mapped by its own
    whitening ``L_w`` of ``sigmas``, the (D_w + 1, D_w + 1) second moments of its input patches, so
    that a squared distance is the summed output error of all writers). k-means runs under the
    option-A shortcut's constraint (He et al. 2016; it is why Torch-Pruning cannot trace this
    architecture, VainF/Torch-Pruning#64): in stages 2 and 3 a cluster holds only channels of one
    :func:`stream_groups` group, i.e. channels fed by the shortcut from channels of one cluster of
    the previous stage (``source_labels``, (W_prev,); None: that stage is unclustered), or only
    zero-padded channels (:func:`grouped_kmeans`). Each writer's filters in a cluster are then
    replaced by the mean of that writer's members (so the channels of a cluster are identical after
    the folded BatchNorm, the residual add and the ReLU; Ding et al. 2019, C-SGD, tie the
    "pacesetter" layers' channels in the same way during training).

    Returns (StreamClustering, {writer: LayerClustering}); each LayerClustering has the shared
    labels, the folded weight (W, Cin, 3, 3) and bias (W,) and scales 1. Raises ClusteringError for
    k out of range, too few distinct channels, or missing or mis-shaped ``sigmas`` in the data space.
    """
    from .recovery import whitening

    w = stream_width(stage)
    if not 1 <= k <= w:
        raise ClusteringError(f"stream stage {stage}: k = {k} is outside 1..{w}")
    writers = stream_writers(stage)
    pts = stream_points(model, stage)
    if config.space == "data":
        if sigmas is None or len(sigmas) != len(writers) or any(
                sg.shape != (p.shape[1], p.shape[1]) for sg, p in zip(sigmas, pts)):
            raise ClusteringError(f"stream stage {stage}: space=data needs the second moments of the input patches "
                                  f"of {', '.join(writers)} (with the bias column)")
        spaces = [p @ whitening(sg) for p, sg in zip(pts, sigmas)]
    else:
        spaces = pts
    groups = stream_groups(stage, source_labels)
    try:
        labels, inertia = grouped_kmeans(np.concatenate(spaces, 1), groups, k, config.seed, config.n_init)
    except ClusteringError as e:
        raise ClusteringError(f"stream stage {stage}: {e}") from None
    onehot = np.zeros((w, k))
    onehot[np.arange(w), labels] = 1.0
    counts = onehot.sum(0)[:, None]
    modules = dict(model.named_modules())
    out = {}
    for name, p, z in zip(writers, pts, spaces):
        means = (onehot.T @ p) / counts  # the members' mean of THIS writer's folded filters, in weight space
        zmeans = (onehot.T @ z) / counts
        layer_inertia = float(((z - zmeans[labels]) ** 2).sum())
        out[name] = _layer_result(name, k, modules[name].weight, config, labels, zmeans, layer_inertia, z,
                                  means[labels], np.ones(w))
    return StreamClustering(stage, k, labels, groups, inertia, writers), out


def apply(model: nn.Module, clustering: Clustering, calibration_images: torch.Tensor | None = None) -> nn.Module:
    """A new model (``model`` is never mutated) whose clustered filters are replaced by centroids.

    With ``fold_bn`` the layer's BatchNorm becomes the identity plus the clustered bias. When the
    configuration's recovery is "bn", ``calibration_images`` (uint8 (N, 3, 32, 32) training images)
    must be given; the first ``recalibrate_bn`` of them are used. (Recovery "lsq" is applied by
    :func:`prune` after this.)

    Raises ClusteringError when re-estimation is asked for without images.
    """
    cfg = clustering.config
    new = copy.deepcopy(model).eval()
    modules = dict(new.named_modules())
    folded = []
    with torch.no_grad():
        for name, res in clustering.layers.items():
            modules[name].weight.copy_(res.weight)
            if res.bias is not None:
                bn = modules[conv_layer(name).bn]
                bn.weight.fill_(1.0)
                bn.bias.copy_(res.bias)
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0 - bn.eps)  # so that sqrt(var + eps) is exactly 1
                folded.append(bn)
    if cfg.recovery == "bn":
        if calibration_images is None:
            raise ClusteringError("recalibrate_bn needs training images (calibration_images)")
        # A folded BatchNorm is an exact affine (identity + the clustered bias), not a
        # normalisation: re-estimating its statistics would divide out the folded scale.
        recalibrate_bn(new, calibration_images[: cfg.recalibrate_bn], skip=folded)
    return new


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: torch.Tensor, batch_size: int = 500,
                   skip: list[nn.Module] = ()) -> nn.Module:
    """Re-estimate every BatchNorm's running mean/variance (except those in ``skip``, which stay in
    eval mode) in place from uint8 images (N, 3, 32, 32) by a forward pass in train mode with
    cumulative averaging (momentum None); no gradient step, no other parameter changes. Returns
    ``model`` in eval mode. Method: BN re-estimation after weight changes, as in Li et al. 2017
    ("Revisiting batch normalization for practical domain adaptation", AdaBN)."""
    from .data import normalize

    skip_ids = {id(m) for m in skip}
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in skip_ids]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for m in skip:
        m.eval()
    try:
        for i in range(0, len(images), batch_size):
            model(normalize(images[i : i + batch_size]).contiguous(memory_format=torch.channels_last))
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.eval()
    return model


def training_permutation(n_train: int) -> torch.Tensor:
    """The one fixed permutation (seed 0) of the training split that every statistic, re-fit, BN
    re-estimation and seed choice draws from: (n_train,) int64."""
    return torch.randperm(n_train, generator=torch.Generator().manual_seed(0))


def holdout_size(n_train: int) -> int:
    """Images at the end of :func:`training_permutation` kept for the seed choice: 2,000 of the
    real split (a quarter of a small one)."""
    return min(HOLDOUT_IMAGES, n_train // 4)


def calibration_subset(train_images: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """The first n images of :func:`training_permutation` (never the held-out ones): uint8
    (min(n, available), 3, 32, 32). ``seed`` is kept for callers of the older signature; every
    configuration now uses the same images, so that changing the k-means seed changes nothing
    else."""
    perm = training_permutation(len(train_images))
    available = len(train_images) - holdout_size(len(train_images))
    return train_images[perm[: min(n, available)]]


def holdout_subset(train_images: torch.Tensor, train_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out training images and labels that choose among k-means seeds:
    (uint8 (H, 3, 32, 32), int64 (H,)), disjoint from every calibration subset."""
    perm = training_permutation(len(train_images))
    idx = perm[len(perm) - holdout_size(len(perm)):]
    return train_images[idx], train_labels[idx]


def training_reference(model: nn.Module, config: ClusteringConfig, train_images: torch.Tensor):
    """The :func:`explorer.recovery.reference` of ``model`` on the calibration images that ``config``
    fits on (its ``recalibrate_bn`` images for lsq, else 512), cached by content."""
    from . import recovery

    n = config.recalibrate_bn if config.recovery == "lsq" else DEFAULT_CALIBRATION["lsq"]
    images = calibration_subset(train_images, n)
    key = digest(*[t for t in model.state_dict().values()], images, length=20)
    return recovery.reference(model, images, digest=key)


def prune(model: nn.Module, config: ClusteringConfig, train_images: torch.Tensor | None = None,
          train_labels: torch.Tensor | None = None) -> tuple[nn.Module, Clustering]:
    """Cluster, apply and recover in one call: returns (clustered model, clustering).

    ``train_images`` (uint8 (N, 3, 32, 32), the training split) are needed for ``space="data"``
    and any recovery; ``train_labels`` (N,) too for ``seeds`` > 1 (the held-out accuracy that picks
    the seed). The test split is never an argument. Raises ClusteringError for an invalid
    configuration or missing training data.
    """
    config.validate()
    from .limits import check  # one wording for "more clusters than distinct filters" everywhere

    check(model, config)
    if config.seeds > 1:
        return _best_of_seeds(model, config, train_images, train_labels)
    if (config.space == "data" or config.recovery != "none") and train_images is None:
        what = "recalibrate_bn" if config.recovery == "bn" and config.space == "weight" else \
            f"space={config.space}, recovery={config.recovery}"
        raise ClusteringError(f"{what} needs the training images")
    ref = training_reference(model, config, train_images) if config.space == "data" or config.recovery == "lsq" else None
    clustering = cluster_model(model, config, ref)
    calib = calibration_subset(train_images, config.recalibrate_bn) if config.recovery == "bn" else None
    new = apply(model, clustering, calib)
    if config.recovery == "lsq":
        from .recovery import lsq_recover

        lsq_recover(new, clustering, ref)
    return new, clustering


def _best_of_seeds(model, config, train_images, train_labels) -> tuple[nn.Module, Clustering]:
    from .evaluate import predict_logits

    if train_images is None or train_labels is None:
        raise ClusteringError("seeds > 1 needs the training images and labels (held-out accuracy picks the seed)")
    images, labels = holdout_subset(train_images, train_labels)
    best = None
    scores = {}
    for s in range(config.seed, config.seed + config.seeds):
        m, cl = prune(model, replace(config, seed=s, seeds=1), train_images)
        top1 = float((predict_logits(m, images).argmax(1) == labels).float().mean())
        scores[s] = top1
        if best is None or top1 > best[0]:
            best = (top1, m, cl)
    _, m, cl = best
    return m, Clustering(config, cl.layers, chosen_seed=cl.config.seed, holdout_top1=scores, stream=cl.stream)
