"""Coupled residual-stream clustering (issue 14): one assignment of a stage's stream channels shared
by every writer, the option-A shortcut's constraint, the narrower compressed net (logits, MACs,
save/load, ONNX, the engine), the configuration's JSON / URL forms and its error messages.
Random ResNet20s with randomised BatchNorms and synthetic images; one torch thread. The real-data
test compares compressed and clustered logits on test images of the JPEG copy."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from explorer import limits
from explorer.clustering import (ClusteringConfig, ClusteringError, apply, cluster_model, grouped_kmeans, prune,
                                 stream_groups, stream_min_k)
from explorer.compress import _shortcut_index, compress, count_macs, export_onnx, load_compressed, save_compressed
from explorer.data import normalize, synthetic_cifar10
from explorer.engine import FastEvaluator
from explorer.model import CONV_LAYER_NAMES, shortcut_source, stream_writers

from _models import randomized_model

torch.set_num_threads(1)

ALL = {1: 8, 2: 12, 3: 20}
# k1 = 8, k2 = 12, k3 = 20, no per-layer k: every conv's filters x input channels x 9 x output map
ALL_MACS = (8 * 3 * 9 * 1024                                   # stem: 8 filters on the RGB image
            + 3 * (16 * 8 * 9 * 1024 + 8 * 16 * 9 * 1024)      # stage 1: conv1 reads 8, conv2 writes 8
            + 32 * 8 * 9 * 256 + 12 * 32 * 9 * 256             # layer2.0: conv1 reads the 8-channel stream
            + 2 * (32 * 12 * 9 * 256 + 12 * 32 * 9 * 256)      # layer2.1, layer2.2
            + 64 * 12 * 9 * 64 + 20 * 64 * 9 * 64              # layer3.0
            + 2 * (64 * 20 * 9 * 64 + 20 * 64 * 9 * 64)        # layer3.1, layer3.2
            + 20 * 10)                                          # the classifier reads 20 features


@pytest.fixture(scope="module")
def model():
    return randomized_model(0)


@pytest.fixture(scope="module")
def x():
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def data():
    return synthetic_cifar10(300, 60, seed=9)


def stream_config(stream=ALL, **kw):
    return ClusteringConfig(stream=stream, fold_bn=True, **kw)


def stream_activations(net: torch.nn.Module, x: torch.Tensor) -> dict[int, list[torch.Tensor]]:
    """The residual stream of a ResNet20, hooked: stage -> outputs of the stem (stage 1) and of each
    block of the stage, each (N, W, H, W)."""
    acts = {1: [], 2: [], 3: []}
    hooks = [net.conv1.register_forward_hook(lambda m, i, o: acts[1].append(F.relu(net.bn1(o))))]
    for s in (1, 2, 3):
        for block in getattr(net, f"layer{s}"):
            hooks.append(block.register_forward_hook(lambda m, i, o, s=s: acts[s].append(o)))
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in hooks:
            h.remove()
    return acts


# ---------------------------------------------------------------- the shortcut constraint

def test_shortcut_source_is_option_a():
    src = shortcut_source(2)
    assert src.tolist() == [-1] * 8 + list(range(16)) + [-1] * 8
    src = shortcut_source(3)
    assert src.tolist() == [-1] * 16 + list(range(32)) + [-1] * 16
    with pytest.raises(KeyError):
        shortcut_source(1)


def test_stream_groups_follow_the_source_clusters():
    src_labels = np.array([0, 1, 1, 2, 0, 0, 3, 3, 1, 2, 2, 0, 3, 1, 0, 2])
    g = stream_groups(2, src_labels)
    assert g.tolist() == [-1] * 8 + src_labels.tolist() + [-1] * 8
    assert stream_groups(2, None).tolist() == [-1] * 8 + list(range(16)) + [-1] * 8
    assert stream_groups(1, None).tolist() == [0] * 16


@pytest.mark.parametrize("seed", range(8))
def test_random_assignments_never_mix_pads_or_sources(seed):
    """grouped_kmeans on random points: a stage-2 cluster never holds a zero-padded channel and a
    shortcut-fed one, nor two shortcut-fed channels whose stage-1 sources are in different clusters."""
    rng = np.random.default_rng(seed)
    k1 = int(rng.integers(1, 16))
    src_labels = rng.permutation(np.arange(16) % k1)
    groups = stream_groups(2, src_labels)
    k2 = int(rng.integers(k1 + 1, 33))
    labels, _ = grouped_kmeans(rng.normal(size=(32, 7)), groups, k2, seed=seed)
    assert sorted(set(labels.tolist())) == list(range(k2))
    src = shortcut_source(2).numpy()
    for c in range(k2):
        members = np.flatnonzero(labels == c)
        pads = src[members] < 0
        assert pads.all() or not pads.any(), (c, members)
        if not pads.any():
            assert len(set(src_labels[src[members]].tolist())) == 1, (c, members)


def test_grouped_kmeans_gives_the_extra_cluster_to_the_group_it_helps_most():
    pts = np.array([[0.0], [0.1], [0.0], [0.2], [10.0], [10.1]])
    groups = np.array([5, 5, 7, 7, 7, 7])
    labels, inertia = grouped_kmeans(pts, groups, 3)
    # one cluster each, then the third to group 7: splitting it saves 99.0025, splitting group 5 0.005
    assert labels[:2].tolist() == [0, 0]
    assert labels[2] == labels[3] and labels[4] == labels[5] and {labels[2], labels[4]} == {1, 2}
    assert inertia == pytest.approx(0.005 + 0.02 + 0.005)
    labels, inertia = grouped_kmeans(pts, groups, 2)
    assert labels.tolist() == [0, 0, 1, 1, 1, 1] and inertia == pytest.approx(0.005 + 99.0275)
    with pytest.raises(ClusteringError, match="below the 2 groups"):
        grouped_kmeans(pts, groups, 1)
    with pytest.raises(ClusteringError, match="only 6 distinct channels for k = 7"):
        grouped_kmeans(pts, groups, 7)


def test_clustered_streams_honour_the_shortcut(model):
    c = cluster_model(model, stream_config({1: 5, 2: 9, 3: 14}))
    assert set(c.stream) == {1, 2, 3}
    for stage in (2, 3):
        src, prev = shortcut_source(stage).numpy(), c.stream[stage - 1].labels
        labels = c.stream[stage].labels
        assert len(set(labels.tolist())) == c.stream[stage].k
        for j in set(labels.tolist()):
            members = np.flatnonzero(labels == j)
            sources = {int(prev[src[i]]) if src[i] >= 0 else -1 for i in members}
            assert len(sources) == 1, (stage, j, sources)
    # every writer of a stage carries the stream's labels
    for stage, sc in c.stream.items():
        for name in stream_writers(stage):
            assert np.array_equal(c.layers[name].labels, sc.labels)
            assert c.layers[name].k == sc.k


# ---------------------------------------------------------------- identical members

@pytest.mark.parametrize("stream", [ALL, {2: 20}, {1: 3, 3: 40}])
def test_stream_members_are_identical_in_the_clustered_net(model, x, stream):
    c = cluster_model(model, stream_config(stream))
    clustered = apply(model, c)
    acts, base = stream_activations(clustered, x), stream_activations(model, x)
    for stage, outs in acts.items():
        if stage not in stream:
            continue
        labels = torch.as_tensor(c.stream[stage].labels)
        assert len(outs) == (4 if stage == 1 else 3)
        for y in outs:
            for j in range(stream[stage]):
                members = y[:, labels == j]
                assert (members - members[:, :1]).abs().max() == 0, (stage, j)
            assert (y[:, labels == 0].mean(1) - y[:, labels == 1].mean(1)).abs().max() > 1e-3  # clusters differ
    # ... whereas the original net's stream channels all differ
    y = base[1][0]
    assert min((y[:, i] - y[:, j]).abs().max() for i in range(16) for j in range(i)) > 1e-3


def test_writers_are_the_members_mean_of_each_writer(model):
    """Each writer's folded filters of a cluster are replaced by the mean of THAT writer's members."""
    c = cluster_model(model, stream_config({2: 20}))
    clustered = apply(model, c)
    labels = torch.as_tensor(c.stream[2].labels)
    for name in stream_writers(2):
        conv, bn = model.get_submodule(name), model.get_submodule(name.replace("conv", "bn"))
        a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        folded = conv.weight.detach() * a.view(-1, 1, 1, 1)
        new = clustered.get_submodule(name).weight.detach()
        for j in range(20):
            torch.testing.assert_close(new[labels == j], folded[labels == j].mean(0, keepdim=True).expand_as(
                new[labels == j]), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- the compressed net

CASES = {
    "all": (ALL, {}, {}),
    "stage1": ({1: 6}, {}, {}),
    "stage2-alone": ({2: 17}, {}, {}),
    "stage3+conv1s": ({3: 40}, {"layer1.0.conv1": 5, "layer2.0.conv1": 10, "layer3.1.conv1": 30}, {}),
    "k1-everywhere": ({1: 1, 2: 2, 3: 3}, {"layer2.2.conv1": 1}, {}),
    "data+lsq": ({1: 6, 2: 10, 3: 30}, {"layer2.1.conv1": 9}, {"space": "data", "recovery": "lsq"}),
    "bn": ({1: 10, 3: 50}, {"layer1.1.conv1": 7}, {"recovery": "bn", "recalibrate_bn": 100}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compressed_logits_equal_the_clustered_nets(model, x, data, case):
    stream, ks, opts = CASES[case]
    cfg = stream_config(stream, ks=ks, **opts)
    clustered, c = prune(model, cfg, data.train_images, data.train_labels)
    small = compress(clustered, c)
    with torch.no_grad():
        ref, out = clustered(x), small(x)
        torch.testing.assert_close(small(x.contiguous(memory_format=torch.channels_last)), ref, rtol=0, atol=1e-4)
    assert ref.std(0).max() > 1e-2
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    specs = {s.name: s for s in small.specs}
    width = {1: 16, 2: 32, 3: 64}
    for stage in (1, 2, 3):
        k = stream.get(stage, width[stage])
        for name in stream_writers(stage):
            assert (specs[name].filters, specs[name].out_channels, specs[name].gathered) == (k, k, False), name
        readers = [f"layer{stage}.{b}.conv1" for b in (1, 2)] + ([f"layer{stage + 1}.0.conv1"] if stage < 3 else [])
        for name in readers:
            assert specs[name].in_channels == k, name
    assert small.fc.in_features == stream.get(3, 64)


def test_macs_of_uniform_stream_clustering_by_hand(model):
    c = cluster_model(model, stream_config(ALL))
    small = compress(apply(model, c), c)
    assert ALL_MACS == 16_441_544
    assert count_macs(small) == ALL_MACS


def test_the_shortcut_becomes_an_index_map(model, x):
    c = cluster_model(model, stream_config({1: 4, 2: 7}))
    small = compress(apply(model, c), c)
    idx = small.layer2[0].shortcut_index
    l1, l2 = torch.as_tensor(c.stream[1].labels), torch.as_tensor(c.stream[2].labels)
    assert len(idx) == 7
    for j in range(7):
        i = int(torch.nonzero(l2 == j)[0])
        assert int(idx[j]) == (4 if not 8 <= i < 24 else int(l1[i - 8]))  # 4 = the zero channel
    assert small.layer3[0].mapped and small.layer3[0].shortcut_index.tolist().count(7) == 32
    assert not small.layer2[1].mapped  # identity shortcuts stay identities


def test_shortcut_index_refuses_mixed_sources():
    comp_in = torch.arange(16)
    comp_out = torch.arange(32)
    comp_out[9] = comp_out[8]  # stage-2 channels 8 and 9 are fed by different stage-1 channels
    with pytest.raises(ValueError, match="different shortcut sources"):
        _shortcut_index(2, comp_in, comp_out)
    comp_out = torch.arange(32)
    comp_out[8] = comp_out[0]  # a fed channel with a zero-padded one
    with pytest.raises(ValueError, match="different shortcut sources"):
        _shortcut_index(2, comp_in, comp_out)


def test_compress_refuses_a_net_whose_stream_ties_were_broken(model):
    c = cluster_model(model, stream_config({2: 20}))
    clustered = apply(model, c)
    labels = c.stream[2].labels
    j = int(np.bincount(labels).argmax())
    i = int(np.flatnonzero(labels == j)[0])
    with torch.no_grad():
        clustered.layer2[1].conv2.weight[i] += 0.1
    with pytest.raises(ValueError, match="layer2.1.conv2: the channels of a stage-2 stream cluster differ"):
        compress(clustered, c)


def test_save_load_and_onnx(model, tmp_path):
    c = cluster_model(model, stream_config({1: 6, 2: 9, 3: 25}, ks={"layer2.2.conv1": 12}))
    small = compress(apply(model, c), c)
    pt, _ = save_compressed(small, tmp_path, "stream")
    loaded = load_compressed(pt)
    xs = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = small(xs)
        assert torch.equal(loaded(xs), ref)
    ort = pytest.importorskip("onnxruntime")
    path = export_onnx(small, tmp_path / "stream.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(["logits"], {"images": xs.numpy()})
    np.testing.assert_allclose(out, ref.numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("mixed", [False, True])
def test_engine_evaluates_the_narrower_net(model, data, mixed):
    c = cluster_model(model, stream_config({1: 6, 2: 9, 3: 25}))
    clustered = apply(model, c)
    small = compress(clustered, c)
    # tau huge: every image is re-checked in fp32, through the engine's row buffers of the narrow stream
    fe = FastEvaluator(data.test_images, data.test_labels, mixed=mixed, preview_per_class=2, tau=1e9, audit=20)
    with torch.no_grad():
        ref = clustered(normalize(data.test_images))
    assert (fe.logits(small) - ref).abs().max() < 1e-4
    assert torch.equal(fe.predictions(small), ref.argmax(1))
    assert torch.equal(fe.predictions(small), ref.argmax(1))  # again, from the cached activations


def test_explorer_runs_a_stream_only_configuration(model):
    from explorer.pipeline import Explorer

    data = synthetic_cifar10(300, 50, seed=3)
    exp = Explorer(model, data, mixed=False)
    res = exp.run(stream_config(ALL))
    assert res.compression.macs == ALL_MACS
    with torch.no_grad():
        ref = res.model(normalize(data.test_images)).argmax(1)
    assert res.evaluation.top1 == pytest.approx(float((ref == data.test_labels).float().mean()))
    assert res.model is not exp.model


# ---------------------------------------------------------------- limits

def test_a_stream_clustered_checkpoint_limits_its_k(model):
    clustered = apply(model, cluster_model(model, stream_config({1: 6})))
    assert limits.distinct_stream_channels(clustered, 1) == 6
    assert limits.stream_limits(clustered) == {1: 6, 2: 32, 3: 64}
    assert limits.problems(clustered, stream_config({1: 6})) == []
    with pytest.raises(ClusteringError, match="the stage-1 residual stream holds 6 distinct channels \\(of 16\\), "
                                              "so stream k = 8 cannot be clustered; choose k <= 6, or 16"):
        prune(clustered, stream_config({1: 8}))
    # the same net clusters to k = 6 again: exactly its channels
    again, c = prune(clustered, stream_config({1: 6}))
    for name in stream_writers(1):
        torch.testing.assert_close(again.get_submodule(name).weight, clustered.get_submodule(name).weight,
                                   rtol=0, atol=1e-6)


# ---------------------------------------------------------------- configuration: JSON, URL, CLI, errors

ROUNDTRIP = [stream_config(ALL), stream_config({3: 33}, ks={"layer1.0.conv1": 3}, space="data", recovery="lsq"),
             stream_config({2: 31})]


@pytest.mark.parametrize("cfg", ROUNDTRIP)
def test_json_and_url_roundtrips(cfg):
    back = ClusteringConfig.from_json(cfg.to_json())
    assert back == cfg and back.key() == cfg.key()
    q = cfg.to_query()
    assert ClusteringConfig.from_query(q) == (cfg, [])


def test_forms_are_readable():
    cfg = stream_config({1: 8, 3: 20})
    assert cfg.to_query() == {"fold_bn": "1", "s.1": "8", "s.3": "20"}
    assert cfg.to_dict()["stream"] == {"1": 8, "3": 20}
    # no stream: the older forms are unchanged (no "stream" key in shipped result files)
    assert "stream" not in ClusteringConfig(ks={"conv1": 3}).to_dict()
    # k = width leaves a stage as it is
    assert stream_config({1: 16, 2: 20}).key() == stream_config({2: 20}).key()
    assert stream_config({2: 20}).with_stream(2, 32).active_stream == {}
    assert ClusteringConfig().with_stream(1, 4).stream == {1: 4}
    assert stream_config({1: 4}).clustered and not ClusteringConfig().clustered


def test_min_k_of_each_stage():
    assert stream_min_k(1, {}) == 1
    assert stream_min_k(2, {}) == 17 and stream_min_k(2, {1: 5}) == 6
    assert stream_min_k(3, {}) == 33 and stream_min_k(3, {2: 9}) == 10 and stream_min_k(3, {1: 3}) == 33


@pytest.mark.parametrize("cfg, pattern", [
    (ClusteringConfig(stream={1: 8}), "stream clustering \\(stage 1\\) needs fold_bn"),
    (ClusteringConfig(stream={1: 8}, fold_bn=True, granularity="kernel"), "needs granularity=filter"),
    (ClusteringConfig(stream={1: 8}, fold_bn=True, metric="cosine"), "needs metric=euclidean"),
    (stream_config({1: 0}), "stream stage 1: k = 0 is outside 1..16"),
    (stream_config({2: 33}), "stream stage 2: k = 33 is outside 1..32"),
    (stream_config({4: 3}), "unknown residual-stream stage 4"),
    (stream_config({1: "8"}), "stream stage 1: k must be an integer"),
    (stream_config({2: 16}), "stream stage 2: k = 16 is below 17; .* choose k in 17..32"),
    (stream_config({1: 8, 2: 8}), "stream stage 2: k = 8 is below 9"),
    (stream_config({3: 12}, ks={}, ), "stream stage 3: k = 12 is below 33"),
    (stream_config({1: 8}, ks={"layer1.1.conv2": 4}),
     "layer1.1.conv2 writes the stage-1 residual stream, which stream k = 8 clusters; remove the per-layer k"),
    (stream_config({3: 40}, ks={"layer3.0.conv2": 4, "layer3.2.conv2": 9}),
     "layer3.0.conv2, layer3.2.conv2 write the stage-3 residual stream"),
])
def test_invalid_stream_configurations(cfg, pattern):
    with pytest.raises(ClusteringError, match=pattern):
        cfg.validate()


@pytest.mark.parametrize("text, pattern", [
    ('{"fold_bn": true, "stream": [8]}', "stream must map stages to integers"),
    ('{"fold_bn": true, "stream": {"one": 8}}', "unknown residual-stream stage 'one'"),
    ('{"fold_bn": true, "stream": {"1": 8.5}}', "k must be an integer"),
])
def test_from_json_rejects_bad_streams(text, pattern):
    with pytest.raises(ClusteringError, match=pattern):
        ClusteringConfig.from_json(text)


def test_from_query_clamps_and_warns():
    cfg, warns = ClusteringConfig.from_query({"s.1": "8", "s.2": "3", "s.3": "999", "s.7": "2", "metric": "cosine",
                                              "k.layer1.0.conv2": "4", "k.layer1.0.conv1": "5"})
    assert cfg.stream == {1: 8, 2: 9} and cfg.fold_bn and cfg.metric == "euclidean"
    assert cfg.ks == {"layer1.0.conv1": 5}
    text = "\n".join(warns)
    assert len(warns) == 6, warns
    assert "s.2=3 is below 9 (the option-A shortcut of stage 2); using 9" in text
    assert "s.3=999 is outside 1..64; using 64" in text
    assert "unknown residual-stream stage 's.7'" in text
    assert "stream clustering needs metric=euclidean; using metric=euclidean" in text
    assert "stream clustering needs fold_bn; using fold_bn=1" in text
    assert "k.layer1.0.conv2 is ignored: it writes the stage-1 residual stream" in text
    cfg, warns = ClusteringConfig.from_query({"s.1": "4", "granularity": "kernel"})
    assert cfg.stream == {} and warns == ["stream clustering needs granularity=filter; the s.<stage> values are ignored"]


KEYS = st.sampled_from(["s.1", "s.2", "s.3", "s.0", "s.x", "metric", "granularity", "fold_bn", "recovery"]
                       + [f"k.{n}" for n in CONV_LAYER_NAMES])
VALUES = st.one_of(st.integers(-5, 70).map(str), st.sampled_from(["cosine", "kernel", "lsq", "1", "0", "x"]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(KEYS, VALUES, max_size=10))
def test_from_query_never_raises_and_always_validates(params):
    cfg, warns = ClusteringConfig.from_query(params)
    assert cfg.validate() is cfg
    assert ClusteringConfig.from_query(cfg.to_query()) == (cfg, [])
    assert ClusteringConfig.from_json(cfg.to_json()) == cfg


def test_cli_flag():
    from explorer.cli.common import add_clustering_args, clustering_options, parser

    p = parser("prune", "test")
    add_clustering_args(p)
    cfg = clustering_options(p.parse_args(["--fold-bn", "--stream-k", "1=8", "--stream-k", "2=20"]))
    assert cfg.stream == {1: 8, 2: 20}
    assert clustering_options(p.parse_args([])).stream == {}
    with pytest.raises(SystemExit):
        p.parse_args(["--stream-k", "8"])
    with pytest.raises(ClusteringError, match="needs fold_bn"):
        clustering_options(p.parse_args(["--stream-k", "1=8"]))


# ---------------------------------------------------------------- real test images

@pytest.mark.realdata
def test_compressed_equals_clustered_on_real_test_images(real_data, shipped_model):
    images = normalize(real_data.test_images[:64])
    for cfg in (stream_config({1: 12, 2: 24, 3: 48}), stream_config({3: 48}, ks={"layer2.1.conv1": 16})):
        clustered, c = prune(shipped_model, cfg)
        small = compress(clustered, c)
        with torch.no_grad():
            ref, out = clustered(images), small(images)
        assert ref.abs().max() > 1.0
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
        assert count_macs(small) < 40_551_040


def test_search_and_sweep_refuse_a_stream_k(tmp_path):
    """The search chooses stream ks itself (stream moves, tests/test_analysis.py); it does not start
    from one. The sweep clusters one layer at a time."""
    from explorer.analysis.search import run_search
    from explorer.analysis.sensitivity import sweep

    with pytest.raises(ClusteringError, match="chooses stream ks itself with stream moves"):
        run_search(None, tmp_path / "x.search.json", [1.0], stream_config({1: 8}))
    with pytest.raises(ClusteringError, match="the sensitivity sweep clusters one layer at a time"):
        sweep(None, tmp_path / "x.sensitivity.json", None, [stream_config({1: 8})])


def test_prune_cli_with_a_stream_k(tmp_path, capsys):
    from explorer.cli.prune import config_from_args, build_parser

    args = build_parser().parse_args(["--fold-bn", "--stream-k", "1=8", "--layer", "layer2.0.conv1=9"])
    assert config_from_args(args) == stream_config({1: 8}, ks={"layer2.0.conv1": 9})
    path = tmp_path / "c.json"
    path.write_text(stream_config({2: 20}).to_json())
    assert config_from_args(build_parser().parse_args(["--config", str(path)])).stream == {2: 20}


# ---------------------------------------------------------------- the app's state

def test_app_url_roundtrip_with_stream_ks():
    from explorer.app import state

    view, warns = state.parse_query({"ckpt": "a", "fold_bn": "1", "s.1": "8", "s.2": "12", "k.layer1.0.conv1": "5"},
                                    ["a"])
    assert warns == []
    assert view.config.stream == {1: 8, 2: 12} and view.config.ks == {"layer1.0.conv1": 5}
    q = state.view_query(view)
    assert q["s.1"] == "8" and q["s.2"] == "12" and "s.3" not in q
    assert state.parse_query(q, ["a"]) == (view, [])
    assert state.s_key(3) == "s.3" and "stream" not in state.CONFIG_KEYS


def test_app_stream_sliders_drive_the_configuration():
    from streamlit.testing.v1 import AppTest

    def app():
        import streamlit as st

        from explorer.app import sidebar, state

        if "ready" not in st.session_state:
            view, _ = state.parse_query({"fold_bn": "1", "s.1": "6"}, ["a"])
            state.put_view(view, only_missing=False)
            st.session_state["ready"] = True
        sidebar.stream_sliders({1: 16, 2: 32, 3: 64})
        st.write(state.current_config().to_json())

    at = AppTest.from_function(app).run(timeout=60)
    assert not at.exception
    sliders = {s.key: s for s in at.sidebar.slider}
    assert sliders["s.1"].value == 6 and sliders["s.2"].value == 32 and sliders["s.3"].value == 64
    sliders["s.2"].set_value(10).run(timeout=60)
    from explorer.app import state  # noqa: F401 (the app imported it)
    cfg = ClusteringConfig.from_json(at.markdown[-1].value)
    assert cfg.stream == {1: 6, 2: 10} and cfg.fold_bn
