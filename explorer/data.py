"""CIFAR-10 (Krizhevsky 2009) as in-memory tensors, from the official download or a local copy.

Sources, in the order they are tried by :func:`load_cifar10`:

1. a local directory given as ``root`` (the ``--data`` flag) or the ``EXPLORER_DATA``
   environment variable, holding either the official ``cifar-10-batches-py`` (or its parent)
   or an ``ImageFolder`` tree ``train/<class>/*``, ``test/<class>/*``;
2. the official dataset through ``torchvision.datasets.CIFAR10`` under ``~/.cache/explorer``,
   downloaded when missing and the network allows.

Decoded images are cached as uint8 arrays under ``~/.cache/explorer`` (or
``EXPLORER_CACHE``), keyed by a fingerprint of the source files, so a second start loads in
about a second. Every load carries a :class:`DatasetIdentity` (name + content fingerprint)
that checkpoints record.
"""
from __future__ import annotations

import os
import pickle
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .digest import digest

CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
# Per-channel mean/std of the official CIFAR-10 training images, in [0, 1] units.
MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
ENV_DATA = "EXPLORER_DATA"
ENV_CACHE = "EXPLORER_CACHE"
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


class DataNotFoundError(RuntimeError):
    """No usable CIFAR-10 copy: the message says how to point at one."""


@dataclass(frozen=True)
class DatasetIdentity:
    """What a checkpoint was trained on: a short name and a content fingerprint (sha256 prefix
    of the decoded uint8 images and labels)."""

    name: str
    fingerprint: str

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.name} [{self.fingerprint}]"


@dataclass(frozen=True)
class CIFAR10Tensors:
    """CIFAR-10 in memory.

    train_images: (50000, 3, 32, 32) uint8; train_labels: (50000,) int64;
    test_images: (10000, 3, 32, 32) uint8; test_labels: (10000,) int64 (sizes for the full set).
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    identity: DatasetIdentity
    classes: tuple[str, ...] = CLASSES


def cache_dir() -> Path:
    """Where decoded datasets and downloads live: ``$EXPLORER_CACHE`` or ``~/.cache/explorer``."""
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "explorer")


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) in [0, 255] -> float32 (N, 3, H, W), standardised with CIFAR-10 MEAN/STD."""
    mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    return (images.float() - mean) / std


def augment(images: torch.Tensor, generator: torch.Generator, padding: int = 4, cutout: int = 0) -> torch.Tensor:
    """Batched CIFAR augmentation on uint8 (N, 3, H, W): random crop with ``padding`` zero pixels
    each side, horizontal flip with p=0.5 (He et al. 2016, section 4.2), and optionally Cutout
    of a ``cutout`` x ``cutout`` square (DeVries & Taylor 2017, arXiv:1708.04552).

    Done with tensor indexing on the whole batch (no per-image PIL calls). Returns a new tensor of
    the same shape and dtype; draws all randomness from ``generator``.
    """
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = dy[:, None] + torch.arange(h)[None, :]  # (N, H)
    cols = dx[:, None] + torch.arange(w)[None, :]  # (N, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch_idx = torch.arange(n)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch_idx, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    out = out.permute(0, 3, 1, 2).contiguous()
    if cutout > 0:
        cy = torch.randint(0, h, (n,), generator=generator)
        cx = torch.randint(0, w, (n,), generator=generator)
        ys = torch.arange(h)[None, :, None]
        xs = torch.arange(w)[None, None, :]
        # Rows cy - cutout//2 .. cy - cutout//2 + cutout - 1 (likewise columns): a cutout x cutout square
        # centred on (cy, cx), clipped at the borders, for odd and even sizes alike.
        half = cutout // 2
        dy_, dx_ = ys - cy[:, None, None], xs - cx[:, None, None]
        mask = (dy_ >= -half) & (dy_ < cutout - half) & (dx_ >= -half) & (dx_ < cutout - half)
        # Cut pixels become the dataset mean, i.e. zero after normalisation.
        mean = torch.tensor(MEAN).mul(255).round().to(out.dtype).view(1, 3, 1, 1)
        out = torch.where(mask[:, None], mean, out)
    return out


# ---------------------------------------------------------------- sources

def _find_batches_dir(root: Path) -> Path | None:
    for cand in (root, root / "cifar-10-batches-py"):
        if (cand / "data_batch_1").is_file() and (cand / "test_batch").is_file():
            return cand
    return None


def _is_image_folder(root: Path) -> bool:
    return all((root / split / cls).is_dir() for split in ("train", "test") for cls in CLASSES)


def _listing_key(files: list[Path], root: Path) -> str:
    lines = []
    for f in files:
        st = f.stat()
        lines.append(f"{f.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n")
    return digest(*lines, algorithm="sha256", length=16)


def _content_fingerprint(*arrays: np.ndarray) -> str:
    return digest(*arrays, algorithm="sha256", length=16)


def _read_batches(batches: Path) -> dict[str, np.ndarray]:
    def read(names):
        xs, ys = [], []
        for name in names:
            with open(batches / name, "rb") as f:
                # The official pickles hold only numpy arrays and lists.
                d = pickle.load(f, encoding="latin1")
            xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d["labels"], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    trx, try_ = read([f"data_batch_{i}" for i in range(1, 6)])
    tex, tey = read(["test_batch"])
    return {"train_images": trx, "train_labels": try_, "test_images": tex, "test_labels": tey}


def _read_image_folder(root: Path, files_by_split: dict[str, list[Path]]) -> dict[str, np.ndarray]:
    from PIL import Image
    from tqdm import tqdm

    out = {}
    total = sum(len(v) for v in files_by_split.values())
    with tqdm(total=total, desc=f"decoding {root.name}", unit="img", leave=False) as bar:
        for split, files in files_by_split.items():
            images = np.empty((len(files), 3, 32, 32), dtype=np.uint8)
            labels = np.empty(len(files), dtype=np.int64)
            index = {c: i for i, c in enumerate(CLASSES)}
            for i, f in enumerate(files):
                with Image.open(f) as im:
                    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
                if arr.shape != (32, 32, 3):
                    raise DataNotFoundError(f"{f}: expected a 32x32 RGB image, got shape {arr.shape}")
                images[i] = arr.transpose(2, 0, 1)
                labels[i] = index[f.parent.name]
                bar.update(1)
            out[f"{split}_images"], out[f"{split}_labels"] = images, labels
    return out


def _image_folder_files(root: Path) -> dict[str, list[Path]]:
    return {
        split: sorted(
            p for cls in CLASSES for p in (root / split / cls).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES
        )
        for split in ("train", "test")
    }


_CACHE_ARRAYS = {"train_images": (np.uint8, (3, 32, 32)), "train_labels": (np.int64, ()),
                 "test_images": (np.uint8, (3, 32, 32)), "test_labels": (np.int64, ())}


def _fingerprint_of(arrays: dict[str, np.ndarray]) -> str:
    return _content_fingerprint(*(arrays[k] for k in _CACHE_ARRAYS))


def read_cache(path: Path) -> tuple[dict[str, np.ndarray] | None, str]:
    """The arrays of a decode-cache file and "" when it is intact and holds what it claims, else
    (None, why). Intact: a readable ``.npz`` (zip CRCs checked) with the four arrays of
    :class:`CIFAR10Tensors` in their dtypes and shapes (images (N, 3, 32, 32) uint8, labels (N,)
    int64 in 0..9), and a stored ``fingerprint`` equal to the one recomputed from those arrays (so a
    file rewritten with other images never passes as the dataset it names). Never raises."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in (*_CACHE_ARRAYS, "fingerprint")}
    except Exception as e:  # any damage (cut short, emptied, bad CRC, missing member...) means rebuild
        return None, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dtype != np.uint8 or images.shape[1:] != (3, 32, 32) or labels.dtype != np.int64 \
                or labels.shape != (len(images),) or (len(labels) and not 0 <= labels.min() <= labels.max() < 10):
            return None, f"{split} arrays have the wrong shape or type"
    if arrays["fingerprint"].shape != () or str(arrays["fingerprint"]) != _fingerprint_of(arrays):
        return None, "its images do not match the fingerprint it records"
    return arrays, ""


def _load_cached(key: str, name: str, reader) -> CIFAR10Tensors:
    path = cache_dir() / f"cifar10-{key}.npz"
    arrays, damage = read_cache(path) if path.is_file() else (None, "")
    if arrays is None:
        if damage:
            print(f"warning: decoded-data cache {path} is damaged ({damage[:200]}); rebuilding it", file=sys.stderr)
        arrays = reader()
        arrays["fingerprint"] = np.array(_fingerprint_of(arrays))
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
        except OSError as e:  # a read-only or full cache only costs speed
            tmp.unlink(missing_ok=True)
            if damage:  # ...but a damaged file left in place would be decoded around on every start
                print(f"warning: could not rewrite {path} ({e.strerror or e}); delete it, or set {ENV_CACHE} "
                      f"to a writable directory", file=sys.stderr)
    return CIFAR10Tensors(
        train_images=torch.from_numpy(arrays["train_images"]),
        train_labels=torch.from_numpy(arrays["train_labels"]),
        test_images=torch.from_numpy(arrays["test_images"]),
        test_labels=torch.from_numpy(arrays["test_labels"]),
        identity=DatasetIdentity(name, str(arrays["fingerprint"])),
    )


def _load_local(root: Path) -> CIFAR10Tensors:
    batches = _find_batches_dir(root)
    if batches is not None:
        files = sorted(batches.glob("*_batch*"))
        return _load_cached(_listing_key(files, batches), "CIFAR-10", lambda: _read_batches(batches))
    if _is_image_folder(root):
        files_by_split = _image_folder_files(root)
        all_files = files_by_split["train"] + files_by_split["test"]
        if not all_files:
            raise DataNotFoundError(f"{root} has the ImageFolder class folders but no images in them")
        name = "CIFAR-10 (JPEG copy)" if all_files[0].suffix.lower() in {".jpg", ".jpeg"} else "CIFAR-10 (image folder)"
        return _load_cached(_listing_key(all_files, root), name, lambda: _read_image_folder(root, files_by_split))
    raise DataNotFoundError(
        f"{root} holds neither the official 'cifar-10-batches-py' nor an ImageFolder tree "
        f"'train/<class>/*', 'test/<class>/*' with the classes {', '.join(CLASSES)}. "
        f"Pass --data DIR or set EXPLORER_DATA=DIR to a directory that does."
    )


_HELP = (
    "CIFAR-10 not found and it could not be downloaded ({why}). Point at a local copy: "
    "pass --data DIR or set EXPLORER_DATA=DIR, where DIR holds the official 'cifar-10-batches-py' "
    "(from https://www.cs.toronto.edu/~kriz/cifar.html) or an ImageFolder tree train/<class>/*, test/<class>/*."
)


def resolve_root(root: str | os.PathLike | None = None) -> Path | None:
    """The local dataset directory to use: ``root`` if given, else ``$EXPLORER_DATA``, else None."""
    root = root or os.environ.get(ENV_DATA)
    return Path(root).expanduser() if root else None


def load_cifar10(root: str | os.PathLike | None = None, download: bool = True) -> CIFAR10Tensors:
    """Load CIFAR-10 train and test splits as uint8 tensors with labels and a dataset identity.

    root: local directory (official batches or ImageFolder tree); defaults to ``$EXPLORER_DATA``.
    Without either, uses ``torchvision.datasets.CIFAR10`` under the cache dir, downloading if allowed.

    Raises DataNotFoundError with the fix in its message when no copy is usable.
    """
    local = resolve_root(root)
    if local is not None:
        if not local.exists():
            raise DataNotFoundError(_HELP.format(why=f"{local} does not exist"))
        return _load_local(local)
    official = cache_dir() / "cifar-10-batches-py"
    if _find_batches_dir(official) is None:
        if not download:
            raise DataNotFoundError(_HELP.format(why="downloading is off"))
        try:
            import torchvision

            torchvision.datasets.CIFAR10(str(cache_dir()), train=True, download=True)
        except Exception as e:  # network errors come in many types (URLError, socket, SSL)
            raise DataNotFoundError(_HELP.format(why=f"{type(e).__name__}: {e}")) from None
    return _load_local(official)


def synthetic_cifar10(n_train: int = 256, n_test: int = 128, seed: int = 0) -> CIFAR10Tensors:
    """Small random, learnable CIFAR-shaped data for unit tests: each class has its own mean colour
    plus noise. Shapes as :class:`CIFAR10Tensors` with the given sizes."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(40, 216, (10, 3, 1, 1), generator=g)

    def make(n):
        y = torch.arange(n) % 10
        x = base[y] + torch.randint(-40, 41, (n, 3, 32, 32), generator=g)
        return x.clamp(0, 255).to(torch.uint8), y

    trx, try_ = make(n_train)
    tex, tey = make(n_test)
    fp = _content_fingerprint(trx.numpy(), try_.numpy(), tex.numpy(), tey.numpy())
    return CIFAR10Tensors(trx, try_, tex, tey, DatasetIdentity("synthetic", fp))
