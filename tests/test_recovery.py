"""Data-aware clustering and least-squares recovery (explorer.recovery): each method against a
hand-computed case on small synthetic layers, the structure it must keep, and the rule that the
test split is never read by what fits or chooses."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from explorer import recovery as R
from explorer.clustering import (
    ClusteringConfig,
    ClusteringError,
    calibration_subset,
    cluster_layer,
    holdout_subset,
    prune,
    training_permutation,
)
from explorer.compress import compress
from explorer.data import normalize, synthetic_cifar10
from explorer.evaluate import predict_logits

from _models import positive_bn_model, randomized_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return randomized_model(3)


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def ref(model, images):
    return R.reference(model, images, per_image=16)


# ---------------------------------------------------------------- the output-error metric

def test_patches_match_the_conv():
    """A patch times the filter (in the patches' order) is the conv's output at that position."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, 8, generator=g)
    w = torch.randn(4, 5, 3, 3, generator=g)
    for stride in (1, 2):
        y = F.conv2d(x, w, stride=stride, padding=1)
        pos = R._sample_positions(3, y.shape[-1], 7, g)
        p = R.patches(x, pos, stride)
        w_hwc = w.permute(0, 2, 3, 1).reshape(4, -1)
        torch.testing.assert_close(p @ w_hwc.T, R._at(y, pos), rtol=1e-5, atol=1e-5)
        # and the (channel, dy, dx) map turns the HWC order back into weight.view(Cout, -1)
        torch.testing.assert_close(w_hwc[:, R.hwc_to_chw(5)], w.reshape(4, -1))


def test_sigma_metric_equals_the_measured_output_error(model, images, ref):
    """(w - c)^T Sigma (w - c) is the mean squared change of the conv's output at the sampled
    positions, and the whitened points' squared distance is the same number."""
    x = normalize(images)
    w = model.conv1.weight.detach()
    g = torch.Generator().manual_seed(2)
    c = w + 0.1 * torch.randn(w.shape, generator=g)
    pos = ref.layers["conv1"].positions
    measured = ((R._at(F.conv2d(x, w, padding=1), pos) - R._at(F.conv2d(x, c, padding=1), pos)) ** 2).mean(0)
    sigma = ref.sigma("conv1", with_bias=False)
    diff = (w - c).reshape(16, -1).double().numpy()
    predicted = np.einsum("id,de,ie->i", diff, sigma, diff)
    np.testing.assert_allclose(predicted, measured.double().numpy(), rtol=1e-4)
    L = R.whitening(sigma)
    np.testing.assert_allclose(((diff @ L) ** 2).sum(1), predicted, rtol=1e-4)
    # with a folded bias the constant input joins: [w, b] against [c, b']
    bw, bc = torch.randn(16, generator=g), torch.randn(16, generator=g)
    yw = R._at(F.conv2d(x, w, bw, padding=1), pos)
    yc = R._at(F.conv2d(x, c, bc, padding=1), pos)
    da = np.concatenate([diff, (bw - bc).double().numpy()[:, None]], 1)
    np.testing.assert_allclose(np.einsum("id,de,ie->i", da, ref.sigma("conv1", True), da),
                               ((yw - yc) ** 2).mean(0).double().numpy(), rtol=1e-4)


def test_data_space_kmeans_inertia_is_the_output_error(model, images, ref):
    """In the data space, k-means' inertia is the summed mean squared output error of replacing
    every filter by its cluster's mean, and the replacement is the members' mean."""
    cfg = ClusteringConfig(ks={"layer1.0.conv1": 5}, space="data", n_init=4)
    conv = model.layer1[0].conv1
    res = cluster_layer("layer1.0.conv1", conv.weight, model.layer1[0].bn1, 5, cfg,
                        ref.sigma("layer1.0.conv1", False))
    w = conv.weight.detach().reshape(16, -1).double()
    for j in range(5):
        members = res.labels == j
        torch.testing.assert_close(res.weight.reshape(16, -1)[members].double(),
                                   w[members].mean(0, keepdim=True).expand(int(members.sum()), -1),
                                   rtol=1e-5, atol=1e-6)
    diff = (w - res.weight.reshape(16, -1).double()).numpy()
    err = np.einsum("id,de,ie->", diff, ref.sigma("layer1.0.conv1", False), diff)
    assert res.inertia == pytest.approx(err, rel=1e-3)
    with pytest.raises(ClusteringError, match="space=data needs the second moment"):
        cluster_layer("layer1.0.conv1", conv.weight, model.layer1[0].bn1, 5, cfg, None)


# ---------------------------------------------------------------- ridge and tied fits

def test_ridge_equals_lstsq():
    g = torch.Generator().manual_seed(0)
    p, t = torch.randn(200, 12, generator=g), torch.randn(200, 3, generator=g)
    torch.testing.assert_close(R.ridge(p, t, lam=0.0).float(), torch.linalg.lstsq(p, t).solution, rtol=1e-4, atol=1e-5)
    # with a ridge, the same as lstsq on the problem stacked with sqrt(lam') I
    lam = 0.1
    lam_abs = lam * float((p.T @ p).diagonal().mean())
    stacked = torch.cat([p, lam_abs**0.5 * torch.eye(12)]).double()
    torch.testing.assert_close(R.ridge(p, t, lam), torch.linalg.lstsq(stacked, torch.cat([t, torch.zeros(12, 3)]).double()).solution,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", ["channel", "cluster"])
def test_fit_tied_equals_the_stacked_least_squares(bias):
    """Two clusters, channel factors m: the closed form equals lstsq of the problem written out
    with one shared filter per cluster and the shifts as unknowns."""
    g = torch.Generator().manual_seed(1)
    M, D = 300, 6
    p, t = torch.randn(M, D, generator=g), torch.randn(M, 4, generator=g)
    labels, m = torch.tensor([0, 1, 0, 1]), torch.tensor([1.0, 0.5, 2.0, -1.5])
    d, beta = R.fit_tied(p, t, labels, m, bias, lam=0.0)
    n_shift = 4 if bias == "channel" else 2
    rows, rhs = [], []
    for i in range(4):
        a = torch.zeros(M, 2 * D + n_shift)
        a[:, labels[i] * D : (labels[i] + 1) * D] = m[i] * p
        a[:, 2 * D + (i if bias == "channel" else labels[i])] = 1.0 if bias == "channel" else m[i]
        rows.append(a)
        rhs.append(t[:, i])
    sol = torch.linalg.lstsq(torch.cat(rows).double(), torch.cat(rhs).double()[:, None]).solution[:, 0]
    torch.testing.assert_close(d.reshape(-1).double(), sol[: 2 * D], rtol=1e-4, atol=1e-5)
    shifts = sol[2 * D :] if bias == "channel" else m.double() * sol[2 * D :][labels]
    torch.testing.assert_close(beta.double(), shifts, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="bias must be"):
        R.fit_tied(p, t, labels, m, "free")


# ---------------------------------------------------------------- recovery on a whole net

CONFIGS = {
    "fold_bn": ClusteringConfig(ks={"layer1.0.conv1": 5, "layer2.1.conv1": 9, "layer3.2.conv2": 20}, fold_bn=True),
    "plain": ClusteringConfig(ks={"conv1": 6, "layer2.0.conv2": 11}),
    "cosine_fold": ClusteringConfig(ks={"layer1.2.conv1": 4, "layer3.0.conv1": 30}, metric="cosine", fold_bn=True),
}


@pytest.fixture(scope="module")
def positive_model():
    """Positive BN scales, so that fold_bn clusters merge (the random test model has negative ones)."""
    return positive_bn_model(4)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("space", ["weight", "data"])
def test_lsq_keeps_the_clusters_and_compresses_exactly(positive_model, name, space):
    data = synthetic_cifar10(n_train=160, n_test=32, seed=2)
    base = replace(CONFIGS[name], space=space)
    m0, c0 = prune(positive_model, base, data.train_images)
    m1, c1 = prune(positive_model, replace(base, recovery="lsq", recalibrate_bn=96), data.train_images)
    # same distinct filters, same merges: the same smaller architecture
    assert compress(m1, c1).specs == compress(m0, c0).specs
    for layer, res in c1.layers.items():
        w = dict(m1.named_modules())[layer].weight.detach().reshape(len(res.labels), -1)
        for j in range(res.k):
            members = w[torch.as_tensor(res.labels == j)]
            direction = members / res.scales[torch.as_tensor(res.labels == j)][:, None]
            torch.testing.assert_close(direction, direction[:1].expand_as(direction), rtol=1e-4, atol=1e-5)
    x = data.test_images[:16]
    torch.testing.assert_close(predict_logits(compress(m1, c1), x), predict_logits(m1, x), rtol=1e-4, atol=1e-4)
    # and the re-fit brings the logits back towards the original net's on its calibration images
    calib = calibration_subset(data.train_images, 96)
    orig = predict_logits(positive_model, calib)
    err0 = ((predict_logits(m0, calib) - orig) ** 2).mean()
    err1 = ((predict_logits(m1, calib) - orig) ** 2).mean()
    assert err1 < 0.5 * err0


RESUME_CASES = {
    # name: (options, first configuration, the move, re-fits of a full run, first layer re-fitted
    # after the move, an upstream change: (options, k) that must re-fit everything again)
    "from the stem": ({}, {"conv1": 4, "layer3.1.conv1": 16}, {"layer3.1.conv1": 24}, 19, "layer3.1.conv1",
                      ({}, {"conv1": 5})),
    "from stage 2": ({}, {"layer2.0.conv2": 8, "layer3.2.conv1": 16}, {"layer3.2.conv1": 24}, 11, "layer3.2.conv1",
                     ({}, {"layer2.0.conv2": 9})),
    "cosine": ({"metric": "cosine"}, {"conv1": 4, "layer2.2.conv1": 16}, {"layer2.2.conv1": 24}, 19, "layer2.2.conv1",
               ({}, {"conv1": 5})),
    "residual stream": ({"fold_bn": True, "stream": {1: 12}}, {"layer3.0.conv1": 32}, {"layer3.0.conv1": 48}, 19,
                        "layer3.0.conv1", ({"stream": {1: 13}}, {})),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_lsq_resumes_from_a_cached_prefix_bit_for_bit(positive_model, monkeypatch, case):
    """A move downstream re-fits only from its block on, and gives exactly the full re-fit's net;
    a move upstream re-fits everything."""
    opts, first, move, full, resumed_at, (up_opts, up_ks) = RESUME_CASES[case]
    data = synthetic_cifar10(n_train=160, n_test=8, seed=2)
    calls = []
    refit = R._refit_conv
    monkeypatch.setattr(R, "_refit_conv", lambda name, *a, **kw: (calls.append(name), refit(name, *a, **kw)))
    names = [c.name for c in R.CONV_LAYERS]

    def run(ks, cold, options=opts):
        if cold:
            R._PREFIXES.clear()
        calls.clear()
        m, _ = prune(positive_model, ClusteringConfig(ks=ks, space="data", recovery="lsq", recalibrate_bn=96, **options),
                     data.train_images)
        return m.state_dict(), list(calls)

    moved = {**first, **move}
    cold, cold_calls = run(moved, cold=True)
    assert len(cold_calls) == full
    run(first, cold=True)
    warm, warm_calls = run(moved, cold=False)
    assert warm_calls == names[names.index(resumed_at):]
    assert all(torch.equal(cold[k], warm[k]) for k in cold)
    # an earlier layer's clusters change what every later layer reads: nothing is reused
    upstream, up_calls = run({**moved, **up_ks}, cold=False, options={**opts, **up_opts})
    assert len(up_calls) == full
    assert not torch.equal(upstream[f"{resumed_at}.weight"], warm[f"{resumed_at}.weight"])


def test_lsq_with_nothing_clustered_changes_nothing(model, ref):
    m, c = prune(model, ClusteringConfig(recovery="lsq"), torch.zeros(64, 3, 32, 32, dtype=torch.uint8))
    for a, b in zip(m.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_lsq_and_data_space_need_filter_granularity_and_training_images(model):
    with pytest.raises(ClusteringError, match="need granularity=filter"):
        ClusteringConfig(ks={"conv1": 3}, granularity="kernel", recovery="lsq").validate()
    with pytest.raises(ClusteringError, match="needs the training images"):
        prune(model, ClusteringConfig(ks={"conv1": 3}, space="data"))
    cfg, warns = ClusteringConfig.from_query({"granularity": "kernel", "space": "data", "recovery": "lsq"})
    assert (cfg.space, cfg.recovery) == ("weight", "bn") and warns


def test_recovery_config_forms():
    assert ClusteringConfig(recalibrate_bn=2000).recovery == "bn"  # the older form
    assert ClusteringConfig(recovery="lsq").recalibrate_bn == 512
    assert ClusteringConfig(recovery="bn").recalibrate_bn == 2000
    cfg = ClusteringConfig(ks={"conv1": 4}, space="data", recovery="lsq", seeds=3)
    assert cfg.to_query() == {"space": "data", "recovery": "lsq", "seeds": "3", "k.conv1": "4"}
    assert ClusteringConfig.from_query(cfg.to_query())[0] == cfg
    assert ClusteringConfig.from_json(cfg.to_json()) == cfg
    # keys of results measured before these options existed are unchanged
    assert ClusteringConfig(recalibrate_bn=2000).key() == (
        '{"fold_bn":false,"granularity":"filter","ks":{},"metric":"euclidean","n_init":3,"recalibrate_bn":2000,"seed":0}')


# ---------------------------------------------------------------- seeds and the training split only

def test_calibration_and_holdout_are_disjoint_training_images():
    n = 50_000
    perm = training_permutation(n)
    images = torch.arange(n).view(n, 1, 1, 1).expand(n, 1, 1, 1)
    calib = set(calibration_subset(images, 48_000).flatten().tolist())
    held, _ = holdout_subset(images, torch.zeros(n, dtype=torch.long))
    held = set(held.flatten().tolist())
    assert len(calib) == 48_000 and len(held) == 2_000 and not calib & held
    assert sorted(held) == sorted(perm[-2000:].tolist())


def test_best_of_seeds_picks_the_best_holdout_accuracy(model):
    data = synthetic_cifar10(n_train=200, n_test=16, seed=1)
    cfg = ClusteringConfig(ks={"layer3.2.conv2": 3, "layer1.0.conv1": 2}, seeds=3, seed=4)
    m, c = prune(model, cfg, data.train_images, data.train_labels)
    assert set(c.holdout_top1) == {4, 5, 6}
    assert c.holdout_top1[c.chosen_seed] == max(c.holdout_top1.values())
    single, _ = prune(model, replace(cfg, seed=c.chosen_seed, seeds=1), data.train_images)
    for a, b in zip(m.state_dict().values(), single.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ClusteringError, match="labels"):
        prune(model, cfg, data.train_images)


def test_fitting_and_choosing_never_read_the_test_split(model):
    """The same training split with two different test splits gives bit-identical nets for every
    path that fits or chooses (data-space statistics, least squares, BN re-estimation, seed
    choice): nothing the test split holds reaches them."""
    from explorer.pipeline import Explorer

    a = synthetic_cifar10(n_train=200, n_test=40, seed=7)
    noise = torch.randint(0, 256, a.test_images.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    b = replace(a, test_images=noise, test_labels=torch.flip(a.test_labels, [0]))
    cfg = ClusteringConfig(ks={"layer1.1.conv1": 3, "layer2.2.conv2": 5}, fold_bn=True, space="data",
                           recovery="lsq", recalibrate_bn=64, seeds=2)
    nets = []
    for data in (a, b):
        res = Explorer(model, data, activation_cache_mb=16).run(cfg)
        nets.append(res.model.state_dict())
    for key in nets[0]:
        assert torch.equal(nets[0][key], nets[1][key]), key
    # and the bn recovery too
    bn = replace(cfg, space="weight", recovery="bn", seeds=1)
    n0, n1 = (Explorer(model, d, activation_cache_mb=16).run(bn).model.state_dict() for d in (a, b))
    assert all(torch.equal(n0[k], n1[k]) for k in n0)


# ---------------------------------------------------------------- the side-by-side tables

def test_comparison_tables_from_sensitivity_rows():
    import pandas as pd

    from explorer.analysis import comparison

    def row(layer, filters, space, recovery, seed, top1, drop):
        return {"layer": layer, "filters": filters, "k": filters // 2, "granularity": "filter", "fold_bn": False,
                "metric": "euclidean", "n_init": 3, "seeds": 1, "space": space, "recovery": recovery, "seed": seed,
                "top1": top1, "drop_pts": drop, "select_drop_pts": drop / 2}

    df = pd.DataFrame([
        row("conv1", 16, "weight", "none", 0, 0.80, 9.0), row("conv1", 16, "weight", "none", 1, 0.70, 19.0),
        row("layer3.2.conv2", 64, "weight", "none", 0, 0.88, 1.0),
        row("conv1", 16, "data", "lsq", 0, 0.885, 0.5), row("conv1", 16, "data", "lsq", 1, 0.880, 1.0),
        {**row("conv1", 16, "data", "lsq", 0, 0.1, 80.0), "k": 4},  # not half: left out
    ])
    half = comparison.half_points(df)
    assert len(half) == 5
    s = comparison.summary(half).set_index("variant")
    assert list(s.index) == ["weight space + no recovery", "data-aware + least squares"]
    assert s.loc["weight space + no recovery", "mean drop (pp)"] == pytest.approx(5.0)
    assert s.loc["weight space + no recovery", "worst seed spread (pp)"] == pytest.approx(10.0)
    assert s.loc["data-aware + least squares", "mean seed spread (pp)"] == pytest.approx(0.5)
    assert s.loc["data-aware + least squares", "mean held-out drop (pp)"] == pytest.approx(0.25)
    t = comparison.half_table(half)
    assert list(t.index) == ["conv1", "layer3.2.conv2", "mean (layers in every column)"]
    assert t.loc["mean (layers in every column)", "weight space + no recovery"] == pytest.approx(9.0)  # conv1 only
    assert comparison.spread_of(half, "conv1", "weight space + no recovery") == {
        "seeds": [0, 1], "min": 0.70, "median": pytest.approx(0.75), "max": 0.80}
