"""2D maps of a conv layer's filters and their k-means centroids, for the app's "Filters in 2D" view.

Two methods:

- ``"umap"``: UMAP (McInnes, Healy & Melville 2018, "UMAP: Uniform Manifold Approximation and
  Projection for Dimension Reduction", arXiv:1802.03426; the ``umap-learn`` package). It is fitted
  **once per layer** on the layer's filters (the points k-means clusters, see
  :func:`explorer.clustering.layer_points`), and the k centroids are placed with the fitted model's
  ``transform`` (UMAP's out-of-sample embedding: each new point is initialised at the weighted mean
  of its nearest training points' embeddings and then optimised against the fixed training
  embedding). Moving k therefore never re-fits the map: the filters keep their positions and only the
  centroids and colours change.
- ``"pca"``: principal component analysis (``sklearn.decomposition.PCA``, 2 components) fitted on
  the filters; centroids are placed by the same linear map. Exact, deterministic and fast.

Small layers: ResNet20's stem and stage-1 convs have only 16 filters. UMAP's ``n_neighbors`` must be
below the number of points and, to keep any local structure, well below it; :func:`umap_neighbors`
uses ``clip(P // 3, 2, 15)`` (5 neighbours for 16 filters, 10 for 32, 15 from 45 points on; 15 is
umap-learn's default). With fewer than :data:`MIN_UMAP_POINTS` points UMAP is not meaningful and
:func:`embed` falls back to PCA (``Projection.method`` then says ``"pca"`` and ``note`` says why).

Cost: the first UMAP fit in a process compiles umap-learn's numba kernels (tens of seconds to
minutes, docs/engine.md); later fits of a 16-64 point layer take well under a second. :func:`submit_embed` therefore runs embeddings on one background thread (lower
priority where the OS allows), so a page can show a PCA preview and poll instead of blocking; UMAP
runs single-threaded (``random_state`` set), so it never competes with torch for more than one core.
(A worker *process* would isolate the compile further, but Streamlit installs the app script as
``__main__``, which multiprocessing's spawn would re-execute in the child.) Fitted models are cached
in-process (an LRU keyed by the points' content, method and seed), so a layer's map is fitted once
and re-used for every k.

:func:`layer_map` gathers what the view shows of one layer of a model (its points in k-means'
space, the clustering of that layer alone, cluster sizes, the filters worth a thumbnail), so the
app's page only draws. Nothing here imports Streamlit.
"""
from __future__ import annotations

import os
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from .digest import digest
from .lru import LRUCache

METHODS: tuple[str, ...] = ("umap", "pca")
MIN_UMAP_POINTS = 8
UMAP_MIN_DIST = 0.1


@dataclass(frozen=True)
class Projection:
    """A 2D map of one layer.

    points: (P, 2) float32, one row per clustered point (filter, or 2D kernel with kernel
    granularity), in the order of :func:`explorer.clustering.layer_points`;
    centroids: (k, 2) float32 positions of the centroids given to :func:`embed` (None if none were);
    method: the method actually used ("umap" or "pca"); params: its settings (``n_neighbors``,
    ``min_dist`` for UMAP; ``explained_variance`` (2,) for PCA); note: why a fallback happened, or "".
    """

    points: np.ndarray
    centroids: np.ndarray | None
    method: str
    params: dict = field(default_factory=dict)
    note: str = ""


def clustering_space(points: np.ndarray, metric: str) -> np.ndarray:
    """The space k-means ran in: ``points`` (P, D) unchanged for ``"euclidean"``, L2-normalised rows
    for ``"cosine"`` (as in :func:`explorer.clustering.cluster_layer`). Returns float32 (P, D)."""
    pts = np.asarray(points, dtype=np.float64)
    if metric == "cosine":
        pts = pts / np.maximum(np.linalg.norm(pts, axis=1, keepdims=True), 1e-12)
    return pts.astype(np.float32)


def umap_neighbors(n_points: int) -> int:
    """UMAP ``n_neighbors`` for a layer of ``n_points`` points: ``clip(n_points // 3, 2, 15)``, and
    always below ``n_points`` (5 for ResNet20's 16-filter layers, 10 for 32, 15 for 64)."""
    return int(max(2, min(15, n_points // 3, n_points - 1)))


def _digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return digest(str(a.shape), a)


_FITS = LRUCache(64)


def _fit(points: np.ndarray, method: str, seed: int):
    key = (_digest(points), method, int(seed))
    hit = _FITS.get(key)
    if hit is not None:
        return hit
    if method == "pca":
        from sklearn.decomposition import PCA

        n_comp = min(2, points.shape[0], points.shape[1])
        model = PCA(n_components=n_comp, random_state=seed).fit(points)
        emb = _pad2(model.transform(points))
        params = {"explained_variance": [float(v) for v in model.explained_variance_ratio_]}
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # n_jobs / random_state and small-graph notices
            import umap

            n_neighbors = umap_neighbors(len(points))
            model = umap.UMAP(n_components=2, n_neighbors=n_neighbors, min_dist=UMAP_MIN_DIST,
                              metric="euclidean", init="spectral", random_state=seed, n_jobs=1)
            emb = model.fit_transform(points)
        params = {"n_neighbors": n_neighbors, "min_dist": UMAP_MIN_DIST}
    value = (model, np.asarray(emb, dtype=np.float32), params)
    _FITS.put(key, value)
    return value


def _pad2(xy: np.ndarray) -> np.ndarray:
    xy = np.asarray(xy, dtype=np.float32)
    if xy.shape[1] < 2:
        xy = np.concatenate([xy, np.zeros((len(xy), 2 - xy.shape[1]), np.float32)], axis=1)
    return xy


def embed(points: np.ndarray, centroids: np.ndarray | None = None, method: str = "umap", seed: int = 0
          ) -> Projection:
    """Project a layer's points (P, D) to 2D with ``method`` ("umap" or "pca"), fitted on ``points``
    only (cached per points/method/seed in this process), and place ``centroids`` (k, D), given in the
    same space, with the fitted model's ``transform``.

    Centroids that coincide with a point (singleton clusters, or k = P) are placed exactly on that
    point's embedding, so an unclustered layer shows every filter as its own centroid. Raises
    ValueError for an unknown method or mismatched dimensions.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    points = np.ascontiguousarray(points, dtype=np.float32)
    if points.ndim != 2 or len(points) == 0:
        raise ValueError(f"points must be a non-empty (P, D) array, got shape {points.shape}")
    if centroids is not None:
        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        if centroids.ndim != 2 or centroids.shape[1] != points.shape[1]:
            raise ValueError(f"centroids must be (k, {points.shape[1]}), got shape {centroids.shape}")
    note = ""
    if method == "umap" and len(points) < MIN_UMAP_POINTS:
        method, note = "pca", f"UMAP needs at least {MIN_UMAP_POINTS} points; showing PCA"
    model, emb, params = _fit(points, method, seed)
    cxy = None
    if centroids is not None and len(centroids):
        cxy = np.empty((len(centroids), 2), np.float32)
        # Exact matches first: transform() would jitter a point that is already in the training set.
        d2 = ((centroids[:, None, :] - points[None, :, :]) ** 2).sum(-1)
        nearest = d2.argmin(1)
        exact = d2[np.arange(len(centroids)), nearest] <= 1e-12 * max(1.0, float((points ** 2).sum(1).max()))
        cxy[exact] = emb[nearest[exact]]
        if (~exact).any():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cxy[~exact] = _pad2(model.transform(centroids[~exact]))
    return Projection(emb.copy(), cxy, method, dict(params), note)


# ---------------------------------------------------------------- background worker

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_FUTURES = LRUCache(256)


def _worker_init() -> None:
    try:  # Linux: a thread is a task with its own nice value; background work yields to the server
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="explorer-umap", initializer=_worker_init)
        return _POOL


def submit_embed(points: np.ndarray, centroids: np.ndarray | None, method: str = "umap", seed: int = 0
                 ) -> Future:
    """:func:`embed` on the background worker thread; returns a Future of a :class:`Projection`.

    The same request (same points, centroids, method, seed) returns the same Future, so polling from
    many page reruns or sessions costs nothing; a failed request is retried on the next call.
    """
    points = np.ascontiguousarray(points, dtype=np.float32)
    cents = None if centroids is None else np.ascontiguousarray(centroids, dtype=np.float32)
    key = (_digest(points), None if cents is None else _digest(cents), method, int(seed))
    with _POOL_LOCK:
        fut = _FUTURES.get(key)
        if fut is not None and not (fut.done() and fut.exception() is not None):
            return fut
    fut = _pool().submit(embed, points, cents, method, seed)
    _FUTURES.put(key, fut)
    return fut


# ---------------------------------------------------------------- one layer of a model, for the view

@dataclass(frozen=True)
class LayerMap:
    """What the 2D view shows of one conv layer under a configuration.

    points: (P, D) the layer's clustered points (:func:`explorer.clustering.layer_points`: P filters,
    or P = Cout * Cin kernels with kernel granularity); space: (P, D) float32 the same points in the
    space k-means ran in (:func:`clustering_space`); norms: (P,) the points' L2 norms; names: P labels
    ("3", or "3 (in-channel 5)" for kernels); what: "filters" or "2D kernels"; k: the layer's k, None
    when it is not clustered; labels: (P,) cluster of each point and centroids: (k, D) in ``space``,
    both None when it is not clustered; in_channels: Cin of the layer's filters.
    """

    layer: str
    points: np.ndarray
    space: np.ndarray
    norms: np.ndarray
    names: list[str]
    what: str
    k: int | None
    labels: np.ndarray | None
    centroids: np.ndarray | None
    in_channels: int
    granularity: str

    def cluster_sizes(self) -> np.ndarray:
        """(k,) points per cluster; (P,) ones when the layer is not clustered."""
        if self.labels is None:
            return np.ones(len(self.points), dtype=np.int64)
        return np.bincount(self.labels, minlength=len(self.centroids))

    def thumbnails(self, n_max: int = 9) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Filters worth drawing: the centroids of the ``n_max`` largest clusters (largest first,
        ties by cluster index), or the first ``n_max`` filters of an unclustered layer. Returns
        (indices (n,), weights (n, Cin, 3, 3), sizes (n,) or None); empty for kernel granularity,
        whose points are single kernels."""
        cin = self.in_channels
        if self.granularity != "filter":
            return np.arange(0), np.zeros((0, cin, 3, 3), np.float32), None
        if self.centroids is not None:
            sizes = self.cluster_sizes()
            order = np.argsort(-sizes, kind="stable")[:n_max]
            vecs = np.asarray(self.centroids)[order, : cin * 9]
            return order, vecs.reshape(len(order), cin, 3, 3), sizes[order]
        order = np.arange(min(n_max, len(self.points)))
        return order, np.asarray(self.points)[order, : cin * 9].reshape(len(order), cin, 3, 3), None


def layer_map(model, config, layer: str, train_images=None) -> LayerMap:
    """:class:`LayerMap` of conv ``layer`` of ``model`` (a ResNet20, not mutated) under
    ``config`` (a :class:`explorer.clustering.ClusteringConfig`): that layer alone is clustered
    with ``config``'s k and options (cached by :func:`explorer.clustering.cluster_model`), BN
    re-estimation left out since it does not move the filters. ``space="data"`` needs
    ``train_images`` (uint8 (N, 3, 32, 32), the training split) for the statistics that metric
    comes from (the same images as :func:`explorer.clustering.prune`); the map still shows the
    filters' weights. Raises KeyError for an unknown layer, ClusteringError for an invalid k or a
    data space without training images."""
    from . import clustering
    from .clustering import ClusteringError, cluster_model, layer_points
    from .model import conv_layer, stream_stage_of

    info = conv_layer(layer)
    modules = dict(model.named_modules())
    fold = config.fold_bn and config.granularity == "filter"
    pts = layer_points(modules[layer].weight, modules[info.bn], config.granularity, fold)
    k = config.active.get(layer)
    stage = stream_stage_of(layer)
    stream_k = config.active_stream.get(stage) if stage is not None else None
    labels = centroids = None
    if k or stream_k:
        ref = None
        if config.space == "data":
            if train_images is None:
                raise ClusteringError("space=data needs the training images for the layer's statistics")
            ref = clustering.training_reference(model, config, train_images)
        # A writer of a clustered residual stream shows the stream's shared assignment (clustered
        # with the streams below it, which constrain it through the shortcut).
        only = (replace(config, ks={}, stream={s: v for s, v in config.active_stream.items() if s <= stage},
                        recalibrate_bn=0) if stream_k else replace(config, ks={layer: k}, recalibrate_bn=0))
        lc = cluster_model(model, only, ref).layers[layer]
        k = lc.k if stream_k else k
        labels, centroids = lc.labels, lc.centroids
    space = clustering_space(pts, config.metric)
    if labels is not None and (config.space == "data" or stream_k):
        # k-means' centroids live in the whitened output-error space (or the stream's concatenated
        # one); the map (and the thumbnails) show this layer's weights, so each cluster is drawn at
        # its members' mean there.
        centroids = np.stack([space[labels == c].mean(0) for c in range(k)]).astype(np.float32)
    cin = info.filter_shape[0]
    if config.granularity == "kernel":
        names, what = [f"{i // cin} (in-channel {i % cin})" for i in range(len(pts))], "2D kernels"
    else:
        names, what = [str(i) for i in range(len(pts))], "filters"
    return LayerMap(layer, pts, space, np.linalg.norm(pts, axis=1), names, what,
                    k, labels, centroids, cin, config.granularity)
