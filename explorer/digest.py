"""The one content-hashing helper of the project: cache keys, result-file headers, dataset
fingerprints and upload identities all go through :func:`digest`.

A digest is the hex ``hashlib`` hash of the concatenated bytes of its parts, so ``digest(a, b)``
equals hashing ``a`` then ``b``. The byte forms are fixed (and some digests are stored in files:
``weights_sha1`` of the analysis results, a dataset's ``fingerprint``), so they must not change:

- ``bytes`` / ``bytearray`` / ``memoryview``: as they are;
- ``str``: UTF-8;
- ``numpy.ndarray``: its C-contiguous buffer in its own dtype (shape and dtype are *not* included:
  add them as a string part where they matter);
- ``torch.Tensor``: detached, on CPU, contiguous, its raw bytes in its own dtype (bfloat16 too).
"""
from __future__ import annotations

import hashlib
from typing import Mapping

import numpy as np
import torch


def _bytes(part) -> bytes | memoryview:
    if isinstance(part, (bytes, bytearray, memoryview)):
        return part
    if isinstance(part, str):
        return part.encode()
    if isinstance(part, torch.Tensor):
        # A 1-D uint8 view gives the raw bytes of any dtype (numpy has no bfloat16).
        t = part.detach().cpu().contiguous().reshape(-1)
        return t.view(torch.uint8).numpy().tobytes()
    if isinstance(part, np.ndarray):
        return np.ascontiguousarray(part).tobytes()
    raise TypeError(f"digest: cannot hash a {type(part).__name__} (bytes, str, numpy array or tensor)")


def digest(*parts, algorithm: str = "sha1", length: int | None = None) -> str:
    """Hex digest of ``parts`` (bytes, str, numpy arrays, tensors; byte forms in the module doc),
    hashed in order with ``hashlib.new(algorithm)``; the first ``length`` hex characters when given.

    Raises TypeError for a part of another type, ValueError for an unknown algorithm.
    """
    h = hashlib.new(algorithm)
    for p in parts:
        h.update(_bytes(p))
    out = h.hexdigest()
    return out if length is None else out[:length]


def state_digest(state: Mapping[str, torch.Tensor] | torch.nn.Module, length: int | None = 16) -> str:
    """:func:`digest` (sha1) of a state dict, or a module's: for each entry its name and shape, then
    its values as float32 (so the dtype a checkpoint was saved in does not matter). This is the
    ``weights_sha1`` of the analysis result files (16 hex characters by default)."""
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    parts = []
    for k, v in state.items():
        parts += [f"{k}{tuple(v.shape)}", v.detach().float()]
    return digest(*parts, length=length)
