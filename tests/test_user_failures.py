"""Failures found by using the product as a user would (issue 15, part 3), one test each that
fails on the code before the fix:

- a fine-tuned checkpoint holds fewer distinct filters in a layer than its filter count, and a k
  between the two gave a traceback in "Filters in 2D" (:mod:`explorer.limits`);
- a damaged decoded-data cache failed every start instead of being rebuilt;
- an unloadable checkpoint given to a command got torch's cut first line (colour codes, advice to
  turn the safe loader off) instead of one plain line with what to do;
- with nothing clustered the headline counted BatchNorm folding as a parameter saving;
- the confusion heatmaps named only every other predicted class.

The app tests run on a tiny image-folder copy of CIFAR-10 (20 train, 20 test images), so they
need neither the real data nor more than a few seconds.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from explorer import checkpoints as ckpt
from explorer import data as data_mod
from explorer import limits
from explorer.app import charts
from explorer.clustering import ClusteringConfig, ClusteringError
from explorer.compress import compress, report
from explorer.data import CLASSES, load_cifar10
from explorer.model import CONV_LAYERS, count_parameters, resnet20

REPO = Path(__file__).resolve().parent.parent
P58 = "resnet20_cifar10_p58_kd_ft"
STAGE1_CONV1 = ["layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1"]


def tiny_image_folder(root: Path, per_class: int = 2) -> Path:
    """An ImageFolder tree train/<class>/*.png, test/<class>/*.png with ``per_class`` random images
    per class and split (seeded, so its content fingerprint is fixed)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in CLASSES:
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i:04d}.png")
    return root


def p58_model():
    path = REPO / "checkpoints" / f"{P58}.pt"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    return ckpt.load_model(path)


# ---------------------------------------------------------------- distinct filters of a fine-tuned net

def test_limits_of_the_fine_tuned_checkpoint():
    model = p58_model()
    lim = limits.layer_limits(model, ClusteringConfig())
    assert [lim[n] for n in STAGE1_CONV1] == [9, 9, 9]
    assert lim["layer2.0.conv1"] == 19 and lim["layer3.0.conv1"] == 38 and lim["conv1"] == 16
    assert limits.layer_limits(model, ClusteringConfig(fold_bn=True, metric="cosine"))["layer1.0.conv1"] == 9
    assert limits.problems(model, ClusteringConfig(ks={"layer1.0.conv1": 9, "layer3.0.conv1": 38})) == []
    with pytest.raises(ClusteringError, match=r"layer1\.0\.conv1 holds 9 distinct filters \(of 16\), so k = 12 "
                                              r"cannot be clustered; choose k <= 9, or 16"):
        limits.check(model, ClusteringConfig(ks={"layer1.0.conv1": 12}))
    # k-means itself agrees: 9 clusters are possible, 10 are not
    from explorer.clustering import cluster_model

    cluster_model(model, ClusteringConfig(ks={"layer1.0.conv1": 9}))
    with pytest.raises(ClusteringError):
        cluster_model(model, ClusteringConfig(ks={"layer1.0.conv1": 10}))


def p58_tiny_env(monkeypatch, tmp_path, allow_training: bool = False) -> Path:
    """The app's environment: a tiny image folder, the shipped p58 fine-tuned checkpoint as the
    only one in its own checkpoint directory (returned), logs in ``tmp_path/logs``, exact fp32
    engine; the training/fine-tuning switch on or off."""
    src = REPO / "checkpoints"
    if not (src / f"{P58}.pt").is_file():
        pytest.skip(f"{P58}.pt missing")
    d = tmp_path / "ckpts"
    d.mkdir()
    for suffix in (".pt", ".json"):
        shutil.copy(src / f"{P58}{suffix}", d / f"{P58}{suffix}")
    monkeypatch.setenv("EXPLORER_CHECKPOINTS", str(d))
    monkeypatch.setenv("EXPLORER_DATA", str(tiny_image_folder(tmp_path / "tiny")))
    monkeypatch.setenv("EXPLORER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EXPLORER_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setenv("EXPLORER_ENGINE_PRECISION", "fp32")
    if allow_training:
        monkeypatch.setenv("EXPLORER_ALLOW_TRAINING", "1")
    else:
        monkeypatch.delenv("EXPLORER_ALLOW_TRAINING", raising=False)
    return d


@pytest.fixture
def tiny_app_env(monkeypatch, tmp_path):
    """The app on a tiny image folder with the shipped p58 fine-tuned checkpoint as its only one."""
    return p58_tiny_env(monkeypatch, tmp_path)


def make_app(params: dict):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=300)
    for k, v in params.items():
        at.query_params[k] = v
    return at


def no_exception(at) -> None:
    assert not at.exception, "\n".join(f"{e.message}\n{e.stack_trace}" for e in at.exception)


def test_app_layer_above_its_distinct_filters_gives_a_message_not_a_traceback(tiny_app_env):
    """p58's layer1.0.conv1 holds 9 distinct filters; with it open in "Filters in 2D" and its slider
    at 12, the page (2D view included) shows the clean message, and the slider names the limit."""
    at = make_app({"ckpt": P58, "layer": "layer1.0.conv1", "proj": "pca", "space": "weight",
                   "recovery": "none", "tab": "filters"}).run()
    no_exception(at)
    slider = at.slider(key="k.layer1.0.conv1")
    assert "k\u00a0≤\u00a09" in slider.label and "only 9 distinct filters" in slider.help
    assert "≤" not in at.slider(key="k.layer1.0.conv2").label
    slider.set_value(12).run()
    no_exception(at)
    errors = [e.value for e in at.error]
    assert errors and all("holds 9 distinct filters (of 16), so k = 12 cannot be clustered" in e for e in errors), errors
    assert not at.metric  # no half-drawn headline
    at.slider(key="k.layer1.0.conv1").set_value(9).run()  # at the limit: the net as it is
    no_exception(at)
    assert not at.error


def test_app_headline_nothing_clustered_saves_nothing(tiny_app_env):
    at = make_app({"ckpt": P58, "proj": "pca", "space": "weight", "recovery": "none"}).run()
    no_exception(at)
    m = next(m for m in at.metric if m.label == "Unique parameters")
    assert m.value == charts.count(269_722) and m.delta in (None, "")
    assert next(m for m in at.metric if m.label == "Compression ratio").value == "1.00×"


def test_tied_config_finds_the_checkpoints_own_clusters():
    p58 = limits.tied_config(p58_model())
    assert p58.active == {**{n: 9 for n in STAGE1_CONV1}, **{f"layer2.{b}.conv1": 19 for b in range(3)},
                          **{f"layer3.{b}.conv1": 38 for b in range(3)}}
    assert not p58.active_stream and (p58.space, p58.recovery) == ("weight", "none")
    path = REPO / "checkpoints" / "resnet20_cifar10_stream50_merged_ft.pt"
    if path.is_file():
        s = limits.tied_config(ckpt.load_model(path))
        assert s.active_stream == {1: 14, 2: 28, 3: 56} and s.fold_bn
        assert s.active == {f"layer{st}.{b}.conv1": k for st, k in ((1, 8), (2, 16), (3, 44)) for b in range(3)}
    assert limits.tied_config(resnet20()) is None  # nothing duplicated


def test_a_fine_tuned_checkpoint_offers_its_own_ties(tiny_app_env):
    """Unclustered, p58's headline counts the full-width form it is stored in; one button sets the
    sliders to its distinct filters and the headline shows the compressed net it is (its README
    figures: 159,888 unique parameters, 23,814,784 MACs)."""
    at = make_app({"ckpt": P58, "proj": "pca"}).run()
    no_exception(at)
    # the headline's baseline is p58 itself: the caption names the net it was reduced from
    assert any("(fine-tuned from **resnet20_cifar10**, 89.1% top-1)" in c.value for c in at.caption)
    button = at.button(key="tied_apply")
    assert button.label == "Cluster it as it was fine-tuned"
    button.click().run()
    no_exception(at)
    assert [at.slider(key=f"k.{n}").value for n in STAGE1_CONV1] == [9, 9, 9]
    assert at.slider(key="k.layer3.0.conv1").value == 38 and at.slider(key="k.layer1.0.conv2").value == 16
    assert (at.query_params["space"], at.query_params["recovery"]) == ("weight", "none")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Unique parameters"] == charts.count(159_888) and metrics["MACs / image"] == "23.81 M"
    assert not [b for b in at.button if b.key == "tied_apply"]  # at its ties: a caption, no button
    assert any("this checkpoint's own ties" in c.value for c in at.caption)


# ---------------------------------------------------------------- nothing clustered saves nothing

@pytest.mark.parametrize("config", [None, ClusteringConfig(ks={"layer1.0.conv1": 4}, granularity="kernel")],
                         ids=["unclustered", "kernel-granularity"])
def test_a_dense_net_reports_no_parameter_saving(config):
    from explorer.clustering import prune

    model = resnet20().eval()
    small = compress(model) if config is None else compress(*prune(model, config))
    rep = report(small, model)
    assert rep.params == rep.baseline_params == count_parameters(model) == 269_722
    assert rep.compression_ratio == 1.0
    clustered = compress(*prune(model, ClusteringConfig(ks={"layer3.2.conv2": 8})))
    assert report(clustered, model).params == count_parameters(clustered) < 269_722


# ---------------------------------------------------------------- confusion heatmaps

def _class_axes(spec: dict) -> list[dict]:
    """The axis settings of every class-valued x / y encoding of a Vega-Lite spec."""
    out = []
    for layer in spec.get("layer", [spec]):
        for ch in ("x", "y"):
            enc = layer.get("encoding", {}).get(ch)
            if isinstance(enc, dict) and enc.get("field") in ("class", "true", "predicted"):
                out.append(enc.get("axis") or {})
    return out


def test_class_charts_name_every_class():
    """Streamlit's theme sets labelOverlap: true, which drops every other rotated class name."""
    from explorer.analysis import charts as analysis_charts
    from test_app import _comparison

    m = np.arange(100).reshape(10, 10)
    cmp = _comparison()
    specs = [charts.confusion_chart(m, CLASSES, "t", kind).to_dict() for kind in ("counts", "delta")]
    specs += [charts.per_class_chart(cmp).to_dict(), charts.per_class_delta_chart(cmp).to_dict(),
              analysis_charts.baseline_per_class_chart(dict.fromkeys(CLASSES, 0.5)).to_dict()]
    for spec in specs:
        axes = _class_axes(spec)
        assert axes and all(a.get("labelOverlap") is False for a in axes), axes


# ---------------------------------------------------------------- damaged decode cache

def _damage(path: Path, how: str, good: dict) -> None:
    data = path.read_bytes()
    if how == "cut-short":
        path.write_bytes(data[: len(data) // 2])
    elif how == "emptied":
        path.write_bytes(b"")
    elif how == "overwritten-in-the-middle":
        mid = len(data) // 2
        path.write_bytes(data[:mid] + b"\xff" * 64 + data[mid + 64:])
    elif how == "other-images-same-claim":  # a valid npz whose images are not what its fingerprint names
        other = {k: v.copy() for k, v in good.items()}
        other["test_images"][0] ^= 0xFF
        np.savez(path.with_suffix(".tmp.npz"), **other)
        os.replace(path.with_suffix(".tmp.npz"), path)
    elif how == "missing-array":
        np.savez(path.with_suffix(".tmp.npz"), **{k: v for k, v in good.items() if k != "train_labels"})
        os.replace(path.with_suffix(".tmp.npz"), path)


@pytest.mark.parametrize("how", ["cut-short", "emptied", "overwritten-in-the-middle", "other-images-same-claim",
                                 "missing-array"])
def test_damaged_decode_cache_is_rebuilt(how, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("EXPLORER_CACHE", str(cache))
    root = tiny_image_folder(tmp_path / "tiny")
    first = load_cifar10(root)
    (npz,) = cache.glob("cifar10-*.npz")
    with np.load(npz) as z:
        good = {k: z[k] for k in z.files}
    _damage(npz, how, good)
    again = load_cifar10(root)
    assert again.identity == first.identity
    assert torch.equal(again.test_images, first.test_images) and torch.equal(again.train_labels, first.train_labels)
    warns = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]  # not tqdm's bar
    assert len(warns) == 1 and "is damaged" in warns[0] and "rebuilding it" in warns[0], warns
    # rebuilt on disk: the next start reads it without decoding a single image
    monkeypatch.setattr(data_mod, "_read_image_folder", lambda *a, **k: pytest.fail("decoded again"))
    third = load_cifar10(root)
    assert third.identity == first.identity and torch.equal(third.test_images, first.test_images)
    assert capsys.readouterr().err == ""


def test_damaged_cache_that_cannot_be_rewritten_still_loads(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("EXPLORER_CACHE", str(cache))
    root = tiny_image_folder(tmp_path / "tiny")
    first = load_cifar10(root)
    (npz,) = cache.glob("cifar10-*.npz")
    npz.write_bytes(b"")

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(np, "savez", refuse)
    again = load_cifar10(root)
    assert again.identity == first.identity
    warns = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]
    assert len(warns) == 2 and "could not rewrite" in warns[1] and "EXPLORER_CACHE" in warns[1], warns


# ---------------------------------------------------------------- unloadable checkpoints given to commands

def _numpy_pickle(p: Path) -> None:
    torch.save({"conv1.weight": np.zeros((16, 3, 3, 3), np.float32)}, p)


def _onnx(p: Path) -> None:
    src = REPO / "checkpoints" / "compressed" / f"{P58}.onnx"
    if src.is_file():
        shutil.copy(src, p)
    else:  # an ONNX ModelProto starts with field 1, ir_version (tag 0x08)
        p.write_bytes(b"\x08\x07\x12\x07pytorch" + os.urandom(200))


@pytest.mark.parametrize("name, make, needle", [
    ("weights.pt", _numpy_pickle, "holds pickled objects other than tensors (here numpy"),
    ("resnet20.json", lambda p: p.write_text(json.dumps({"architecture": "resnet20"})), "this is a JSON file"),
    ("model.onnx", _onnx, "this is an ONNX export"),
    ("empty.pt", lambda p: p.write_bytes(b""), "the file is empty"),
    ("cut.pt", lambda p: p.write_bytes(b"PK\x03\x04 truncated"), "not a readable PyTorch file"),
])
@pytest.mark.parametrize("command", ["prune", "sensitivity", "finetune"])
def test_commands_say_why_a_checkpoint_cannot_be_loaded(command, name, make, needle, tmp_path, monkeypatch, capsys):
    import importlib

    monkeypatch.setenv("EXPLORER_DATA", str(tmp_path / "no-data-needed"))  # the checkpoint fails first
    bad = tmp_path / name
    make(bad)
    argv = {"prune": ["--k", "3"], "sensitivity": ["--out", str(tmp_path / "s.json")],
            "finetune": ["--config", str(REPO / "checkpoints" / "resnet20_cifar10_p58.config.json"),
                         "--out", str(tmp_path / "out")]}[command]
    main = importlib.import_module(f"explorer.cli.{command}").main
    assert main([*argv, "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {name}: not a valid checkpoint: "), err
    assert needle in lines[0] and "\x1b" not in err and "weights_only" not in err and "PyTorch 2.6" not in err
    assert "pass " in lines[0]  # what to do


# ---------------------------------------------------------------- the 2D view in the data space

def test_2d_view_of_a_data_space_clustering():
    """The app's default space is the data space: the 2D view clusters with the layer's statistics
    on training images (it raised "space=data needs statistics" before), shows the very clusters
    the net uses, and draws each centroid at its members' mean in the map's weight space."""
    from explorer import projection
    from explorer.clustering import prune
    from explorer.data import synthetic_cifar10

    model, data = resnet20().eval(), synthetic_cifar10(64, 20)
    cfg = ClusteringConfig(ks={"layer2.0.conv1": 5}, space="data")
    with pytest.raises(ClusteringError, match="training images"):
        projection.layer_map(model, cfg, "layer2.0.conv1")
    lmap = projection.layer_map(model, cfg, "layer2.0.conv1", data.train_images)
    _, used = prune(model, cfg, data.train_images)
    np.testing.assert_array_equal(lmap.labels, used.layers["layer2.0.conv1"].labels)
    assert lmap.centroids.shape == (5, lmap.space.shape[1])
    np.testing.assert_allclose(lmap.centroids[0], lmap.space[lmap.labels == 0].mean(0), atol=1e-6)
    projection.embed(lmap.space, lmap.centroids, "pca")


# ---------------------------------------------------------------- analysis of a fine-tuned checkpoint

def test_sensitivity_of_a_fine_tuned_checkpoint_leaves_out_what_cannot_be_clustered(tmp_path, capsys):
    """p58's layer1.0.conv1 holds 9 distinct filters: a sweep with k = 12 in its grid measured
    nothing and stopped with a ClusteringError; now it measures the others and says what it left out."""
    from explorer.analysis.results import make_explorer
    from explorer.analysis.sensitivity import sweep
    from explorer.data import synthetic_cifar10

    exp = make_explorer(p58_model(), synthetic_cifar10(64, 20), P58)
    doc = sweep(exp, tmp_path / "s.json", layers=["layer1.0.conv1"], grid=(4, 9, 12), progress=True)
    assert sorted(r["k"] for r in doc["points"].values()) == [4, 9, 16]
    assert "1 points left out, above their layer's distinct filters (e.g. layer1.0.conv1 k = 12)" in capsys.readouterr().err
