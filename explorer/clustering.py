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
from .model import CONV_LAYER_NAMES, conv_layer

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
    many k-means seeds by held-out training accuracy.
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

    def __post_init__(self):
        object.__setattr__(self, "ks", dict(sorted(self.ks.items(), key=lambda kv: _layer_order(kv[0]))))
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
        return self

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
        cfg = cls(ks=ks, metric=metric, granularity=granularity, fold_bn=fold, recalibrate_bn=recal,
                  seed=seed, n_init=n_init, space=space, recovery=recovery, seeds=seeds)
        return cfg, warns


OPTION_FIELDS = ("metric", "granularity", "fold_bn", "recalibrate_bn", "seed", "n_init", "space", "recovery", "seeds")


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
    return Clustering(config, layers)


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
    return m, Clustering(config, cl.layers, chosen_seed=cl.config.seed, holdout_top1=scores)
