"""The seed spread of the configuration on screen, computed in the background after its main
result: top-1 on the full test split for k-means seeds 0..S-1 (:meth:`Explorer.seed_spread`).

A measurement shown beside the result, never a choice. One background thread per process; a
newer request makes an older one stop after the seed it is on, so a user moving sliders never
waits behind spreads of configurations no longer on screen (the engine evaluates one net at a
time). It never competes with a page being answered: each seed waits until no page run of any
session is in progress and none has been for :data:`IDLE_S` seconds (:func:`page_run` marks them),
and the thread runs at a lower OS priority (its k-means and least squares yield the CPU). What a
slider move can still wait for is the one seed evaluation in flight when it arrives."""
from __future__ import annotations

import contextlib
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

from ..clustering import ClusteringConfig
from ..lru import LRUCache
from ..pipeline import SpreadAbandoned

DEFAULT_SEEDS = 5
IDLE_S = 1.5  # quiet time after the last page run before a seed starts
NICE = 10  # added to the spread thread's nice value (Linux: per thread; threads it starts inherit it)

_POOL = ThreadPoolExecutor(1, thread_name_prefix="explorer-spread")
_LOCK = threading.Lock()
_FUTURES = LRUCache(64)
_LATEST: dict[int, str] = {}  # id(explorer) -> key of the latest request
_RUNS = {"active": 0, "ended": 0.0}  # page runs in progress (all sessions), monotonic end of the last


@contextlib.contextmanager
def page_run():
    """Mark a page run (a slider move being answered) in progress: seeds wait for it and
    :data:`IDLE_S` seconds after it."""
    with _LOCK:
        _RUNS["active"] += 1
    try:
        yield
    finally:
        with _LOCK:
            _RUNS["active"] -= 1
            _RUNS["ended"] = time.monotonic()


def _idle() -> bool:
    with _LOCK:
        return _RUNS["active"] == 0 and time.monotonic() - _RUNS["ended"] >= IDLE_S


def _lower_priority() -> None:
    """Lower this thread's OS priority, once (no privilege needed; a no-op where unsupported)."""
    t = threading.current_thread()
    if getattr(t, "_explorer_niced", False):
        return
    t._explorer_niced = True
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + NICE)
    except (AttributeError, OSError):
        pass


def _key(exp, config: ClusteringConfig, seeds: int) -> str:
    return f"{id(exp)}|{seeds}|{replace(config, seed=0, seeds=1).key()}"


def _compute(exp, config: ClusteringConfig, seeds: int, key: str) -> dict:
    def superseded() -> bool:  # asked before each seed: waits for quiet, then says whether to stop
        while True:
            with _LOCK:
                if _LATEST.get(id(exp)) != key:
                    return True
            if _idle():
                return False
            time.sleep(0.1)

    _lower_priority()
    return exp.seed_spread(config, seeds, stop=superseded)


def cancel(exp) -> None:
    """Nothing on screen needs a spread (nothing clustered): a running one stops after its seed."""
    with _LOCK:
        _LATEST.pop(id(exp), None)


def _live(fut: Future | None) -> Future | None:
    """``fut`` unless it is missing or ended abandoned (a superseded spread is started again)."""
    if fut is None or (fut.done() and isinstance(fut.exception(), SpreadAbandoned)):
        return None
    return fut


def existing(exp, config: ClusteringConfig, seeds: int = DEFAULT_SEEDS) -> Future | None:
    """The future of ``config``'s seed spread if one was requested (running or finished, not
    abandoned), else None; starts nothing."""
    with _LOCK:
        return _live(_FUTURES.get(_key(exp, config, seeds)))


def request(exp, config: ClusteringConfig, seeds: int = DEFAULT_SEEDS) -> Future:
    """The (possibly finished) future of ``config``'s seed spread on ``exp``; starts it if needed.
    Its result: ``{"seeds", "top1", "min", "median", "max"}`` (fractions)."""
    key = _key(exp, config, seeds)
    with _LOCK:
        _LATEST[id(exp)] = key
        fut = _live(_FUTURES.get(key))
        if fut is not None:
            return fut
        fut = _POOL.submit(_compute, exp, config, seeds, key)
        _FUTURES.put(key, fut)
        return fut
