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


def _assert_stream_rules(cfg: ClusteringConfig) -> None:
    """The option-A shortcut minimum and the writer rule, checked by hand (not only by validate)."""
    from explorer.clustering import stream_min_k
    from explorer.model import stream_writers

    cfg.validate()
    for s, k in cfg.active_stream.items():
        assert k >= stream_min_k(s, cfg.active_stream), (s, k, cfg.active_stream)
        assert s == 1 or k >= cfg.active_stream.get(s - 1, 16 * 2 ** (s - 2)) + 1
        assert not set(stream_writers(s)) & set(cfg.active), (s, cfg.active)


def _stream_fakes(drops, stream_drop):
    """A fake cost (1,000 MACs per filter of the layers in ``drops``, 3,000 per stream channel) and a
    fake evaluator (held-out drop: the sum of the layers' and streams' drops; the test drop 5 points
    more, never chosen on) that checks the stream rules on every configuration it is asked for."""
    from explorer.model import stream_width

    seen = []

    def cost(cfg):
        return {"macs": sum(cfg.ks.get(n, conv_layer(n).filters) * 1000 for n in drops)
                + sum(cfg.active_stream.get(s, stream_width(s)) * 3000 for s in (1, 2, 3)), "params": 0}

    def evaluate(cfg, source):
        _assert_stream_rules(cfg)
        seen.append(cfg)
        d = sum(drops[n][k] for n, k in cfg.ks.items()) + sum(stream_drop(s, k) for s, k in cfg.active_stream.items())
        return {"config": cfg.to_dict(), "select_drop_pts": d, "drop_pts": d + 5.0, "top1": 0.9 - (d + 5) / 100,
                **cost(cfg)}

    return cost, evaluate, seen


def test_greedy_stream_moves_by_hand():
    """Stream moves on a fake net: free stream steps are taken (their cost probed exactly), a probe
    over the budget backs the stage off, the shortcut minimum holds on every configuration, and a
    stream's writers get no per-layer k once it is clustered (stage 3 before layer3.2.conv2 here)."""
    from explorer.analysis.search import greedy

    a, b, c = "layer3.2.conv2", "conv1", "layer2.0.conv1"
    drops = {a: {64: 0.0, 32: 0.0}, b: {16: 0.0, 8: 0.0}, c: {32: 0.0, 16: 0.1}}

    def stream_drop(s, k):
        return {1: 0.0, 2: 0.3, 3: 0.0 if k >= 48 else 5.0}[s]

    cost, evaluate, seen = _stream_fakes(drops, stream_drop)
    r = greedy(evaluate, cost, drops, ClusteringConfig(fold_bn=True), budget=1.0, stream=(1, 2, 3))
    # by hand (gain / (cost + 0.05)): stream 3 64->48 saves 48,000 for 0 (a's 32,000 loses) and then
    # blocks a; stream 1 12, 8, 4 (each 12,000 for 0; conv1 is blocked after the first); c -> 16
    # (16,000 / 0.15 beats stream 2's 24,000 / 0.35); stream 2 24 (cost 0.3), 16, 8 (each free: the
    # drop stays 0.4); stream 3 -> 32 is probed at 5.4 > 1: rejected, stage 3 backs off.
    moves = [(s.get("layer"), s.get("stream"), s["k"]) for s in r.accepted]
    assert moves == [(None, 3, 48), (None, 1, 12), (None, 1, 8), (None, 1, 4), (c, None, 16), (None, 2, 24),
                     (None, 2, 16), (None, 2, 8)]
    assert [(s["stream"], s["k"], s["probe"]) for s in r.rejected] == [(3, 32, True)]
    assert r.rejected[0]["select_drop_pts"] == pytest.approx(5.4)
    assert r.accepted[5]["estimated_cost_pts"] == pytest.approx(0.3)  # exact: the probe's drop - the current one
    assert r.best["config"] == {**ClusteringConfig(fold_bn=True).to_dict(), "ks": {c: 16},
                                "stream": {"1": 4, "2": 8, "3": 48}}
    assert r.best["select_drop_pts"] == pytest.approx(0.4) and all(s["select_drop_pts"] <= 1.0 for s in r.accepted)
    assert not any(a in cfg.ks for cfg in seen) and not any(b in cfg.ks for cfg in seen)  # writer rule
    assert r.evaluations == len(seen) - 1 == 13  # 9 moves + 4 probes that lost their round
    # stream moves off: the older search, per-layer moves only
    r0 = greedy(evaluate, cost, drops, ClusteringConfig(fold_bn=True), budget=1.0)
    assert all("stream" not in s["config"] for s in r0.accepted + r0.rejected)
    assert r0.best["config"]["ks"] == {a: 32, b: 8, c: 16}
    # max_evals counts the probes too
    assert greedy(evaluate, cost, drops, ClusteringConfig(fold_bn=True), budget=1.0, stream=(1, 2, 3),
                  max_evals=2).evaluations == 2


def test_greedy_offers_no_stream_move_to_a_stage_whose_writer_has_a_k():
    """The other half of the writer rule: conv1 (a stage-1 writer) moves first (its saving is larger
    than the stream's), so stage 1's stream is never clustered; stage 2's is."""
    from explorer.analysis.search import greedy

    drops = {"conv1": {16: 0.0, 8: 0.0, 4: 0.0, 2: 0.0, 1: 0.0}}
    cost0, evaluate, seen = _stream_fakes(drops, lambda s, k: 0.0)

    def cost(cfg):
        return {"macs": cost0(cfg)["macs"] + 100_000 * cfg.ks.get("conv1", 16), "params": 0}

    r = greedy(evaluate, cost, drops, ClusteringConfig(fold_bn=True), budget=0.0, stream=(1, 2))
    assert r.accepted[0]["layer"] == "conv1"
    assert not any(1 in cfg.active_stream for cfg in seen)
    # stage 1's stream stays at 16 channels, so the option-A shortcut keeps stage 2 at 17 or more: 24
    assert r.best["config"]["ks"] == {"conv1": 1} and r.best["config"]["stream"] == {"2": 24}
    assert [(s.get("layer"), s.get("stream"), s["k"]) for s in r.accepted][-1] == (None, 2, 24)


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


def _paired_stage1_model():
    """:func:`randomized_model` whose stage-1 residual stream carries every channel twice: channel
    j + 8 of the stem and of every layer1 block's second conv (filters and BatchNorm) is a copy of
    channel j. Clustering that stream to 8 is therefore lossless, and above 8 it cannot be clustered
    (8 distinct channels)."""
    m = randomized_model(5)
    with torch.no_grad():
        for conv, bn in [("conv1", "bn1")] + [(f"layer1.{b}.conv2", f"layer1.{b}.bn2") for b in range(3)]:
            conv, bn = m.get_submodule(conv), m.get_submodule(bn)
            conv.weight[8:] = conv.weight[:8]
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                t[8:] = t[:8]
    return m


def _stream_search(explorer, path, **kw):
    from explorer.analysis.search import run_search

    return run_search(explorer, path, [0.0, 100.0], ClusteringConfig(fold_bn=True), uniform_ks=(),
                      layers=["layer3.2.conv1", "layer3.2.conv2"], grid=(32,), progress=False, spread_seeds=1,
                      **{"stream": (1, 2, 3), **kw})


def _choices(doc):
    return {k: [(s.get("layer"), s.get("stream"), s["k"], s["select_drop_pts"]) for s in r["accepted"] + r["rejected"]]
            + [json.dumps(r["best"]["config"], sort_keys=True)] for k, r in doc["runs"].items()}


def test_search_with_stream_moves_takes_the_free_one_resumes_and_never_reads_the_test_split(tmp_path):
    """A real (tiny) search with stream moves: the lossless stage-1 stream move (k = 8; 12 is above
    its distinct channels) is taken even at budget 0, every evaluated configuration honours the
    shortcut minimum and the writer rule, a rerun evaluates nothing, a rerun with other stream moves
    is refused, and a test split of noise gives the same choices (held-out training images choose)."""
    from dataclasses import replace

    from explorer.analysis.search import best_record

    model = _paired_stage1_model()
    data = synthetic_cifar10(160, 40, seed=4)  # 40 held-out training images
    ex = Counting(make_explorer(model, data, "paired", 64))
    path = tmp_path / "paired.search.json"
    doc = _stream_search(ex, path)
    assert doc["header"]["stream_moves"] == {"stages": [1, 2, 3], "fractions": [0.75, 0.5, 0.25]}
    runs = {r["budget"]: r for r in doc["runs"].values()}
    first = runs[0.0]["accepted"][0]
    assert (first.get("stream"), first["k"], first["select_drop_pts"]) == (1, 8, 0.0)
    assert runs[0.0]["best"]["config"]["stream"]["1"] <= 8 and runs[0.0]["best"]["select_drop_pts"] <= 0.0
    assert any(s.get("stream") == 2 for s in runs[100.0]["accepted"])  # with room, stage 2 too
    # layer3.2.conv2 took its own k before stage 3's stream was clustered (it was probed, and lost):
    # stage 3 is not offered again
    steps = runs[100.0]["accepted"]
    w = next(i for i, s in enumerate(steps) if s.get("layer") == "layer3.2.conv2")
    assert not any(s.get("stream") == 3 for s in steps)
    assert not any("3" in r["config"].get("stream", {}) and "layer3.2.conv2" in r["config"]["ks"]
                   for r in doc["evaluations"].values())
    assert all("layer3.2.conv2" in s["config"]["ks"] for s in steps[w:])
    for b, r in runs.items():
        assert all(s["select_drop_pts"] <= b for s in r["accepted"])
        assert all(s["select_drop_pts"] > b for s in r["rejected"])
    for rec in doc["evaluations"].values():
        cfg = ClusteringConfig.from_dict(rec["config"])
        _assert_stream_rules(cfg)
        assert cfg.active_stream.get(1, 8) <= 8  # never above stage 1's distinct channels
    assert best_record(doc, 0.0)["config"]["stream"]  # a stream-only configuration is a clustered one
    assert best_record(doc, 0.0, options=ClusteringConfig(fold_bn=True)) is not None
    # the stored record is the verified one
    best = ClusteringConfig.from_dict(runs[100.0]["best"]["config"])
    assert ex.e.run(best).evaluation.top1 == runs[100.0]["best"]["top1"]
    # resume: nothing new; another stream setting is refused, as is a file searched without it
    calls = ex.calls
    _stream_search(ex, path)
    assert ex.calls == calls
    with pytest.raises(ResultsMismatch, match="stream moves"):
        _stream_search(ex, path, stream=())
    with pytest.raises(ResultsMismatch, match="stream moves"):
        _stream_search(ex, path, stream=(1,))
    with pytest.raises(ResultsMismatch, match="stream moves"):
        _stream_search(ex, path, stream_fractions=(0.5,))
    _stream_search(ex, tmp_path / "plain.search.json", stream=())
    with pytest.raises(ResultsMismatch, match="stream moves null, now"):
        _stream_search(ex, tmp_path / "plain.search.json")
    # the test split swapped for noise (and its labels reversed): the same choices, other test numbers
    noise = torch.randint(0, 256, data.test_images.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    noisy = replace(data, test_images=noise, test_labels=torch.flip(data.test_labels, [0]))
    other = _stream_search(make_explorer(model, noisy, "paired", 64), tmp_path / "noisy.search.json")
    assert _choices(other) == _choices(doc)
    assert [r["top1"] for r in other["evaluations"].values()] != [r["top1"] for r in doc["evaluations"].values()]


def test_search_stream_setting_is_checked():
    from explorer.analysis.search import run_search, search_stream_setting
    from explorer.clustering import ClusteringError

    assert search_stream_setting(()) is None
    assert search_stream_setting((3, 1, 1), (0.5, 0.75)) == {"stages": [1, 3], "fractions": [0.75, 0.5]}
    with pytest.raises(ClusteringError, match="valid stages"):
        search_stream_setting((4,))
    with pytest.raises(ClusteringError, match=r"\(0, 1\)"):
        search_stream_setting((1,), (1.0,))
    with pytest.raises(ClusteringError, match="need fold_bn"):
        run_search(None, "x.search.json", [1.0], ClusteringConfig(), stream=(1,))


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
    ft = FinetuneConfig(epochs=3, batch_size=32, lr=0.05, name="rand_ft", out=str(tmp_path), rebase_images=64,
                        precision="fp32")
    meta = finetune(checkpoint, cfg, ft, data, quiet=True, stop_after=1)
    assert meta["status"] == "training" and meta["epochs_done"] == 1
    first = json.loads((tmp_path / "rand_ft.log.jsonl").read_text().splitlines()[0])
    # A resumed run keeps the time it started: from its resume state, else (files from before the
    # state held it) from the metadata the last epoch wrote
    train, meta_file = tmp_path / "rand_ft.train.pt", tmp_path / "rand_ft.json"
    state = ckpt.load_torch(train)
    assert state["started"] == meta["started"]
    ckpt.save_torch({**state, "started": "2000-01-01T00:00:00Z"}, train)
    ckpt.save_json({**ckpt.read_json(meta_file), "started": "1999-01-01T00:00:00Z"}, meta_file)
    meta = finetune(checkpoint, cfg, ft, data, resume=True, quiet=True, stop_after=1)  # epoch 2
    assert meta["started"] == "2000-01-01T00:00:00Z"
    ckpt.save_torch({k: v for k, v in ckpt.load_torch(train).items() if k != "started"}, train)
    ckpt.save_json({**ckpt.read_json(meta_file), "started": "1999-01-01T00:00:00Z"}, meta_file)
    meta = finetune(checkpoint, cfg, ft, data, resume=True, quiet=True)  # epoch 3
    assert meta["status"] == "complete" and len(meta["recovery"]) == 4
    assert meta["started"] == "1999-01-01T00:00:00Z"
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


def test_finetuned_points_take_pruning_baselines_as_their_own_source():
    # The report failed (KeyError 'compression_ratio', then 'clustering') once a pruning baseline's
    # run sat beside the clustering ones.
    from explorer.analysis.report import finetuned_points

    clustered = {"status": "complete", "after": {"top1": 0.87}, "clustering": {"ks": {"conv1": 8}},
                 "compression": {"macs": 20, "params": 100, "mac_reduction": 0.5, "compression_ratio": 2.5}}
    pruned = {"status": "complete", "after": {"top1": 0.875}, "pruning": {"criterion": "fpgm", "ks": {"conv1": 8}},
              "finetune": {"method_name": "pruned"},
              "compression": {"macs": 20, "params": 134_861, "mac_reduction": 0.5, "compression_ratio": 2.0}}
    running = {**clustered, "status": "running"}
    d = finetuned_points([clustered, pruned, running], 0.89)
    assert list(d["source"]) == ["fine-tuned", "fine-tuned, pruned"]
    assert list(d["compression_ratio"]) == [2.5, 2.0]
    assert list(d["drop_pts"]) == [pytest.approx(2.0), pytest.approx(1.5)]


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


def test_search_cli_stream_flag(checkpoint, tmp_path, capsys):
    from explorer.cli.search import main

    out = tmp_path / "cli.search.json"
    argv = ["--checkpoint", str(checkpoint), "--synthetic", "40", "--layers", "layer3.2.conv1", "--grid", "32",
            "--uniform-ks", "--budget", "100", "--fold-bn", "--out", str(out), "--quiet", "--cache-mb", "16"]
    assert main(argv + ["--stream", "1", "--stream-fractions", "0.5"]) == 0
    assert "stream {'1': 8}" in capsys.readouterr().out  # 16 -> 8, then nothing below 8 on this grid
    assert json.loads(out.read_text())["header"]["stream_moves"] == {"stages": [1], "fractions": [0.5]}
    assert main(argv) == 2  # the same file without --stream: refused
    assert "stream moves" in capsys.readouterr().err
    assert main(argv + ["--stream", "4"]) == 2
    assert "valid stages: 1, 2, 3" in capsys.readouterr().err


def test_analysis_files_are_not_listed_as_checkpoints(checkpoint, tmp_path):
    d = tmp_path / "cks"
    d.mkdir()
    ckpt.save_torch(ckpt.load_torch(checkpoint), d / "m.pt")
    ckpt.save_json({"architecture": "resnet20", "status": "complete", "test_top1": 0.5}, d / "m.json")
    ckpt.save_json({"header": {}, "points": {}}, d / "m.sensitivity.json")
    ckpt.save_json({"header": {}, "evaluations": {}}, d / "m.search.json")
    ckpt.save_json({"options": {}, "records": []}, d / "m.widths.json")
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


def test_options_label_names_clustered_residual_streams():
    from explorer.analysis.report import options_label

    cfg = ClusteringConfig(ks={"layer1.0.conv1": 8}, fold_bn=True, stream={1: 14, 2: 28, 3: 56})
    assert options_label(cfg) == "euclidean, BN folded, streams 14/28/56"
    assert options_label(cfg, long=True).endswith("residual streams k 14/28/56")
    assert "stream" not in options_label(ClusteringConfig(ks={"layer1.0.conv1": 8}))


def test_options_label_names_the_stages_of_a_partial_stream_clustering():
    from explorer.analysis.report import options_label

    assert options_label(ClusteringConfig(fold_bn=True, stream={2: 28})).endswith("streams s2 28")


def test_distillation_teacher_is_the_bn_folded_base(model, data):
    from explorer.compress import CompressedResNet20
    from explorer.training.finetune import distillation_teacher

    grads = [p.requires_grad for p in model.parameters()]
    teacher = distillation_teacher(model, torch.device("cpu"), torch.channels_last)
    assert isinstance(teacher, CompressedResNet20) and not teacher.training
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    x = normalize(data.test_images[:16]).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.allclose(teacher(x), model.eval()(x), atol=1e-4)
    assert [p.requires_grad for p in model.parameters()] == grads  # the base net is left as it was
