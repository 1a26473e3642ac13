"""Small thread-safe LRU mappings: :class:`LRUCache` bounded by entry count (the k-means, projection
and result caches) and :class:`ActivationCache` bounded by bytes (the engine's activations, the
least-squares recovery's re-fitted prefixes)."""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch


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


def size_of(value) -> int:
    """Bytes held by a tensor or a tuple of tensors."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return sum(t.numel() * t.element_size() for t in value)


class ActivationCache:
    """Thread-safe LRU of tensors (or tuples of tensors) bounded by their total bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._data: OrderedDict[str, torch.Tensor | tuple[torch.Tensor, ...]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0

    def get(self, key: str):
        with self._lock:
            t = self._data.get(key)
            if t is not None:
                self._data.move_to_end(key)
            return t

    def put(self, key: str, value) -> None:
        """Store a tensor or a tuple of tensors (the per-batch chunks of one activation)."""
        size = size_of(value)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._data:
                return
            self._data[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._data.popitem(last=False)
                self.bytes -= size_of(old)

    def reserve(self, nbytes: int) -> None:
        """Evict least recently used entries until ``nbytes`` more would fit: called before an
        evaluation computes the outputs it will store, so that the cache plus those outputs never
        exceed the bound."""
        with self._lock:
            while self._data and self.bytes + nbytes > self.max_bytes:
                _, old = self._data.popitem(last=False)
                self.bytes -= size_of(old)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.bytes = 0
