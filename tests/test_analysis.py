"""Analysis tools on synthetic data and a random ResNet20 (one torch thread, tiny test split):
sensitivity sweep (reference point, resume), greedy search (budget on verified numbers, back-off,
resume, best_config), fine-tuning that keeps clusters (exactly clustered weights, same compressed
architecture, compressed logits equal), report and chart builders, CLI --help."""
from __future__ import annotations

import json
import re

import pytest
import torch

from explorer import checkpoints as ckpt
from explorer.analysis.results import ResultsMismatch, make_explorer
from explorer.digest import state_digest as weights_digest
from explorer.clustering import ClusteringConfig, prune
from explorer.compress import compress
from explorer.data import normalize, synthetic_cifar10
from explorer.model import conv_layer

from _models import randomized_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data():
    return synthetic_cifar10(64, 60, seed=3)


@pytest.fixture(scope="module")
def model():
    return randomized_model(0)


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    p = tmp_path_factory.mktemp("ck") / "rand.pt"
    ckpt.save_torch({k: v.clone() for k, v in model.state_dict().items()}, p)
    return p


@pytest.fixture(scope="module")
def explorer(model, data):
    e = make_explorer(model, data, "rand", 64)
    assert not getattr(e.engine, "mixed", False)  # exact fp32 path
    return e


class Counting:
    """Wraps an Explorer and counts run() calls."""

    def __init__(self, explorer):
        self.e, self.calls = explorer, 0

    def __getattr__(self, name):
        return getattr(self.e, name)

    def run(self, config, latency_batches=()):
        self.calls += 1
        return self.e.run(config, latency_batches)


# ---------------------------------------------------------------- sensitivity

def test_k_grid():
    from explorer.analysis.sensitivity import k_grid

    assert k_grid(16) == [1, 2, 4, 8, 16]
    assert k_grid(64) == [1, 2, 4, 8, 16, 32, 64]
    assert k_grid(32, (3, 32, 64)) == [3, 32]


def test_sensitivity_reference_point_delta_zero_and_resume_skips_done_points(explorer, tmp_path):
    from explorer.analysis.sensitivity import load_sensitivity, point_key, sweep

    path = tmp_path / "rand.sensitivity.json"
    ex = Counting(explorer)
    opts = ClusteringConfig()
    doc = sweep(ex, path, ["layer3.2.conv2"], [opts], grid=(2,), progress=False, max_points=1)
    assert ex.calls == 1 and len(doc["points"]) == 1  # interrupted after one point
    doc = sweep(ex, path, ["layer3.2.conv2", "layer1.0.conv1"], [opts], grid=(2,), progress=False)
    assert ex.calls == 4 and len(doc["points"]) == 4  # only the 3 missing points were measured
    ref = doc["points"][point_key("layer3.2.conv2", 64, opts)]
    assert ref["top1_delta"] == 0.0 and ref["top1"] == explorer.baseline.top1
    assert all(v == 0.0 for v in ref["per_class_delta"].values())
    assert ref["macs"] == ref["baseline_macs"]
    p2 = doc["points"][point_key("layer3.2.conv2", 2, opts)]
    direct = explorer.run(ClusteringConfig(ks={"layer3.2.conv2": 2}))
    assert p2["top1"] == direct.evaluation.top1
    assert p2["macs"] == direct.compression.macs < ref["macs"]
    # a rerun measures nothing, and the file on disk has every point
    sweep(ex, path, ["layer3.2.conv2", "layer1.0.conv1"], [opts], grid=(2,), progress=False)
    assert ex.calls == 4
    assert len(json.loads(path.read_text())["points"]) == 4
    df = load_sensitivity(path)
    assert list(df.layer) == ["layer1.0.conv1", "layer1.0.conv1", "layer3.2.conv2", "layer3.2.conv2"]
    assert list(df.k) == [2, 16, 2, 64]
    row = df[(df.layer == "layer3.2.conv2") & (df.k == 2)].iloc[0]
    assert row.drop_pts == pytest.approx(-100 * p2["top1_delta"])
    assert row.mac_reduction == pytest.approx(1 - p2["macs"] / p2["baseline_macs"])
    long = load_sensitivity(path, per_class=True)
    assert len(long) == 40 and set(long.columns) >= {"layer", "k", "class", "accuracy", "delta"}


def test_sensitivity_refuses_results_of_other_weights(explorer, data, tmp_path):
    from explorer.analysis.sensitivity import sweep

    path = tmp_path / "x.sensitivity.json"
    sweep(explorer, path, ["layer3.2.conv2"], grid=(32,), progress=False, max_points=1)
    other = make_explorer(randomized_model(1), data, "other", 16)
    with pytest.raises(ResultsMismatch, match="weights_sha1"):
        sweep(other, path, ["layer3.2.conv2"], grid=(32,), progress=False)
    doc = sweep(other, path, ["layer3.2.conv2"], grid=(32,), progress=False, restart=True, max_points=1)
    assert doc["header"]["weights_sha1"] == weights_digest(other.model)


# ---------------------------------------------------------------- search

@pytest.mark.parametrize("fold_bn", [False, True])
def test_search_costs_are_the_compressed_nets_counts(fold_bn):
    """The search ranks moves by the one MAC counter (compress.count_macs) and the one parameter
    counter (model.count_parameters) of the compressed net, without evaluating it; checked against
    the count by hand from the conv specs: filters x in_channels x 9 x output pixels + the classifier."""
    from explorer.analysis.search import CostModel

    model = randomized_model(3)
    cost = CostModel(model)
    cfg = ClusteringConfig(fold_bn=fold_bn).with_k("conv1", 5).with_k("layer1.1.conv1", 3) \
        .with_k("layer2.0.conv1", 11).with_k("layer3.2.conv2", 20)
    for c in (ClusteringConfig(), cfg):
        small = compress(*prune(model, c))
        total, h = 0, 32
        for s in small.specs:
            h //= s.stride
            total += s.filters * s.in_channels * 9 * h * h
        assert cost(c)["macs"] == total + 64 * 10
        assert cost(c)["params"] == sum(p.numel() for p in small.parameters())
    assert cost(ClusteringConfig())["macs"] == 40_551_040  # ResNet20's count


def test_greedy_backs_off_and_respects_the_budget_on_verified_numbers():
    """A fake net: the verified drop is the sum of single-layer drops plus an interaction the
    sensitivity table cannot see (0.5 points once three layers are clustered), so a move that the
    table says fits the budget fails verification and the greedy backs off. The budget applies to
    the held-out training drop (``select_drop_pts``); the test drop (here 5 points more) is only
    recorded, never used to choose."""
    from explorer.analysis.search import greedy

    a, b, c = "layer3.2.conv2", "layer3.1.conv1", "layer2.0.conv1"
    drops = {a: {64: 0.0, 32: 0.1, 16: 0.3, 8: 2.0}, b: {64: 0.0, 32: 0.2, 16: 0.4, 8: 3.0},
             c: {32: 0.0, 16: 0.5, 8: 0.6}}
    evaluated = []

    def cost(cfg):
        return {"macs": sum(cfg.ks.get(n, conv_layer(n).filters) * 1000 for n in drops), "params": 0}

    def evaluate(cfg, source):
        evaluated.append(dict(cfg.ks))
        d = sum(drops[n][k] for n, k in cfg.ks.items()) + (0.5 if len(cfg.ks) >= 3 else 0.0)
        return {"config": cfg.to_dict(), "select_drop_pts": d, "drop_pts": d + 5.0, "top1": 0.9 - (d + 5) / 100,
                **cost(cfg)}

    r = greedy(evaluate, cost, drops, ClusteringConfig(), budget=1.2)
    # by hand: ratios MACs saved / (estimated points + 0.05) pick a->32, b->32, b->16, a->16; then
    # c->16 is estimated at 0.7 + 0.5 = 1.2 <= 1.2 but verifies at 1.7: rejected, and c <= 16 is
    # never tried again (c->8 would be estimated 1.3 anyway).
    assert [(s["layer"], s["k"]) for s in r.accepted] == [(a, 32), (b, 32), (b, 16), (a, 16)]
    assert [(s["layer"], s["k"]) for s in r.rejected] == [(c, 16)]
    assert r.rejected[0]["select_drop_pts"] == pytest.approx(1.7)
    assert all(s["select_drop_pts"] <= 1.2 for s in r.accepted)
    assert r.best["config"]["ks"] == {b: 16, a: 16} and r.best["select_drop_pts"] == pytest.approx(0.7)
    assert r.best["drop_pts"] == pytest.approx(5.7)  # recorded, not chosen on
    assert r.best["macs"] == (16 + 16 + 32) * 1000 == min(s["macs"] for s in r.accepted)
    assert r.evaluations == 5 and len(evaluated) == 6  # + the unclustered start
    # budget 0: only moves that are free on verified numbers (none here)
    r0 = greedy(evaluate, cost, drops, ClusteringConfig(), budget=0.0)
    assert r0.best["select_drop_pts"] == 0.0 and r0.best["config"]["ks"] == {}


def test_search_verifies_budget_resumes_and_best_config(explorer, tmp_path):
    from explorer.analysis.search import best_config, best_record, load_search, pareto_front, pareto_table, run_search

    path = tmp_path / "rand.search.json"
    ex = Counting(explorer)
    layers = ["layer2.2.conv1", "layer3.2.conv1", "layer3.2.conv2"]
    kw = dict(uniform_ks=(2,), layers=layers, grid=(2, 8), progress=False)
    doc = run_search(ex, path, [0.0, 3.0, 100.0], ClusteringConfig(fold_bn=True), **kw)
    n_calls = ex.calls
    assert (tmp_path / "rand.sensitivity.json").is_file()
    runs = {r["budget"]: r for r in doc["runs"].values()}
    for b, r in runs.items():
        assert r["best"]["drop_pts"] <= b
        assert all(s["drop_pts"] <= b for s in r["accepted"])
        assert all(s["drop_pts"] > b for s in r["rejected"])
        # the stored numbers are the verified ones: re-evaluating gives the same top-1
        cfg = ClusteringConfig.from_dict(r["best"]["config"])
        res = explorer.run(cfg)
        assert res.evaluation.top1 == r["best"]["top1"] and res.compression.macs == r["best"]["macs"]
    assert runs[100.0]["best"]["macs"] < explorer.run(ClusteringConfig()).compression.macs
    # resume: a rerun evaluates nothing new
    run_search(ex, path, [0.0, 3.0, 100.0], ClusteringConfig(fold_bn=True), **kw)
    assert ex.calls == n_calls
    # best_config: lowest MACs within the budget among all verified evaluations (so it can only
    # get smaller as the budget grows)
    assert best_record(path, 3.0) is not None and best_record(path, 100.0) is not None
    macs = [best_record(path, b)["macs"] if best_record(path, b) else 10**9 for b in (0.0, 3.0, 100.0)]
    assert macs[0] >= macs[1] >= macs[2]
    for b in (3.0, 100.0):
        rec = best_record(path, b)
        assert rec["drop_pts"] <= b
        assert best_config(path, b) == ClusteringConfig.from_dict(rec["config"])
        assert all(r["macs"] >= rec["macs"] for r in load_search(path)["evaluations"].values()
                   if r["drop_pts"] <= b and r["config"]["ks"])
    front = pareto_front(list(doc["evaluations"].values()))
    assert [r["macs"] for r in front] == sorted(r["macs"] for r in front)
    assert all(a["top1"] < b["top1"] for a, b in zip(front, front[1:]))
    table = pareto_table(path)
    assert len(table) == len(doc["evaluations"]) and table.pareto_macs.sum() == len(front)
    assert set(table.source) == {"greedy", "uniform"}


# ---------------------------------------------------------------- fine-tuning

def _exactly_clustered(weight: torch.Tensor, labels) -> bool:
    w = weight.reshape(weight.shape[0], -1)
    labels = torch.as_tensor(labels)
    return all(bool((w[labels == c] == w[labels == c][0]).all()) for c in torch.unique(labels))


def test_finetune_keeps_weights_exactly_clustered_and_compress_matches(checkpoint, model, data, tmp_path):
    from explorer.training.finetune import FinetuneConfig, finetune
    from explorer.training.tied import distinct_filters

    cfg = ClusteringConfig(ks={"conv1": 6, "layer1.0.conv1": 4, "layer2.1.conv1": 8, "layer3.2.conv2": 8},
                           fold_bn=True)
    clustered, _ = prune(model, cfg)
    initial = compress(clustered, prune(model, cfg)[1])
    ft = FinetuneConfig(epochs=2, batch_size=32, lr=0.05, name="rand_ft", out=str(tmp_path), rebase_images=64,
                        precision="fp32")
    meta = finetune(checkpoint, cfg, ft, data, quiet=True, stop_after=1)
    assert meta["status"] == "training" and meta["epochs_done"] == 1
    first = json.loads((tmp_path / "rand_ft.log.jsonl").read_text().splitlines()[0])
    meta = finetune(checkpoint, cfg, ft, data, resume=True, quiet=True)  # resumes at epoch 2
    assert meta["status"] == "complete" and len(meta["recovery"]) == 3
    assert json.loads((tmp_path / "rand_ft.log.jsonl").read_text().splitlines()[0]) == first

    tuned = ckpt.load_model(tmp_path / "rand_ft.pt")
    for name, k in cfg.ks.items():
        w = tuned.get_submodule(name).weight.detach()
        assert distinct_filters(w) == k, name
        assert _exactly_clustered(w, meta["labels"][name])
        assert not torch.equal(w, clustered.get_submodule(name).weight), f"{name} did not train"
        assert meta["distinct_filters"][name] == k
    # the app's path: re-clustering the tuned weights with the same configuration is exact
    again, clustering = prune(tuned, cfg)
    small = compress(again, clustering)
    assert [s for s in small.specs] == [s for s in initial.specs]
    assert any(s.filters < conv_layer(s.name).filters and not s.gathered for s in small.specs)  # merged
    x = normalize(data.test_images[:32])
    with torch.no_grad():
        assert torch.allclose(small(x), tuned(x), atol=1e-4)
        assert torch.allclose(again(x), tuned(x), atol=1e-4)
    assert meta["after"]["compressed_vs_plain_max_abs_logit_diff"] < 1e-4
    from explorer.compress import load_compressed

    exported = load_compressed(tmp_path / "compressed" / "rand_ft.pt")
    with torch.no_grad():
        assert torch.allclose(exported(x), tuned(x), atol=1e-4)
    assert (tmp_path / "compressed" / "rand_ft.onnx").is_file()
    infos = {i.name: i for i in ckpt.list_checkpoints(tmp_path)}
    assert infos["rand_ft"].complete and infos["rand_ft"].error is None


def test_tied_cosine_steps_stay_clustered(model, data):
    """Cosine metric without fold_bn: filters keep their own norms; after SGD steps every filter is
    still exactly its cluster's centroid times its fixed scale, and compress() matches."""
    import torch.nn.functional as F

    from explorer.training.tied import materialize, merged_layers, tie, tied_clustering, tied_layers

    cfg = ClusteringConfig(ks={"layer1.1.conv1": 3, "layer3.0.conv2": 5}, metric="cosine")
    clustered, clustering = prune(model, cfg)
    tied = tie(clustered, clustering, merged_layers(compress(clustered, clustering)))
    x = normalize(data.train_images[:16])
    with torch.no_grad():
        assert torch.allclose(tied(x), clustered(x), atol=1e-4)
    opt = torch.optim.SGD(tied.parameters(), lr=0.1, momentum=0.9)
    tied.train()
    for _ in range(2):
        loss = F.cross_entropy(tied(x), data.train_labels[:16])
        opt.zero_grad()
        loss.backward()
        for t in tied_layers(tied).values():
            t.average_gradients()
        opt.step()
    plain = materialize(tied)
    for name, t in tied_layers(tied).items():
        w = plain.get_submodule(name).weight.detach()
        assert torch.equal(w, t.centroids.detach()[t.labels] * t.scales.view(-1, 1, 1, 1))
        assert t.centroids.shape[0] == cfg.ks[name]
        assert not torch.equal(w, clustered.get_submodule(name).weight)
    small = compress(plain, tied_clustering(tied, cfg, clustering))
    with torch.no_grad():
        assert torch.allclose(small(x), plain(x), atol=1e-4)
        assert torch.allclose(tied.eval()(x), plain(x), atol=1e-4)


# ---------------------------------------------------------------- report, charts, CLIs

def test_report_builds_and_reuses_evaluations(explorer, tmp_path):
    from explorer.analysis.report import build_report
    from explorer.analysis.search import run_search

    run_search(explorer, tmp_path / "rand.search.json", [1.0], ClusteringConfig(), uniform_ks=(4,),
               layers=["layer3.2.conv2"], grid=(4,), progress=False)
    out = tmp_path / "report"
    ex = Counting(explorer)
    doc = build_report(ex, out, tmp_path / "rand.sensitivity.json", tmp_path / "rand.search.json", None,
                       recalibrate=0, compare_ks=(2,), latency=False, png=False, progress=False)
    calls = ex.calls
    assert calls >= 5  # k = 3, the best configuration, 2 metrics x 2 granularities
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for section in ("Baseline per-class accuracy", "k = 3 in every layer", "Layer sensitivity",
                    "Best per-layer k", "Fine-tuning recovery", "Euclidean vs cosine", "Headline"):
        assert section in md and section in page
    assert page.count('vegaEmbed("#chart') >= 6
    assert "cdn.jsdelivr.net" in page
    k3 = doc["numbers"]["k3"]["k=3"]
    assert k3["config"]["ks"] == ClusteringConfig.uniform(3).to_dict()["ks"]
    assert re.search(r"^\| airplane +\|", md, re.M) and (out / "headline.md").is_file()  # a table row per class
    assert "<td>airplane</td>" in page
    build_report(ex, out, tmp_path / "rand.sensitivity.json", tmp_path / "rand.search.json", None,
                 recalibrate=0, compare_ks=(2,), latency=False, png=False, progress=False)
    assert ex.calls == calls  # everything came from report.json


def test_chart_builders_give_vega_lite_specs(explorer, tmp_path):
    import pandas as pd

    from explorer.analysis import charts as ch
    from explorer.analysis.sensitivity import load_sensitivity, sweep

    sweep(explorer, tmp_path / "s.json", ["conv1"], grid=(8,), progress=False)
    df = load_sensitivity(tmp_path / "s.json")
    for chart in (ch.sensitivity_heatmap(df), ch.sensitivity_lines(df),
                  ch.recovery_chart(pd.DataFrame({"run": ["a", "a"], "epoch": [0, 1], "test_top1": [0.5, 0.8]}), 0.9),
                  ch.baseline_per_class_chart({"cat": 0.5, "dog": 0.6}),
                  ch.comparison_chart(pd.DataFrame({"k": [2, 4], "top1": [0.5, 0.6], "metric": ["cosine"] * 2,
                                                    "granularity": ["filter"] * 2, "recalibrate": [True, False]}))):
        spec = chart.to_dict()
        assert "$schema" in spec and "vega-lite" in spec["$schema"]
    heat = ch.sensitivity_heatmap(df).to_dict()
    values = next(iter(heat["datasets"].values()))
    assert sorted(v["k"] for v in values) == [8, 16]


def test_sensitivity_cli_on_synthetic_data(checkpoint, tmp_path, capsys):
    from explorer.cli.sensitivity import main

    out = tmp_path / "cli.sensitivity.json"
    argv = ["--checkpoint", str(checkpoint), "--synthetic", "40", "--layers", "layer3.2.conv2", "--ks", "32",
            "--out", str(out), "--quiet", "--cache-mb", "16"]
    assert main(argv) == 0
    assert "2 points" in capsys.readouterr().out
    assert main(argv[:4] + ["--layers", "nope", "--out", str(out)]) == 2
    assert "unknown conv layer" in capsys.readouterr().err


def test_analysis_files_are_not_listed_as_checkpoints(checkpoint, tmp_path):
    d = tmp_path / "cks"
    d.mkdir()
    ckpt.save_torch(ckpt.load_torch(checkpoint), d / "m.pt")
    ckpt.save_json({"architecture": "resnet20", "status": "complete", "test_top1": 0.5}, d / "m.json")
    ckpt.save_json({"header": {}, "points": {}}, d / "m.sensitivity.json")
    ckpt.save_json({"header": {}, "evaluations": {}}, d / "m.search.json")
    assert [i.name for i in ckpt.list_checkpoints(d)] == ["m"]


def test_finetune_with_distillation_stays_clustered_and_refuses_a_resume_with_another_weight(checkpoint, model, data, tmp_path):
    from explorer.training.finetune import FinetuneConfig, finetune
    from explorer.training.tied import distinct_filters

    with pytest.raises(ValueError, match="--distill"):
        FinetuneConfig(distill=1.5, name="x").validate()
    cfg = ClusteringConfig(ks={"layer1.0.conv1": 4, "layer3.2.conv1": 16}, fold_bn=True)
    ft = FinetuneConfig(epochs=2, batch_size=32, name="kd_ft", out=str(tmp_path), rebase_images=64,
                        precision="fp32", distill=0.7, device="cpu")
    meta = finetune(checkpoint, cfg, ft, data, quiet=True, stop_after=1)
    assert meta["finetune"]["hyperparameters"]["distill"] == 0.7 and meta["device"] == "cpu"
    with pytest.raises(ValueError, match="distill"):  # a resume must not change the loss
        finetune(checkpoint, cfg, FinetuneConfig(**{**ft.__dict__, "distill": 0.0}), data, resume=True, quiet=True)
    meta = finetune(checkpoint, cfg, ft, data, resume=True, quiet=True)
    tuned = ckpt.load_model(tmp_path / "kd_ft.pt")
    assert meta["status"] == "complete"
    for name, k in cfg.ks.items():
        assert distinct_filters(tuned.get_submodule(name).weight.detach()) == k


def test_baselines_compare_same_macs_and_resume(explorer, tmp_path):
    """Clustering and pruning of the same layers to the same k have the same MACs; every row is
    stored as soon as it is measured, and a rerun measures nothing again."""
    from explorer.analysis.baselines import compare, table

    path = tmp_path / "rand.baselines.json"
    ks = {"layer2.1.conv1": 12, "layer3.2.conv1": 24}
    doc = compare(explorer, path, ks, "t", criteria=("l1", "random"), recoveries=("none", "lsq"), progress=False)
    t = table(doc)
    assert len(t) == 8 and set(t["recovery"]) == {"none", "lsq"}
    assert t["macs"].nunique() == 1 and t["macs"].iloc[0] < explorer.run(ClusteringConfig()).compression.macs
    first = {r["method"] + r["recovery"]: r["top1"] for r in t.to_dict("records")}
    ex = Counting(explorer)
    again = table(compare(ex, path, ks, "t", criteria=("l1", "random"), recoveries=("none", "lsq"), progress=False))
    assert ex.calls == 1  # only the baseline's MACs lookup; no row measured twice
    assert {r["method"] + r["recovery"]: r["top1"] for r in again.to_dict("records")} == first
