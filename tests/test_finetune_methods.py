"""The fine-tuning methods beside the tied one: the merged (narrow) net, centripetal SGD, and the
pruned baseline trained with the same loop; and the loop's precision choice.

Synthetic data on one thread; the shipped checkpoint where the clusters must merge."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _models import positive_bn_model
from explorer import checkpoints as ckpt
from explorer import pruning
from explorer.cli.finetune import main as finetune_main
from explorer.clustering import Clustering, ClusteringConfig, LayerClustering
from explorer.compress import compress, count_macs
from explorer.data import normalize, synthetic_cifar10
from explorer.training.centripetal import CentripetalGroups, project, projected_clustering
from explorer.training.loop import memory_format, resolve_precision
from explorer.training.narrow import expand_pruned, narrow_from_tied, write_back
from explorer.training.finetune import list_finetuned
from explorer.training.tied import TiedConv, prepare
from explorer.analysis.baselines import finetuned_table
from explorer.analysis.charts import finetuned_comparison_chart

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints" / "resnet20_cifar10.pt"
HALF = {f"layer{s}.{b}.conv1": w // 2 for s, w in zip((1, 2, 3), (16, 32, 64)) for b in range(3)}
# MACs of ResNet20 with every block's first conv at half its filters and the second conv reading
# half its channels (counted by hand in _half_macs_by_hand).
HALF_MACS = 20_497_024


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data():
    return synthetic_cifar10(120, 40, seed=3)


def _half_macs_by_hand() -> int:
    total = 3 * 16 * 9 * 1024  # stem
    cin = 16
    for c, hw in ((16, 1024), (32, 256), (64, 64)):
        for b in range(3):
            k = c // 2
            total += cin * k * 9 * hw + k * c * 9 * hw  # conv1 (Cin -> k), conv2 (k -> C)
            cin = c
    return total + 64 * 10


BN_KINDS = {  # (momentum, affine, track_running_stats, frozen: bn.eval() while the conv trains)
    "momentum": (0.1, True, True, False), "cumulative": (None, True, True, False),
    "not-affine": (0.1, False, True, False), "batch-stats-only": (0.1, True, False, False),
    "frozen": (0.1, True, True, True)}


@pytest.mark.parametrize("bn_kind", [None, *BN_KINDS])
@pytest.mark.parametrize("unit", [True, False])
def test_tied_conv_training_forward_is_its_definition(bn_kind, unit):
    # Training runs the expanded filter bank (faster on CPU); outputs, centroid and BN gradients and
    # the k-channel running statistics must be those of the gathered definition (``_gathered``, which
    # eval mode runs), here with ``bn`` in training mode.
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 0, 0, 3, 1])  # 12 filters in 5 clusters + 1 empty
    post = torch.ones(12) if unit else torch.rand(12) + 0.5
    bn = None
    if bn_kind is not None:
        momentum, affine, track, frozen = BN_KINDS[bn_kind]
        bn = torch.nn.BatchNorm2d(6, momentum=momentum, affine=affine, track_running_stats=track)
        if affine:
            bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.normal_()
        if track:
            bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
    fast = TiedConv(torch.randn(6, 4, 3, 3), labels, post if bn is None else torch.ones(12), 2, bn,
                    post if bn is not None else None)
    assert fast.unit == unit
    ref = copy.deepcopy(fast)
    x = torch.randn(5, 4, 8, 8)
    for _ in range(2):
        for m in (fast, ref):
            m.train()
            if bn is not None and frozen:
                m.bn.eval()
        a, b = fast(x), ref._gathered(x)
        assert a.shape == (5, 12, 4, 4)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(a)
        (a * g).sum().backward(), (b * g).sum().backward()
        torch.testing.assert_close(fast.centroids.grad, ref.centroids.grad, rtol=1e-4, atol=1e-4)
        if bn is not None and track:
            # Cluster 5 has no member: its statistics reach no output (the definition updates them, the
            # expanded bank leaves them alone).
            for name in ("running_mean", "running_var"):
                torch.testing.assert_close(getattr(fast.bn, name)[:5], getattr(ref.bn, name)[:5], rtol=1e-5, atol=1e-6)
            assert int(fast.bn.num_batches_tracked) == int(ref.bn.num_batches_tracked) == (0 if frozen else _ + 1)
        if bn is not None and affine:
            torch.testing.assert_close(fast.bn.weight.grad, ref.bn.weight.grad, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(fast.bn.bias.grad, ref.bn.bias.grad, rtol=1e-4, atol=1e-4)


def test_tied_conv_training_forward_under_bf16_channels_last():
    # The fine-tuning setting the expanded bank is for: bf16 autocast, channels_last input.
    torch.manual_seed(1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 3, 3, 1, 2, 0, 1, 2, 3, 0])
    bn = torch.nn.BatchNorm2d(4)
    fast = TiedConv(torch.randn(4, 8, 3, 3), labels, torch.ones(16), 1, bn, torch.rand(16) + 0.5).train()
    ref = copy.deepcopy(fast)
    x = torch.randn(16, 8, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = fast(x), ref._gathered(x)
    assert a.dtype == b.dtype
    torch.testing.assert_close(a.float(), b.float(), rtol=0.02, atol=0.05)
    a.float().sum().backward(), b.float().sum().backward()
    torch.testing.assert_close(fast.centroids.grad, ref.centroids.grad, rtol=0.05, atol=0.5)
    torch.testing.assert_close(fast.bn.running_mean, ref.bn.running_mean, rtol=0.02, atol=1e-2)


def test_half_macs_hand_computed():
    assert _half_macs_by_hand() == HALF_MACS


def test_narrow_net_is_the_tied_net_at_the_compressed_macs(data):
    base = positive_bn_model(1)
    cfg = ClusteringConfig(ks=HALF, fold_bn=True)
    _, _, small, tied, merged = prepare(base, cfg, data, 100)
    assert merged == set(HALF)
    narrow = narrow_from_tied(tied, merged).eval()
    x = normalize(data.test_images[:16])
    with torch.no_grad():
        ref = tied(x)
        assert float((narrow(x) - ref).abs().max()) < 1e-4 * max(1.0, float(ref.abs().max()))
    assert count_macs(narrow) == count_macs(small) == HALF_MACS
    assert tuple(narrow.get_submodule("layer2.1.conv1").weight.shape) == (16, 32, 3, 3)
    assert tuple(narrow.get_submodule("layer2.1.conv2").weight.shape) == (32, 16, 3, 3)


def test_write_back_keeps_the_trained_narrow_function(data):
    base = positive_bn_model(2)
    _, _, _, tied, merged = prepare(base, ClusteringConfig(ks=HALF, fold_bn=True), data, 100)
    narrow = narrow_from_tied(tied, merged).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in narrow.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    out = copy.deepcopy(tied)
    write_back(narrow, out, merged)
    x = normalize(data.test_images[:16])
    with torch.no_grad():
        want = narrow(x)
        assert float((out(x) - want).abs().max()) < 1e-4 * max(1.0, float(want.abs().max()))
        # and what was trained really moved: the written-back net is not the old one
        assert float((tied(x) - want).abs().max()) > 1e-2


def _groups(model, labels: dict[str, np.ndarray]):
    layers = {n: LayerClustering(n, int(lab.max()) + 1, lab, np.zeros((1, 1), np.float32), 0.0,
                                 np.zeros((1, 1), np.float32), model.get_submodule(n).weight.detach().clone(),
                                 None, torch.ones(len(lab)))
              for n, lab in labels.items()}
    return Clustering(ClusteringConfig(ks={n: int(lab.max()) + 1 for n, lab in labels.items()}, fold_bn=True), layers)


def test_centripetal_pull_shrinks_differences_by_the_strength():
    model = positive_bn_model(3).train()
    labels = {"layer1.0.conv1": np.arange(16) % 4}
    cl = _groups(model, labels)
    groups = CentripetalGroups(model, cl)
    before = groups.spread()
    groups.pull(0.25)
    assert groups.spread() == pytest.approx(0.75 * before, rel=1e-5)
    groups.pull(1.0)
    w = model.get_submodule("layer1.0.conv1").weight
    assert torch.allclose(w[0], w[4]) and torch.allclose(w[0], w[12]) and not torch.allclose(w[0], w[1])


def test_centripetal_gradients_are_cluster_means():
    model = positive_bn_model(4).train()
    labels = {"layer2.0.conv1": np.arange(32) % 5}
    groups = CentripetalGroups(model, _groups(model, labels))
    x = torch.randn(4, 3, 32, 32)
    model(x).square().sum().backward()
    g0 = model.get_submodule("layer2.0.conv1").weight.grad.clone()
    groups.average_gradients()
    g = model.get_submodule("layer2.0.conv1").weight.grad
    assert torch.allclose(g[0], (g0[0] + g0[5] + g0[10] + g0[15] + g0[20] + g0[25] + g0[30]) / 7, atol=1e-6)
    assert torch.equal(g[0], g[30])


def test_projected_net_merges_exactly(data):
    model = positive_bn_model(5)
    labels = {n: np.arange(c) % (c // 2) for n, c in (("layer1.1.conv1", 16), ("layer3.2.conv1", 64))}
    cl = _groups(model, labels)
    proj = project(model, CentripetalGroups(model, cl))
    small = compress(proj, projected_clustering(proj, cl))
    spec = {s.name: s for s in small.specs}
    assert spec["layer1.1.conv1"].filters == 8 and not spec["layer1.1.conv1"].gathered
    assert spec["layer3.2.conv2"].in_channels == 32
    x = normalize(data.test_images[:16])
    with torch.no_grad():
        assert float((small(x) - proj(x)).abs().max()) < 1e-4


def test_expanded_pruned_net_is_the_pruned_net(data):
    base = positive_bn_model(6)
    masked, kept = pruning.prune(base, HALF, "l1")
    narrow = pruning.pruned_structure(masked, kept).eval()
    with torch.no_grad():
        for p in narrow.parameters():
            p.mul_(1.01)
    full = expand_pruned(narrow, masked, kept)
    x = normalize(data.test_images[:16])
    with torch.no_grad():
        assert float((full(x) - narrow(x)).abs().max()) < 1e-4
    dead = np.setdiff1d(np.arange(16), kept["layer1.0.conv1"])
    assert float(full.get_submodule("layer1.0.conv1").weight.detach()[dead].abs().max()) == 0.0
    assert count_macs(narrow) == HALF_MACS


METHOD_RUNS = {"merged": ("--method", "merged"), "fpgm": ("--pruning", "fpgm"),
               "centripetal": ("--method", "centripetal")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny 1-epoch run of each method into one directory: {run name: metadata}."""
    out = tmp_path_factory.mktemp("methods")
    cfg = out / "half.json"
    cfg.write_text(json.dumps({"ks": HALF, "fold_bn": True, "recovery": "lsq"}))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, extra in METHOD_RUNS.items():
            rc = finetune_main(["--config", str(cfg), "--checkpoint", str(CHECKPOINT), "--synthetic", "40",
                                "--batch-size", "20", "--threads", "1", "--epochs", "1", "--cutout", "0",
                                "--out", str(out), "--name", f"base_{name}_ft", "--quiet", *extra])
            assert rc == 0
    finally:
        torch.set_num_threads(n)
    return out, {m["name"]: m for m in list_finetuned(out)}


@pytest.mark.parametrize("name", list(METHOD_RUNS))
def test_finetune_cli_methods(runs, name):
    out, metas = runs
    meta = metas[f"base_{name}_ft"]
    assert meta["status"] == "complete"
    assert meta["finetune"]["method_name"] == ("pruned" if name == "fpgm" else name)
    assert meta["compression"]["macs"] == HALF_MACS
    for f in meta["compressed_export"]:
        assert Path(f).is_file()
    model = ckpt.load_model(out / f"base_{name}_ft.pt")  # the app and the CLIs load it
    assert model.get_submodule("layer1.0.conv1").weight.shape == (16, 16, 3, 3)
    assert len(meta["recovery"]) == 2 and meta["recovery"][0]["test_top1"] == meta["before"]["top1"]


def test_pruned_and_clustered_nets_of_one_structure_count_the_same_parameters(runs):
    # Pruned runs counted their BatchNorm unfolded: the FPGM net at the half point read 135,754
    # parameters against 135,234 for the merged clustered net of the very same shapes.
    _, metas = runs
    pruned, merged = metas["base_fpgm_ft"]["compression"], metas["base_merged_ft"]["compression"]
    assert pruned["params"] == merged["params"] == 135_234
    assert pruned["compression_ratio"] == merged["compression_ratio"] == 269_722 / 135_234  # recorded alike


def test_comparison_after_finetuning_table_and_chart(runs):
    _, metas = runs
    t = finetuned_table(list(metas.values()))
    assert sorted(t["method"]) == ["clustering (weight space, centripetal)", "clustering (weight space, merged)",
                                   "pruning (fpgm)"]
    assert set(t["epochs"]) == {1}
    assert dict(zip(t["method"], t["recovery"])) == {"clustering (weight space, centripetal)": "base weights",
                                                      "clustering (weight space, merged)": "lsq", "pruning (fpgm)": "lsq"}
    assert t["mac_reduction"].round(6).nunique() == 1  # equal MACs: the comparison is at one point
    spec = finetuned_comparison_chart(t).to_dict()
    assert spec["facet"]["column"]["field"] == "budget"
    still = dict(metas["base_fpgm_ft"], status="training")
    assert len(finetuned_table([still])) == 0


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_follows_native_bf16(monkeypatch, native):
    from explorer.training import loop

    monkeypatch.setattr(loop, "fast_bf16", lambda device: native)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    assert memory_format("fp32", cpu) == torch.contiguous_format
    assert memory_format("bf16", cpu) == torch.channels_last


def test_resume_pins_the_precision_a_run_resolved_to(tmp_path):
    """--precision auto is pinned as what it resolved to: a run that trained in fp32 (this file, as
    written by the command) refuses to continue in bf16, and continues in fp32."""
    cfg = tmp_path / "half.json"
    cfg.write_text(json.dumps({"ks": {"layer1.0.conv1": 8}, "fold_bn": True}))
    args = ["--config", str(cfg), "--checkpoint", str(CHECKPOINT), "--synthetic", "40", "--batch-size", "20",
            "--threads", "1", "--epochs", "2", "--cutout", "0", "--out", str(tmp_path), "--name", "r", "--quiet",
            "--stop-after", "1", "--precision", "fp32"]
    assert finetune_main(args) == 0
    saved = ckpt.load_torch(tmp_path / "r.train.pt")["finetune"]["precision"]
    assert saved == "fp32"
    with pytest.raises(ValueError, match="precision was 'fp32'"):
        from explorer.training.loop import Pins

        Pins("finetune", {"precision": "bf16"}, frozenset({"precision"})).check({"finetune": {"precision": saved}},
                                                                              "r.train.pt")
    assert finetune_main(args[:-2] + ["--precision", "auto", "--resume"]) == (
        0 if resolve_precision("auto", torch.device("cpu")) == "fp32" else 2)


@pytest.mark.parametrize("options, needle", [({"fold_bn": False}, "fold_bn"),
                                             ({"fold_bn": True, "metric": "cosine"}, "euclidean")])
def test_centripetal_refuses_what_would_not_merge(tmp_path, options, needle, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"ks": {"layer1.0.conv1": 8}, **options}))
    rc = finetune_main(["--config", str(cfg), "--checkpoint", str(CHECKPOINT), "--synthetic", "40", "--batch-size",
                        "20", "--threads", "1", "--epochs", "1", "--out", str(tmp_path), "--name", "c", "--quiet",
                        "--method", "centripetal"])
    assert rc != 0 and needle in capsys.readouterr().err
    assert not (tmp_path / "c.pt").exists()


def test_pruning_refuses_a_stream(tmp_path, capsys):
    cfg = tmp_path / "p.json"
    cfg.write_text(json.dumps({"ks": {"layer1.0.conv1": 8}, "stream": {"1": 12}, "fold_bn": True}))
    rc = finetune_main(["--config", str(cfg), "--checkpoint", str(CHECKPOINT), "--synthetic", "40", "--batch-size",
                        "20", "--threads", "1", "--epochs", "1", "--out", str(tmp_path), "--name", "p", "--quiet",
                        "--pruning", "l1"])
    assert rc != 0 and "stream" in capsys.readouterr().err


def test_2d_view_of_a_stream_writer_shows_the_shared_clusters():
    from explorer.projection import layer_map

    model = positive_bn_model(7)
    cfg = ClusteringConfig(stream={1: 12, 2: 20}, fold_bn=True)
    stem, writer = layer_map(model, cfg, "conv1"), layer_map(model, cfg, "layer1.1.conv2")
    assert stem.k == writer.k == 12 and np.array_equal(stem.labels, writer.labels)
    assert len(np.unique(stem.labels)) == 12 and stem.centroids.shape == (12, stem.points.shape[1])
    assert layer_map(model, cfg, "layer2.1.conv2").k == 20
    assert layer_map(model, cfg, "layer3.0.conv2").labels is None


def test_latency_table_loads_both_kinds_of_export(runs):
    from explorer.analysis.latency import latency_table, load_export

    out, metas = runs
    exports = [out / "compressed" / f"base_{n}_ft.pt" for n in ("merged", "fpgm")]
    x = normalize(synthetic_cifar10(10, 10, seed=5).test_images)
    for e, name in zip(exports, ("merged", "fpgm")):
        net = load_export(e)
        plain = ckpt.load_model(out / f"base_{name}_ft.pt")
        with torch.no_grad():  # the export computes what the saved (full-width) checkpoint computes
            want = plain(x)  # (noise images: logits in the thousands, hence the relative bound)
            assert float((net(x) - want).abs().max()) < 1e-5 * max(1.0, float(want.abs().max()))
    rows = latency_table(exports, CHECKPOINT, batches=(2,), repeats=1)
    assert [r["export"] for r in rows] == ["base_merged_ft", "base_fpgm_ft"]
    assert all(r["macs"] == HALF_MACS and r["baseline_macs"] == 40_551_040 for r in rows)
    import onnxruntime as ort  # what ONNX Runtime times is the same net

    for e in exports:
        got = ort.InferenceSession(str(e.with_suffix(".onnx")), providers=["CPUExecutionProvider"]).run(
            None, {"images": x.numpy()})[0]
        want = load_export(e)(x).detach().numpy()
        assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("method", ["merged", "centripetal"])
def test_finetune_keeps_a_clustered_residual_stream(tmp_path, method):
    """A configuration with clustered streams fine-tunes with every method and keeps its structure:
    the stem writes 12 channels, stage 3 reads 48, the export is as small as the clustered net."""
    cfg = tmp_path / "stream.json"
    cfg.write_text(json.dumps({"ks": {"layer1.0.conv1": 8}, "stream": {"1": 12, "3": 48}, "fold_bn": True}))
    rc = finetune_main(["--config", str(cfg), "--checkpoint", str(CHECKPOINT), "--synthetic", "40", "--batch-size",
                        "20", "--threads", "1", "--epochs", "1", "--cutout", "0", "--out", str(tmp_path),
                        "--name", "s", "--quiet", "--method", method])
    assert rc == 0
    meta = json.loads((tmp_path / "s.json").read_text())
    layers = {r["layer"]: r for r in meta["compression"]["layers"]}
    assert layers["conv1"]["filters"] == 12 and layers["layer1.0.conv1"]["in_channels"] == 12
    assert layers["layer1.0.conv1"]["filters"] == 8 and layers["layer3.2.conv2"]["out_channels"] == 48
    assert meta["compression"]["macs"] == meta["finetune"]["macs"]  # the structure did not change while training


def test_comparison_table_says_what_each_run_started_from():
    base = {"status": "complete", "baseline": {"top1": 0.9}, "before": {"top1": 0.5}, "after": {"top1": 0.8},
            "compression": {"mac_reduction": 0.5}, "epochs_done": 3}
    legacy = dict(base, name="a", finetune={"method_name": "tied"}, clustering={"ks": {}, "recalibrate_bn": 2000})
    pruned = dict(base, name="b", finetune={"method_name": "pruned", "pruning": "l1", "recovery": "lsq"})
    t = finetuned_table([legacy, pruned]).set_index("name")
    assert t.loc["a", "recovery"] == "bn" and t.loc["b", "recovery"] == "lsq"
    assert t.loc["b", "method"] == "pruning (l1)" and t.loc["a", "drop_pts"] == pytest.approx(10.0)
    assert t.loc["a", "method"] == "clustering (weight space, tied)"
    streams = dict(base, name="c", finetune={"method_name": "merged"},
                   clustering={"ks": {}, "space": "data", "fold_bn": True, "stream": {"1": 14, "3": 64}})
    assert finetuned_table([streams]).loc[0, "method"] == "clustering (data-aware, merged, residual streams)"
