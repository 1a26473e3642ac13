"""The seed spread of the configuration on screen, computed in the background after its main
result: top-1 on the full test split for k-means seeds 0..S-1 (:meth:`Explorer.seed_spread`).

A measurement shown beside the result, never a choice. One background thread per process; a
newer request makes an older one stop after the seed it is on, so a user moving sliders never
waits behind spreads of configurations no longer on screen (the engine evaluates one net at a
time)."""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

from ..clustering import ClusteringConfig
from ..lru import LRUCache
from ..pipeline import SpreadAbandoned

DEFAULT_SEEDS = 5

_POOL = ThreadPoolExecutor(1, thread_name_prefix="explorer-spread")
_LOCK = threading.Lock()
_FUTURES = LRUCache(64)
_LATEST: dict[int, str] = {}  # id(explorer) -> key of the latest request


def _key(exp, config: ClusteringConfig, seeds: int) -> str:
    return f"{id(exp)}|{seeds}|{replace(config, seed=0, seeds=1).key()}"


def _compute(exp, config: ClusteringConfig, seeds: int, key: str) -> dict:
    def superseded() -> bool:
        with _LOCK:
            return _LATEST.get(id(exp)) != key

    return exp.seed_spread(config, seeds, stop=superseded)


def request(exp, config: ClusteringConfig, seeds: int = DEFAULT_SEEDS) -> Future:
    """The (possibly finished) future of ``config``'s seed spread on ``exp``; starts it if needed.
    Its result: ``{"seeds", "top1", "min", "median", "max"}`` (fractions)."""
    key = _key(exp, config, seeds)
    with _LOCK:
        _LATEST[id(exp)] = key
        fut = _FUTURES.get(key)
        if fut is not None and not (fut.done() and isinstance(fut.exception(), SpreadAbandoned)):
            return fut
        fut = _POOL.submit(_compute, exp, config, seeds, key)
        _FUTURES.put(key, fut)
        return fut
