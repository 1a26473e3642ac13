"""Filter clustering of ResNet20 on CIFAR-10: the public API for notebooks and scripts.

    >>> from explorer import ClusteringConfig, Explorer, load_cifar10, load_model
    >>> explorer = Explorer(load_model("checkpoints/resnet20_cifar10.pt"), load_cifar10())
    >>> result = explorer.run(ClusteringConfig(ks={"layer3.2.conv2": 16}))
    >>> result.evaluation.top1, result.compression.macs

The names below are loaded on first use, so that ``import explorer.<module>`` (every command and
the app) does not pay for all of them.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    # model and data
    "ResNet20": "model", "resnet20": "model", "CONV_LAYER_NAMES": "model", "conv_layers": "model",
    "count_parameters": "model",
    "load_cifar10": "data", "CLASSES": "data",
    "load_model": "checkpoints",
    # clustering and the smaller net
    "ClusteringConfig": "clustering", "cluster_model": "clustering", "apply": "clustering", "prune": "clustering",
    "compress": "compress", "count_macs": "compress", "save_compressed": "compress", "load_compressed": "compress",
    "export_onnx": "compress",
    # evaluation
    "evaluate": "evaluate", "Evaluation": "evaluate", "Comparison": "evaluate", "per_class_table": "evaluate",
    # the whole experiment, cached
    "Explorer": "pipeline", "PruneResult": "pipeline",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'explorer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
