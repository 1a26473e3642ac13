"""One pruning experiment end to end, shared by the CLIs and the app.

:class:`Explorer` holds a base checkpoint, the data and the baseline evaluation (all read-only);
:meth:`Explorer.run` turns a :class:`ClusteringConfig` into a :class:`PruneResult` (clustered model,
evaluation on the full test split, per-class deltas, compression report), cached per configuration.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoints as ckpt
from .clustering import Clustering, ClusteringConfig, prune
from .compress import CompressedResNet20, CompressionReport, compress, report
from .data import CIFAR10Tensors, load_cifar10
from .engine import FastEvaluator, release_free_memory
from .evaluate import Comparison, Evaluation, evaluate
from .lru import LRUCache


# What the explorer app shows when its URL does not say: the space and recovery the shipped
# analysis found best (docs/recovery.md: data-aware k-means + least squares). The library's own
# ClusteringConfig defaults stay plain k-means without recovery.
APP_DEFAULTS = {"space": "data", "recovery": "lsq"}


def app_default_config() -> ClusteringConfig:
    """The configuration of the app's empty URL: nothing clustered, the app's space and recovery."""
    return ClusteringConfig(**APP_DEFAULTS)


def with_app_defaults(params: Mapping[str, object]) -> dict:
    """URL query ``params`` with the app's default space and recovery filled in where they name
    neither (a ``recalibrate_bn`` alone keeps its older meaning, BN re-estimation)."""
    out = dict(params)
    if "space" not in out:
        out["space"] = APP_DEFAULTS["space"]
    if "recovery" not in out and "recalibrate_bn" not in out:
        out["recovery"] = APP_DEFAULTS["recovery"]
    return out


@dataclass(frozen=True)
class PruneResult:
    """Everything one configuration produces. ``model`` is the clustered ResNet20 (centroid filters),
    ``compressed`` its structurally smaller equivalent."""

    config: ClusteringConfig
    clustering: Clustering
    model: torch.nn.Module
    compressed: CompressedResNet20
    evaluation: Evaluation
    comparison: Comparison
    compression: CompressionReport

    def summary(self) -> dict:
        """JSON-ready: config, top-1 before/after, per-class rows, params, MACs, ratios."""
        c = self.compression
        return {
            "config": self.config.to_dict(),
            "baseline_top1": self.comparison.baseline.top1,
            "top1": self.evaluation.top1,
            "top1_delta": self.comparison.top1_delta,
            "per_class": self.comparison.rows(),
            "params": c.params, "baseline_params": c.baseline_params,
            "macs": c.macs, "baseline_macs": c.baseline_macs,
            "compression_ratio": c.compression_ratio, "mac_reduction": c.mac_reduction,
            "latency": c.latency,
        }


_PRUNE_LOCK = threading.RLock()


class Explorer:
    """A loaded checkpoint + dataset + baseline evaluation, and a bounded cache of results.

    Thread-safe for concurrent ``run`` calls; the base model is never mutated (every configuration
    gets its own copy from :func:`explorer.clustering.apply`).
    """

    def __init__(self, model: torch.nn.Module, data: CIFAR10Tensors, name: str = "model", cache_size: int = 32,
                 activation_cache_mb: int | None = None, mixed: bool | None = None):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.data = data
        self.name = name
        kw = {} if activation_cache_mb is None else {"cache_mb": activation_cache_mb}
        self.engine = FastEvaluator(data.test_images, data.test_labels, mixed=mixed, **kw)
        # The baseline goes through the same engine as every pruned net, so "nothing clustered"
        # reproduces it exactly (a plain eager pass may differ on a near-tie or two).
        base = compress(self.model)
        self.baseline = self.engine.evaluate(base)
        # The first MAC count loads torch's FLOP counter (about 1.5 s, measured): paid here, at cold
        # start, not by the first slider move.
        report(base, self.model)
        self._cache = LRUCache(cache_size)
        # The clustered and compressed nets of the latest configurations: the app's preview and the
        # full run of one slider move share them (apply() copies the model and may re-estimate BN).
        self._pruned = LRUCache(4)
        self._selection = None  # (engine, baseline) on held-out training images, made on first use
        self._select_cache = LRUCache(256)

    @classmethod
    def from_checkpoint(cls, path: str | Path, data_root: str | None = None, data: CIFAR10Tensors | None = None
                        ) -> "Explorer":
        """Load ``path`` (safely) and the dataset. Raises CheckpointError / DataNotFoundError."""
        model = ckpt.load_model(path)
        return cls(model, data if data is not None else load_cifar10(data_root), Path(path).stem)

    def warm(self, config: ClusteringConfig | None = None) -> None:
        """Pay now, not at the first slider move, what every data-aware or least-squares clustering
        of this checkpoint reads first: the original net's statistics on the calibration images
        (:func:`explorer.clustering.training_reference`, cached by content; 1.7 s of the first
        ``conv1`` move's 3.4 s on the 2-core AVX2 CPU, measured). ``config``: whose calibration
        images (default: the app's defaults); nothing to do for weight-space k-means without lsq.
        The references of the two most recently used checkpoints stay cached
        (:data:`explorer.recovery._REFERENCES`, about 80 MB each)."""
        from .clustering import training_reference

        config = config or app_default_config()
        if config.space == "data" or config.recovery == "lsq":
            with _PRUNE_LOCK:  # its ~80 MB and forward pass never beside another session's clustering
                training_reference(self.model, config, self.data.train_images)

    def evaluate_model(self, model: torch.nn.Module) -> Evaluation:
        """Plain eager fp32 evaluation of any model on the full test split (the reference path)."""
        return evaluate(model, self.data.test_images, self.data.test_labels)

    def preview(self, config: ClusteringConfig) -> Evaluation:
        """Quick evaluation on the engine's fixed stratified subset (200 test images per class).
        A preview, to be labelled as such; :meth:`run` gives the full result."""
        return self.engine.evaluate(self._prune(config)[2], preview=True)

    def _prune(self, config: ClusteringConfig, *, exclusive: bool = True
               ) -> tuple[torch.nn.Module, Clustering, CompressedResNet20]:
        """(clustered model, clustering, compressed net) for ``config``, cached for a few configurations.

        One configuration is clustered and recovered at a time per process (:data:`_PRUNE_LOCK`):
        like the engine's evaluations, concurrent ones gain nothing on a few cores, while each holds
        its own transient patches and activations (8 app sessions at once peaked at 6.4 GB before).
        ``exclusive=False`` skips that queue: the seed spread's thread, at low priority, must not
        hold the lock a slider move waits for (so at most one clustering runs beside the queue)."""
        key = config.key()
        hit = self._pruned.get(key)
        if hit is None:
            with _PRUNE_LOCK if exclusive else contextlib.nullcontext():
                hit = self._pruned.get(key)  # another session may have made it while this one waited
                if hit is None:
                    model, clustering = prune(self.model, config, self.data.train_images, self.data.train_labels)
                    hit = (model, clustering, compress(model, clustering))
                    self._pruned.put(key, hit)
                    release_free_memory()
        return hit

    def compressed(self, config: ClusteringConfig) -> CompressedResNet20:
        """The structurally smaller net of ``config`` (:func:`explorer.compress.compress` of its
        clustered model), without evaluating it; shares the clustering cache with :meth:`run`.
        Raises ClusteringError for an invalid configuration."""
        return self._prune(config.validate())[2]

    def cached(self, config: ClusteringConfig, latency_batches: tuple[int, ...] = ()) -> PruneResult | None:
        """The result of :meth:`run` for ``config`` if it is in the cache, else None (no work)."""
        return self._cache.get(config.key() + repr(latency_batches))

    def run(self, config: ClusteringConfig, latency_batches: tuple[int, ...] = (), *, exclusive: bool = True
            ) -> PruneResult:
        """Cluster, apply, evaluate and compress for ``config`` (cached per configuration);
        ``exclusive`` as in :meth:`_prune`.

        Raises ClusteringError for an invalid configuration.
        """
        key = config.key() + repr(latency_batches)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        config.validate()
        if not config.clustered and config.recovery != "bn":
            # Nothing changes: the model is the base model, so its evaluation *is* the baseline
            # (exact, and no pass over the test split).
            model, clustering = self.model, Clustering(config, {})
            small = compress(model, clustering)
            ev = self.baseline
        else:
            model, clustering, small = self._prune(config, exclusive=exclusive)
            ev = self.engine.evaluate(small)
        result = PruneResult(config, clustering, model, small, ev, Comparison(self.baseline, ev),
                             report(small, self.model, latency_batches))
        self._cache.put(key, result)
        return result

    def select_top1(self, config: ClusteringConfig) -> tuple[float, float]:
        """(top-1 of ``config``'s net, top-1 of the unclustered net) on the held-out training images
        (:func:`explorer.clustering.holdout_subset`, 2,000 images): the accuracy that *choices*
        (the search's budget, its move ranking) are made on, so that the test split only measures.
        Fractions; cached per configuration."""
        from .clustering import holdout_subset

        if self._selection is None:
            images, labels = holdout_subset(self.data.train_images, self.data.train_labels)
            engine = FastEvaluator(images, labels, mixed=self.engine.mixed, cache_mb=256, preview_per_class=10,
                                   split=False)  # never asked for a preview
            self._selection = (engine, engine.evaluate(compress(self.model)).top1)
        engine, base = self._selection
        key = config.key()
        hit = self._select_cache.get(key)
        if hit is None:
            config.validate()
            hit = engine.evaluate(self._prune(config)[2]).top1 if config.clustered or config.recovery == "bn" else base
            self._select_cache.put(key, hit)
        return hit, base

    def seed_spread(self, config: ClusteringConfig, seeds: int = 5, stop=None) -> dict:
        """Top-1 on the full test split of ``config`` clustered with k-means seeds 0..seeds-1 (each
        a single draw, ``seeds=1``): ``{"seeds": [...], "top1": [...], "min", "median", "max"}``
        (fractions). A measurement of how much the draw matters, not a choice: nothing is picked
        by these test accuracies. Each run is cached like :meth:`run`. ``stop()``, when given, is
        asked before each seed and again between its clustering (k-means and recovery) and its
        evaluation, so a caller that waits in ``stop`` for other work holds the engine for one
        evaluation at most; if it returns True the spread is abandoned (raises
        :class:`SpreadAbandoned`)."""
        import statistics
        from dataclasses import replace

        tops = []
        for s in range(seeds):
            cfg = replace(config, seed=s, seeds=1)
            if stop is not None and stop():
                raise SpreadAbandoned(config.key())
            if stop is not None and cfg.clustered and self.cached(cfg) is None:
                self._prune(cfg, exclusive=False)
                if stop():
                    raise SpreadAbandoned(config.key())
            tops.append(self.run(cfg, exclusive=False).evaluation.top1)
        return {"seeds": list(range(seeds)), "top1": tops, "min": min(tops),
                "median": statistics.median(tops), "max": max(tops)}


class SpreadAbandoned(RuntimeError):
    """A seed spread stopped because a newer one was asked for."""
