"""The fast evaluation engine gives the same answers as a plain eager fp32 pass."""
from __future__ import annotations

import copy

import pytest
import torch

from explorer.clustering import ClusteringConfig, prune
from explorer.compress import compress
from explorer import engine
from explorer.analysis.benchmark import random_changes
from explorer.engine import (ActivationCache, FastEvaluator, _bf16_supported, flip_error, inference_form, stratified_subset,
                             unit_digests)
from explorer.evaluate import predict_logits
from explorer.model import resnet20


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(0)
    m = resnet20().eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return m


def _configs(seed, n):
    return [cfg for _, cfg in random_changes(seed, n)]


def test_fp32_and_mixed_match_eager_and_reuse_upstream(random_model):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (120, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(120) % 10
    fe = FastEvaluator(images, labels, batch_size=50, preview_per_class=4, audit=20, mixed=True)
    base = compress(random_model)
    fe.logits(base)
    # A change in the last block: only unit 9 is recomputed.
    cfg = ClusteringConfig().with_k("layer3.2.conv2", 8)
    model, cl = prune(random_model, cfg)
    before = fe.stats["units_computed"]
    got = fe.logits(compress(model, cl))
    assert fe.stats["units_computed"] - before == 1
    ref = predict_logits(model, images)
    assert torch.allclose(got, ref, atol=1e-4)
    for cfg in _configs(1, 4):
        model, cl = prune(random_model, cfg)
        net = compress(model, cl)
        ref = predict_logits(model, images)
        assert (fe.logits(net) - ref).abs().max() < 1e-3
        assert int((fe.predictions(net) != ref.argmax(1)).sum()) == 0
        # the preview is the bf16 pass alone: it may differ from fp32 only on near-ties
        prev = fe.predictions(net, preview=True)
        sub = ref[fe.preview_index]
        top2 = sub.topk(2, dim=1).values
        differ = prev != sub.argmax(1)
        assert bool(((top2[:, 0] - top2[:, 1])[differ] < 0.5).all())
        assert torch.equal(fe.predictions(net), ref.argmax(1))  # the full result is re-checked


def test_recheck_bound_widens_when_rechecked_images_show_a_larger_error(random_model, monkeypatch):
    images = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    net = compress(random_model)
    probe = FastEvaluator(images, torch.arange(100) % 10, batch_size=50, audit=5, mixed=True)
    top2 = probe.bf16_logits(net).topk(2, dim=1).values
    smallest = float((top2[:, 0] - top2[:, 1]).min())
    # A random net's margins dwarf its bf16 error, so simulate what the widening is for: the audit
    # sees no error, the first re-checked image (the one below the starting bound) a large one.
    fe = FastEvaluator(images, torch.arange(100) % 10, batch_size=50, audit=5, mixed=True, tau=smallest + 1e-4)
    real = engine.flip_error
    monkeypatch.setattr(engine, "flip_error", lambda a, e: 0.0 if len(a) == 5 else 100 * real(a, e))
    pred = fe.predictions(net)
    assert fe.stats["tau_widenings"] >= 1 and fe.stats["last_tau"] > smallest + 1e-4
    # every image whose margin the largest error seen could flip was re-checked (here: all of them)
    margin = top2[:, 0] - top2[:, 1]
    must = int((margin < fe.safety * fe.stats["max_flip_error"]).sum())
    assert must == 100 and fe.stats["last_rechecked"] == must
    assert fe.stats["last_rechecked"] > 1
    assert torch.equal(pred, predict_logits(random_model, images).argmax(1))


def test_non_finite_logits_are_rechecked_not_looped_on(random_model):
    images = torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    net = compress(random_model)
    with torch.no_grad():
        net.fc.weight[3, 0] = float("nan")
    fe = FastEvaluator(images, torch.arange(30) % 10, batch_size=30, audit=5, mixed=True)
    pred = fe.predictions(net)  # used to spin forever widening tau to NaN
    assert fe.stats["last_rechecked"] == 30
    assert torch.equal(pred, fe.logits(net).argmax(1))


def test_rechecked_rows_resume_from_their_cached_fp32_activations(random_model):
    images = torch.randint(0, 256, (60, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    # A bound so wide that every image is re-checked: the second net (a change in the last block)
    # must resume all of them from the first net's cached fp32 activations of unit 8.
    fe = FastEvaluator(images, torch.arange(60) % 10, batch_size=25, audit=10, mixed=True, tau=1e9)
    for cfg in (ClusteringConfig().with_k("layer2.0.conv1", 8),
                ClusteringConfig().with_k("layer2.0.conv1", 8).with_k("layer3.2.conv2", 4)):
        model, cl = prune(random_model, cfg)
        assert torch.equal(fe.predictions(compress(model, cl)), predict_logits(model, images).argmax(1))
    assert fe.stats["rows_resumed"] == 60
    assert fe.cache.bytes <= fe.cache.max_bytes


def test_flip_error_is_the_largest_error_relative_to_the_top_class():
    exact = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    # image 0: top-1 class 0 shifted +0.1, class 2 shifted -0.3 -> 0.4; image 1: a common shift -> 0
    approx = exact + torch.tensor([[0.1, 0.0, -0.3], [0.5, 0.5, 0.5]])
    assert flip_error(approx, exact) == pytest.approx(0.4)
    assert flip_error(approx[1:], exact[1:]) == 0.0
    assert flip_error(approx[:0], exact[:0]) == 0.0


@pytest.mark.parametrize("fold_bn", [False, True])
def test_inference_form_computes_the_same_function(random_model, fold_bn):
    from explorer.compress import CompressedConv

    x = torch.randn(8, 3, 32, 32)
    ks = {"conv1": 5, "layer1.0.conv1": 9, "layer2.1.conv1": 7, "layer2.2.conv2": 24, "layer3.0.conv1": 13,
          "layer3.2.conv2": 40}
    cfg = ClusteringConfig(fold_bn=fold_bn)
    for name, k in ks.items():
        cfg = cfg.with_k(name, k)
    model, cl = prune(random_model, cfg)
    net = compress(model, cl)
    fast = inference_form(net)
    with torch.inference_mode():
        assert (fast(x) - net(x)).abs().max() < 1e-4
    convs = {n: m for n, m in fast.named_modules() if isinstance(m, CompressedConv)}
    # 16-channel layers and k above Cout/2 run dense; small k in wide layers keeps its k filters
    assert not convs["conv1"].gathered and convs["conv1"].conv.out_channels == 16
    assert not convs["layer2.2.conv2"].gathered and not convs["layer3.2.conv2"].gathered
    if not fold_bn:  # (with fold_bn a block's first conv is merged: k channels, nothing gathered)
        assert convs["layer2.1.conv1"].gathered and convs["layer2.1.conv1"].conv.out_channels == 7
        assert convs["layer3.0.conv1"].gathered and convs["layer3.0.conv1"].conv.out_channels == 13
    assert net.conv1.conv.out_channels == 5  # the input net is not mutated


@pytest.mark.skipif(not engine._fused_available(), reason="torch built without oneDNN post-ops")
@pytest.mark.parametrize("fold_bn", [False, True])
def test_fused_units_compute_the_same_function(random_model, fold_bn):
    cfg = ClusteringConfig(fold_bn=fold_bn)
    for name, k in {"conv1": 5, "layer1.0.conv2": 9, "layer2.0.conv1": 7, "layer2.1.conv2": 12,
                    "layer3.0.conv2": 13, "layer3.1.conv1": 40}.items():
        cfg = cfg.with_k(name, k)
    model, cl = prune(random_model, cfg)
    net = inference_form(compress(model, cl))
    assert any(getattr(m, "gathered", False) for m in net.modules())  # both conv forms are exercised
    x = torch.randn(6, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        a = b = x
        for u, unit in enumerate(engine.units(net)):
            a, b = engine._run_unit(u, unit, a), engine._run_unit_fused(u, unit, b)
            assert (a - b).abs().max() <= 1e-5 * max(1.0, float(a.abs().max())), f"unit {u}"
    # bf16, as the engine runs it: fused is as close to fp32 as unfused bf16 (it rounds once less)
    low = copy.deepcopy(net).to(torch.bfloat16)
    with torch.inference_mode():
        ref, eager, fused = x, x.to(torch.bfloat16), x.to(torch.bfloat16)
        for u, (unit, unit16) in enumerate(zip(engine.units(net), engine.units(low))):
            ref = engine._run_unit(u, unit, ref)
            eager, fused = engine._run_unit(u, unit16, eager), engine._run_unit_fused(u, unit16, fused)
        e_eager, e_fused = (eager.float() - ref).abs().max(), (fused.float() - ref).abs().max()
        assert 0 < e_fused <= 1.5 * e_eager


def test_digests_change_only_downstream(random_model):
    a = unit_digests(compress(random_model))
    model, cl = prune(random_model, ClusteringConfig().with_k("layer2.1.conv1", 4))
    b = unit_digests(compress(model, cl))
    changed = [i for i in range(10) if a[i] != b[i]]
    assert changed == list(range(5, 10))  # layer2.1 is unit 5; everything after it depends on it


def test_activation_cache_is_bounded():
    c = ActivationCache(max_bytes=3 * 400)
    for i in range(5):
        c.put(str(i), torch.zeros(100))  # 400 bytes each
    assert c.bytes == 1200 and c.get("0") is None and c.get("4") is not None
    c.put("huge", torch.zeros(1000))
    assert c.get("huge") is None


def test_stratified_subset_is_balanced():
    labels = torch.arange(1000) % 10
    idx = stratified_subset(labels, per_class=7)
    assert len(idx) == 70 and torch.bincount(labels[idx]).tolist() == [7] * 10
    assert torch.equal(idx, stratified_subset(labels, per_class=7))


@pytest.mark.realdata
def test_engine_matches_eager_fp32_on_the_real_test_split(real_data, shipped_model):
    # Without native BF16 (e.g. an AVX2-only CPU) the bf16 path is emulated: one configuration on
    # the 10,000 images took about 150 s there, so one configuration on the first 2,500 is checked
    # instead of three on all (the same arithmetic either way).
    native = _bf16_supported()
    n, rows = (3, len(real_data.test_labels)) if native else (1, 2500)
    images, labels = real_data.test_images[:rows], real_data.test_labels[:rows]
    fe = FastEvaluator(images, labels, mixed=True)
    for cfg in _configs(7, n):
        model, cl = prune(shipped_model, cfg)
        net = compress(model, cl)
        ref = predict_logits(model, images)
        assert (fe.logits(net) - ref).abs().max() < 1e-3
        assert int((fe.predictions(net) != ref.argmax(1)).sum()) <= 3


def test_fp32_full_run_after_its_preview_computes_only_the_other_rows(random_model, monkeypatch):
    images = torch.randint(0, 256, (90, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(90) % 10
    fe = FastEvaluator(images, labels, batch_size=20, preview_per_class=3, mixed=False)
    assert len(fe.preview_index) == 30 and len(fe.rest_index) == 60
    assert torch.equal(torch.sort(torch.cat([fe.preview_index, fe.rest_index])).values, torch.arange(90))
    rows = []
    real = engine._run_unit
    monkeypatch.setattr(engine, "_run_unit", lambda i, u, x: (rows.append(len(x)) if i == 0 else None) or real(i, u, x))
    model, cl = prune(random_model, ClusteringConfig().with_k("conv1", 4).with_k("layer2.0.conv1", 8))
    net = compress(model, cl)
    ref = predict_logits(model, images)
    assert torch.equal(fe.predictions(net, preview=True), ref[fe.preview_index].argmax(1))  # fp32: exact
    assert sum(rows) == 30
    got = fe.logits(net)
    assert sum(rows) == 90  # the full run computed the 60 other rows only
    assert (got - ref).abs().max() < 1e-4
    assert torch.equal(fe.predictions(net), ref.argmax(1)) and sum(rows) == 90  # the logits are cached
    # A change downstream resumes both parts from their own cached activations, not the input.
    model2, cl2 = prune(random_model, ClusteringConfig().with_k("conv1", 4).with_k("layer2.0.conv1", 8)
                        .with_k("layer3.2.conv2", 4))
    assert torch.equal(fe.predictions(compress(model2, cl2)), predict_logits(model2, images).argmax(1))
    assert sum(rows) == 90
    assert fe.cache.bytes <= fe.cache.max_bytes


def test_fp32_parts_keep_the_units_the_whole_set_would_under_a_small_bound(random_model):
    images = torch.randint(0, 256, (90, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    fe = FastEvaluator(images, torch.arange(90) % 10, batch_size=30, preview_per_class=3, mixed=False, cache_mb=6)
    # 90 images in fp32: a stage-3 output is 1.47 MB, stage 2 2.95 MB, so under a 6 MB bound (cap a
    # third of it) the whole set would keep units 7 and 8; each part, with its share, keeps the same.
    net = compress(random_model)
    fe.predictions(net)
    digests = unit_digests(net)
    kept = {(k.split(":")[1], digests.index(k.split(":")[2])) for k in fe.cache._data if "logits" not in k}
    assert kept == {(part, u) for part in ("preview", "rest") for u in (7, 8)}
    assert fe.cache.bytes <= fe.cache.max_bytes
    for layer, resumed_from in (("layer3.2.conv2", 8), ("layer3.1.conv1", 7)):
        model, cl = prune(random_model, ClusteringConfig().with_k(layer, 4))
        before = dict(fe.stats)
        assert torch.equal(fe.predictions(compress(model, cl)), predict_logits(model, images).argmax(1))
        assert fe.stats["units_reused"] - before["units_reused"] == 2 * (resumed_from + 1)  # both parts resumed
