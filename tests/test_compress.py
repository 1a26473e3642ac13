"""The structurally compressed net (explorer.compress): equivalence with apply(), shapes, MACs and
parameter counts, save/load and ONNX. Random ResNet20s with randomised BatchNorms; one torch thread."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from explorer import checkpoints as ckpt
from explorer.clustering import ClusteringConfig, apply, cluster_model, prune
from explorer.compress import (
    CompressedResNet20,
    count_macs,
    compress,
    export_onnx,
    load_compressed,
    report,
    save_compressed,
)
from explorer.data import synthetic_cifar10
from explorer.model import CONV_LAYERS, conv_layer, count_parameters, resnet20

from _models import randomized_model

torch.set_num_threads(1)

BASELINE_MACS = 40_551_040  # checked against FlopCounterMode and the hand formula below
BASELINE_PARAMS = 269_722


def hand_macs(specs) -> int:
    """sum over convs of filters * in_channels * 9 * Hout * Wout, plus the 64 x 10 classifier."""
    total, h = 0, 32
    for s in specs:
        h //= s.stride
        total += s.filters * s.in_channels * 9 * h * h
    return total + 64 * 10


def hand_params(specs) -> int:
    """conv weights + (gathered: scale and shift per output channel; else one bias per filter) + fc."""
    total = 0
    for s in specs:
        total += s.filters * s.in_channels * 9 + (2 * s.out_channels if s.gathered else s.filters)
    return total + 64 * 10 + 10


@pytest.fixture(scope="module")
def model():
    return randomized_model(0)


@pytest.fixture(scope="module")
def x():
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def calib():
    return synthetic_cifar10(96, 10, seed=4).train_images


MIXED = {"conv1": 5, "layer1.0.conv1": 3, "layer1.0.conv2": 7, "layer1.2.conv1": 1, "layer2.0.conv1": 9,
         "layer2.1.conv2": 4, "layer2.2.conv1": 31, "layer3.0.conv1": 12, "layer3.2.conv1": 40,
         "layer3.2.conv2": 64}

CONFIGS = {
    "euclid-k3": ClusteringConfig.uniform(3),
    "cosine-k5": ClusteringConfig.uniform(5, metric="cosine"),
    "euclid-fold-k4": ClusteringConfig.uniform(4, fold_bn=True),
    "cosine-fold-k6": ClusteringConfig.uniform(6, metric="cosine", fold_bn=True),
    "euclid-mixed": ClusteringConfig(ks=MIXED),
    "cosine-fold-mixed": ClusteringConfig(ks=MIXED, metric="cosine", fold_bn=True),
    "euclid-fold-mixed-recal": ClusteringConfig(ks=MIXED, fold_bn=True, recalibrate_bn=96),
    "cosine-recal-k8": ClusteringConfig.uniform(8, metric="cosine", recalibrate_bn=64),
    "kernel-k4": ClusteringConfig.uniform(4, granularity="kernel"),
    "kernel-cosine-fold-mixed": ClusteringConfig(ks=MIXED, granularity="kernel", metric="cosine", fold_bn=True),
    "none": ClusteringConfig(),
}


def clustered(model, cfg, calib):
    c = cluster_model(model, cfg)
    return apply(model, c, calib if cfg.recalibrate_bn else None), c


# ---------------------------------------------------------------- equivalence

@pytest.mark.parametrize("name", list(CONFIGS))
def test_compressed_logits_match_apply(model, x, calib, name):
    cfg = CONFIGS[name]
    ref_model, c = clustered(model, cfg, calib)
    small = compress(ref_model, c)
    assert isinstance(small, CompressedResNet20) and not small.training
    with torch.no_grad():
        ref, out = ref_model(x), small(x)
    assert ref.abs().max() > 0.5  # logits of a meaningful size
    assert ref.std(0).max() > 1e-2  # ...that depend on the input
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    # also in channels_last, as the evaluator feeds it
    with torch.no_grad():
        torch.testing.assert_close(small(x.contiguous(memory_format=torch.channels_last)), ref, rtol=0, atol=1e-4)
    assert count_macs(small) == hand_macs(small.specs)
    assert count_parameters(small) == hand_params(small.specs)
    if cfg.active and cfg.granularity == "filter":
        assert count_macs(small) < BASELINE_MACS


def test_clustering_changes_the_logits(model, x, calib):
    """Guard for the equivalence test: clustering must actually change the model."""
    with torch.no_grad():
        base = model(x)
        for name in ("euclid-k3", "cosine-fold-mixed", "kernel-k4"):
            m, _ = clustered(model, CONFIGS[name], calib)
            assert (m(x) - base).abs().max() > 1e-2, name


@pytest.mark.parametrize("name", ["euclid-fold-k4", "cosine-fold-k6", "cosine-fold-mixed", "euclid-fold-mixed-recal"])
def test_fold_bn_shrinks_both_convs_of_a_block(model, calib, name):
    cfg = CONFIGS[name]
    ref_model, c = clustered(model, cfg, calib)
    small = compress(ref_model, c)
    specs = {s.name: s for s in small.specs}
    for layer in CONV_LAYERS:
        s, k = specs[layer.name], cfg.ks.get(layer.name, layer.filters)
        assert s.filters == k, layer.name
        if layer.residual:
            # the stem and each block's conv2 write the residual stream: gathered back to full width
            assert s.out_channels == layer.filters
            assert s.gathered == (k < layer.filters)
        else:
            assert s.out_channels == k and not s.gathered  # merged: only k channels
            conv2 = specs[layer.name[:-1] + "2"]
            assert conv2.in_channels == k  # conv2 reads the k merged channels
    assert count_macs(small) < BASELINE_MACS


def test_without_fold_bn_only_gathers(model, calib):
    ref_model, c = clustered(model, CONFIGS["euclid-k3"], calib)
    for s in compress(ref_model, c).specs:
        layer = conv_layer(s.name)
        assert s.filters == 3 and s.out_channels == layer.filters and s.in_channels == layer.filter_shape[0]
        assert s.gathered


@pytest.mark.parametrize("clustering", ["none", "empty"])
def test_unclustered_compress_has_19_full_width_convs(model, x, clustering):
    c = None if clustering == "none" else cluster_model(model, ClusteringConfig())
    small = compress(model, c)
    assert len(small.specs) == 19
    assert len([m for m in small.modules() if isinstance(m, torch.nn.Conv2d)]) == 19
    for s, layer in zip(small.specs, CONV_LAYERS):
        assert s.name == layer.name
        assert (s.filters, s.out_channels, s.in_channels, s.stride) == (
            layer.filters, layer.filters, layer.filter_shape[0], layer.stride)
        assert not s.gathered
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-4)
    assert count_macs(small) == BASELINE_MACS
    # BN folded into a bias: 2 * Cout BN parameters become Cout biases
    assert count_parameters(small) == BASELINE_PARAMS - sum(c.filters for c in CONV_LAYERS)


def test_compress_does_not_mutate_its_input(model, calib):
    ref_model, c = clustered(model, CONFIGS["cosine-fold-mixed"], calib)
    before = {k: v.clone() for k, v in ref_model.state_dict().items()}
    compress(ref_model, c)
    for k, v in ref_model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_cosine_with_a_zero_filter_stays_finite(x):
    """A dead (all-zero) filter has no direction; the compressed net must not divide by its norm."""
    m = randomized_model(7)
    with torch.no_grad():
        m.layer1[0].conv1.weight[:3].zero_()
        m.layer2[0].conv2.weight[5].zero_()
    for fold in (False, True):
        cfg = ClusteringConfig(ks={"layer1.0.conv1": 4, "layer2.0.conv2": 3}, metric="cosine", fold_bn=fold)
        ref_model, c = clustered(m, cfg, None)
        small = compress(ref_model, c)
        with torch.no_grad():
            out, ref = small(x), ref_model(x)
        assert torch.isfinite(out).all(), fold
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)


def test_prune_with_training_images_matches_compress(model, x):
    data = synthetic_cifar10(200, 10, seed=9)
    cfg = ClusteringConfig(ks={"conv1": 6, "layer1.1.conv1": 6, "layer2.1.conv1": 8, "layer3.2.conv2": 16},
                           fold_bn=True, recalibrate_bn=150)
    pruned, c = prune(model, cfg, data.train_images)
    with torch.no_grad():
        torch.testing.assert_close(compress(pruned, c)(x), pruned(x), rtol=0, atol=1e-4)
    # re-estimation really happened in the unclustered layers, and left the folded stem BN exact
    assert not torch.allclose(pruned.layer1[0].bn1.running_mean, model.layer1[0].bn1.running_mean)
    assert torch.equal(pruned.bn1.running_mean, torch.zeros(16))


# ---------------------------------------------------------------- MACs and parameters

def test_baseline_macs_per_image():
    m = resnet20()
    assert count_macs(m) == BASELINE_MACS
    total, h = 0, 32
    for layer in CONV_LAYERS:
        h //= layer.stride
        total += layer.filters * layer.filter_shape[0] * 9 * h * h
    assert total + 64 * 10 == BASELINE_MACS


def test_report_ratios_are_consistent(model, calib):
    ref_model, c = clustered(model, CONFIGS["cosine-fold-mixed"], calib)
    small = compress(ref_model, c)
    r = report(small, model)
    assert r.baseline_macs == BASELINE_MACS and r.baseline_params == BASELINE_PARAMS
    assert r.macs == hand_macs(small.specs) and r.params == hand_params(small.specs)
    assert r.params < r.baseline_params and r.macs < r.baseline_macs
    assert r.compression_ratio == pytest.approx(BASELINE_PARAMS / r.params)
    assert r.mac_reduction == pytest.approx(1 - r.macs / BASELINE_MACS)
    assert 0 < r.mac_reduction < 1
    assert r.latency is None
    d = r.to_dict()
    assert d["compression_ratio"] == r.compression_ratio and d["mac_reduction"] == r.mac_reduction
    assert [row["layer"] for row in d["layers"]] == [l.name for l in CONV_LAYERS]
    assert [row["filters"] for row in d["layers"]] == [s.filters for s in small.specs]


def test_uniform_k3_numbers_by_hand(model, calib):
    """Uniform k = 3 without fold_bn: every conv computes 3 filters over its full input."""
    ref_model, c = clustered(model, CONFIGS["euclid-k3"], calib)
    r = report(compress(ref_model, c), model)
    macs = 0
    params = 650
    h = 32
    for layer in CONV_LAYERS:
        h //= layer.stride
        macs += 3 * layer.filter_shape[0] * 9 * h * h
        params += 3 * layer.filter_shape[0] * 9 + 2 * layer.filters
    assert r.macs == macs + 640
    assert r.params == params


def test_report_latency(model):
    r = report(compress(model, cluster_model(model, ClusteringConfig.uniform(4))), model,
               latency_batches=(1, 2), repeats=1)
    assert set(r.latency) == {"b1", "b2"}
    for v in r.latency.values():
        assert v["compressed_s"] > 0 and v["baseline_s"] > 0
        assert v["speedup"] == pytest.approx(v["baseline_s"] / v["compressed_s"])


# ---------------------------------------------------------------- save / load / ONNX

@pytest.fixture(scope="module")
def small(model, calib):
    ref_model, c = clustered(model, CONFIGS["cosine-fold-mixed"], calib)
    return compress(ref_model, c)


def test_save_and_load_roundtrip(small, x, tmp_path):
    pt, js = save_compressed(small, tmp_path, "net", extra={"top1": 0.5})
    assert pt == tmp_path / "net.pt" and js == tmp_path / "net.json"
    meta = ckpt.read_json(js)
    assert meta["architecture"] == "resnet20-clustered" and meta["top1"] == 0.5 and len(meta["specs"]) == 19
    loaded = load_compressed(pt)
    assert loaded.specs == small.specs
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    # a plain state dict that the safe loader accepts
    state = torch.load(pt, weights_only=True)
    assert set(state) == set(small.state_dict())


def test_load_compressed_rejects_mismatches(small, tmp_path):
    pt, js = save_compressed(small, tmp_path, "net")
    meta = ckpt.read_json(js)
    meta["specs"][3]["filters"] += 1
    ckpt.save_json(meta, js)
    with pytest.raises(ckpt.CheckpointError, match="does not match its specs"):
        load_compressed(pt)
    ckpt.save_json({"architecture": "resnet20", "specs": []}, js)
    with pytest.raises(ckpt.CheckpointError, match="architecture is not"):
        load_compressed(pt)
    js.unlink()
    with pytest.raises(ckpt.CheckpointError, match="metadata file missing"):
        load_compressed(pt)


def test_onnx_export_matches_torch(small, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = export_onnx(small, tmp_path / "net.onnx")
    assert path.is_file()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["images"]
    xs = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    (out,) = sess.run(["logits"], {"images": xs.numpy()})
    assert out.shape == (3, 10)
    with torch.no_grad():
        ref = small(xs).numpy()
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)


def test_conv_width_table_times_each_pair():
    from explorer.analysis.latency import conv_width_table, format_conv_widths

    rows = conv_width_table((((8, 14, 14), (8, 16, 16)),), batch=4, repeats=2)
    (r,) = rows
    assert (r["shape"], r["padded"]) == ([8, 14, 14], [8, 16, 16])
    assert (r["macs"], r["padded_macs"]) == (4 * 9 * 64 * 14 * 14, 4 * 9 * 64 * 16 * 16)
    assert r["seconds"] > 0 and r["padded_over_as_is"] == r["padded_seconds"] / r["seconds"]
    line = format_conv_widths(rows).splitlines()[1].split()
    assert line[:4] == ["8x8", "14", "->", "14"] and line[-2] == f"{256 / 196:.2f}"
