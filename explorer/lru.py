"""A small thread-safe LRU mapping bounded by entry count, shared by the k-means, projection and
result caches (the activation cache in :mod:`explorer.engine` is bounded by bytes instead)."""
from __future__ import annotations

import threading
from collections import OrderedDict


class LRUCache:
    """Thread-safe least-recently-used cache of at most ``maxsize`` entries."""

    def __init__(self, maxsize: int):
        self.maxsize, self.data, self.lock = maxsize, OrderedDict(), threading.Lock()
        self.hits = self.misses = 0

    def get(self, key):
        """The cached value or None; a hit makes the entry most recent."""
        with self.lock:
            if key in self.data:
                self.data.move_to_end(key)
                self.hits += 1
                return self.data[key]
            self.misses += 1
            return None

    def put(self, key, value) -> None:
        with self.lock:
            self.data[key] = value
            self.data.move_to_end(key)
            while len(self.data) > self.maxsize:
                self.data.popitem(last=False)

    def __len__(self) -> int:
        return len(self.data)
