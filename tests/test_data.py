"""CIFAR-10 sources, decode cache, normalisation and batched augmentation."""
from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from explorer import data as data_mod
from explorer.data import (
    CLASSES,
    MEAN,
    STD,
    DataNotFoundError,
    augment,
    cache_dir,
    load_cifar10,
    normalize,
    synthetic_cifar10,
)

MEAN_COLOUR = (125, 123, 114)  # round(255 * MEAN)


# ---------------------------------------------------------------- normalize

def test_normalize_known_values():
    x = torch.zeros(2, 3, 2, 2, dtype=torch.uint8)
    x[1] = 255
    x[0, :, 1, 1] = torch.tensor([125, 123, 114], dtype=torch.uint8)
    out = normalize(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    # 255 in channel 0: (1 - 0.4914) / 0.2470
    assert out[1, 0, 0, 0].item() == pytest.approx(2.059109, abs=1e-5)
    assert out[1, 1, 0, 0].item() == pytest.approx((1 - 0.4822) / 0.2435, abs=1e-5)
    assert out[0, 2, 0, 0].item() == pytest.approx(-0.4465 / 0.2616, abs=1e-5)
    for c in range(3):
        assert out[0, c, 0, 0].item() == pytest.approx(-MEAN[c] / STD[c], abs=1e-5)
        assert out[1, c, 1, 1].item() == pytest.approx((1 - MEAN[c]) / STD[c], abs=1e-5)
        # the mean colour is (almost) zero after normalisation
        assert abs(out[0, c, 1, 1].item()) < 0.01
    assert torch.equal(x, normalize(x).mul(torch.tensor(STD).view(1, 3, 1, 1) * 255)
                       .add(torch.tensor(MEAN).view(1, 3, 1, 1) * 255).round().to(torch.uint8))


# ---------------------------------------------------------------- augment

def _images(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


def test_augment_shape_dtype_and_input_untouched():
    x = _images()
    before = x.clone()
    out = augment(x, torch.Generator().manual_seed(0), cutout=8)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(x, before)
    assert not torch.equal(out, x)


def test_augment_deterministic_for_a_seed():
    x = _images()
    a = augment(x, torch.Generator().manual_seed(123), cutout=8)
    b = augment(x, torch.Generator().manual_seed(123), cutout=8)
    c = augment(x, torch.Generator().manual_seed(124), cutout=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_augment_padding0_is_identity_or_horizontal_flip():
    x = _images(64)
    out = augment(x, torch.Generator().manual_seed(5), padding=0)
    kinds = []
    for i in range(len(x)):
        if torch.equal(out[i], x[i]):
            kinds.append("same")
        elif torch.equal(out[i], x[i].flip(-1)):
            kinds.append("flip")
        else:
            pytest.fail(f"image {i} is neither the input nor its horizontal flip")
    # p = 0.5 flips: with 64 images both must occur, and not wildly unbalanced.
    assert 10 <= kinds.count("flip") <= 54


def test_augment_crop_is_a_window_of_the_zero_padded_image():
    x = _images(16, seed=1)
    pad = 4
    out = augment(x, torch.Generator().manual_seed(7), padding=pad)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    offsets = set()
    for i in range(len(x)):
        found = [(dy, dx, f) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for f in (False, True)
                 if torch.equal(out[i], (lambda w: w.flip(-1) if f else w)(padded[i, :, dy:dy + 32, dx:dx + 32]))]
        assert found, f"image {i} is not a (flipped) 32x32 window of the padded image"
        offsets.add(found[0][:2])
    assert len(offsets) > 1  # the offsets are random, not fixed


@pytest.mark.parametrize("size", [5, 8])
def test_cutout_sets_a_square_to_the_mean_colour(size):
    n = 64
    x = torch.full((n, 3, 32, 32), 7, dtype=torch.uint8)  # flips and padding=0 crops leave it unchanged
    out = augment(x, torch.Generator().manual_seed(11), padding=0, cutout=size)
    mean = torch.tensor(MEAN_COLOUR, dtype=torch.uint8).view(3, 1, 1)
    interior = 0
    for i in range(n):
        cut = (out[i] != 7).any(0)
        assert cut.any(), f"image {i}: nothing was cut out"
        # every pixel is either untouched or exactly the mean colour, in all three channels
        assert torch.equal(out[i][:, cut], mean.view(3, 1).expand(3, int(cut.sum())))
        assert torch.equal(out[i][:, ~cut], torch.full((3, int((~cut).sum())), 7, dtype=torch.uint8))
        rows = torch.nonzero(cut.any(1)).flatten()
        cols = torch.nonzero(cut.any(0)).flatten()
        r0, r1, c0, c1 = rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()
        # a filled axis-aligned rectangle, at most size x size (clipped at the borders)
        assert int(cut.sum()) == (r1 - r0 + 1) * (c1 - c0 + 1)
        assert r1 - r0 + 1 <= size and c1 - c0 + 1 <= size
        if r0 > 0 and c0 > 0 and r1 < 31 and c1 < 31:
            interior += 1
            assert (r1 - r0 + 1, c1 - c0 + 1) == (size, size), f"image {i}: cut {r1 - r0 + 1}x{c1 - c0 + 1}"
    assert interior >= 10


def test_cutout_zero_changes_nothing_beyond_crop_and_flip():
    x = _images(8)
    a = augment(x, torch.Generator().manual_seed(3), cutout=0)
    b = augment(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# ---------------------------------------------------------------- synthetic

def test_synthetic_shapes_and_fingerprint_stable():
    a = synthetic_cifar10(40, 20, seed=3)
    b = synthetic_cifar10(40, 20, seed=3)
    c = synthetic_cifar10(40, 20, seed=4)
    assert a.train_images.shape == (40, 3, 32, 32) and a.train_images.dtype == torch.uint8
    assert a.test_images.shape == (20, 3, 32, 32)
    assert torch.equal(a.train_labels, torch.arange(40) % 10)
    assert a.identity == b.identity and a.identity.name == "synthetic"
    assert a.identity.fingerprint != c.identity.fingerprint


# ---------------------------------------------------------------- ImageFolder tree

def _pixel(split: str, cls: int, i: int) -> tuple[int, int, int]:
    return (10 * cls + i, 100 + (split == "test") * 50 + i, 255 - 10 * cls)


def _make_image_folder(root, n_train=2, n_test=1, suffix=".png", bad=None):
    for split, n in (("train", n_train), ("test", n_test)):
        for c, cls in enumerate(CLASSES):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                arr = np.empty((32, 32, 3), dtype=np.uint8)
                arr[:] = _pixel(split, c, i)
                arr[0, 0] = (1, 2, 3)  # one odd pixel, to catch transposes
                Image.fromarray(arr).save(d / f"{i:04d}{suffix}")
    if bad is not None:
        Image.new("RGB", (16, 16)).save(root / "train" / CLASSES[0] / bad)
    (root / "train" / CLASSES[0] / "notes.txt").write_text("ignored: not an image")
    return root


def _expected_folder_arrays(split, n):
    imgs, labels = [], []
    for c in range(10):
        for i in range(n):
            a = np.empty((3, 32, 32), dtype=np.uint8)
            a[:] = np.array(_pixel(split, c, i), dtype=np.uint8).reshape(3, 1, 1)
            a[:, 0, 0] = (1, 2, 3)
            imgs.append(a)
            labels.append(c)
    return torch.from_numpy(np.stack(imgs)), torch.tensor(labels)


def test_load_image_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPLORER_CACHE", str(tmp_path / "cache"))
    root = _make_image_folder(tmp_path / "tree")
    d = load_cifar10(root)
    assert d.train_images.shape == (20, 3, 32, 32) and d.train_images.dtype == torch.uint8
    assert d.test_images.shape == (10, 3, 32, 32)
    assert d.train_labels.dtype == torch.int64
    assert d.train_labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert d.test_labels.tolist() == list(range(10))
    exp_train, _ = _expected_folder_arrays("train", 2)
    exp_test, _ = _expected_folder_arrays("test", 1)
    assert torch.equal(d.train_images, exp_train)  # PNG is lossless
    assert torch.equal(d.test_images, exp_test)
    assert d.identity.name == "CIFAR-10 (image folder)"
    assert re.fullmatch(r"[0-9a-f]{16}", d.identity.fingerprint)
    assert d.classes == CLASSES


def test_image_folder_cache_and_stable_fingerprint(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("EXPLORER_CACHE", str(cache))
    assert cache_dir() == cache
    root = _make_image_folder(tmp_path / "tree")
    first = load_cifar10(root)
    npz = sorted(cache.glob("cifar10-*.npz"))
    assert len(npz) == 1
    assert not list(cache.glob("*.tmp*"))

    # A second load must come from the cache: decoding is made impossible.
    def no_decode(*a, **k):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(data_mod, "_read_image_folder", no_decode)
    second = load_cifar10(root)
    assert second.identity == first.identity
    assert torch.equal(second.train_images, first.train_images)
    assert torch.equal(second.test_labels, first.test_labels)
    monkeypatch.undo()

    # Same content in another place, decoded afresh into another cache: same fingerprint.
    monkeypatch.setenv("EXPLORER_CACHE", str(tmp_path / "cache2"))
    other = load_cifar10(_make_image_folder(tmp_path / "copy"))
    assert other.identity == first.identity
    # Different content: different fingerprint.
    third = _make_image_folder(tmp_path / "changed")
    arr = np.zeros((32, 32, 3), dtype=np.uint8)
    Image.fromarray(arr).save(third / "test" / "cat" / "0000.png")
    assert load_cifar10(third).identity.fingerprint != first.identity.fingerprint


def test_image_folder_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("EXPLORER_CACHE", str(cache))
    root = _make_image_folder(tmp_path / "tree")
    first = load_cifar10(root)
    (npz,) = cache.glob("cifar10-*.npz")
    npz.write_bytes(b"not a zip file")
    again = load_cifar10(root)
    assert again.identity == first.identity
    assert torch.equal(again.train_images, first.train_images)


def test_image_folder_wrong_size_image_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPLORER_CACHE", str(tmp_path / "cache"))
    root = _make_image_folder(tmp_path / "tree", bad="9999.png")
    with pytest.raises(DataNotFoundError, match="32x32"):
        load_cifar10(root)


def test_image_folder_from_env_var(tmp_path, monkeypatch):
    root = _make_image_folder(tmp_path / "tree", n_train=1)
    monkeypatch.setenv("EXPLORER_DATA", str(root))
    d = load_cifar10()
    assert d.train_images.shape == (10, 3, 32, 32)


# ---------------------------------------------------------------- official batches

def _make_batches(parent, per_batch=3, n_test=4):
    d = parent / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, n)]
        with open(d / name, "wb") as f:
            pickle.dump({"data": x, "labels": y, "batch_label": name}, f)
        written[name] = (x, y)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CLASSES)}, f)
    return d, written


@pytest.mark.parametrize("point_at", ["parent", "batches"])
def test_load_official_batches(tmp_path, monkeypatch, point_at):
    monkeypatch.setenv("EXPLORER_CACHE", str(tmp_path / "cache"))
    batches, written = _make_batches(tmp_path / "official")
    d = load_cifar10(batches.parent if point_at == "parent" else batches)
    train_x = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_y = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert d.train_images.shape == (15, 3, 32, 32) and d.train_images.dtype == torch.uint8
    assert d.test_images.shape == (4, 3, 32, 32)
    assert torch.equal(d.train_images, torch.from_numpy(train_x.reshape(-1, 3, 32, 32)))
    # channel-major rows: the first 1024 bytes are the red plane
    assert torch.equal(d.train_images[0, 0].flatten(), torch.from_numpy(train_x[0, :1024]))
    assert d.train_labels.tolist() == train_y
    assert d.test_labels.tolist() == written["test_batch"][1]
    assert d.test_labels.dtype == torch.int64
    assert d.identity.name == "CIFAR-10"
    assert re.fullmatch(r"[0-9a-f]{16}", d.identity.fingerprint)
    assert len(list((tmp_path / "cache").glob("cifar10-*.npz"))) == 1
    assert load_cifar10(batches).identity == d.identity


# ---------------------------------------------------------------- errors

def test_missing_directory_raises_with_fix(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        load_cifar10(tmp_path / "does-not-exist")
    msg = str(info.value)
    assert "EXPLORER_DATA" in msg and "--data" in msg
    assert "does-not-exist" in msg


def test_missing_directory_from_env_var_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPLORER_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataNotFoundError, match="EXPLORER_DATA"):
        load_cifar10()


def test_directory_without_dataset_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="ImageFolder"):
        load_cifar10(tmp_path / "empty")


def test_no_local_copy_and_no_download_raises(tmp_path, monkeypatch):
    monkeypatch.delenv("EXPLORER_DATA", raising=False)
    monkeypatch.setenv("EXPLORER_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(DataNotFoundError) as info:
        load_cifar10(download=False)
    assert "EXPLORER_DATA" in str(info.value) and "--data" in str(info.value)


# ---------------------------------------------------------------- the real JPEG copy

@pytest.mark.realdata
def test_real_jpeg_copy(jpeg_root):
    d = load_cifar10(jpeg_root)
    assert d.train_images.shape == (50000, 3, 32, 32) and d.train_images.dtype == torch.uint8
    assert d.test_images.shape == (10000, 3, 32, 32) and d.test_images.dtype == torch.uint8
    assert d.train_labels.shape == (50000,) and d.test_labels.shape == (10000,)
    assert torch.bincount(d.train_labels, minlength=10).tolist() == [5000] * 10
    assert torch.bincount(d.test_labels, minlength=10).tolist() == [1000] * 10
    assert d.identity.name == "CIFAR-10 (JPEG copy)"
    assert re.fullmatch(r"[0-9a-f]{16}", d.identity.fingerprint)
    # labels in class order, and real photos rather than blank images
    assert d.train_labels[:5000].eq(0).all() and d.train_labels[-5000:].eq(9).all()
    per_channel = d.train_images[:5000].float().mean(dim=(0, 2, 3)) / 255
    assert per_channel.std() > 0  # not gray
    assert 0.3 < d.train_images[::50].float().mean().item() / 255 < 0.7
