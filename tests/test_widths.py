"""Stage-width shapes at a MACs target (explorer.analysis.widths, ``explorer.search --widths``) on a random
ResNet20 and synthetic data: the analytic MACs are the compressed net's real count, the grid holds
exactly the valid shapes in the band, the ranking is by held-out training images only and resumes."""
from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest
import torch

from explorer import checkpoints as ckpt
from explorer.analysis.results import ResultsMismatch, make_explorer
from explorer.analysis.widths import BASELINE_SHAPE, StageWidths, rank_widths, shape_macs, width_grid
from explorer.clustering import ClusteringConfig, ClusteringError
from explorer.compress import count_macs
from explorer.data import synthetic_cifar10

from _models import positive_bn_model

torch.set_num_threads(1)

FAST = ClusteringConfig(fold_bn=True)  # weight-space k-means, no recovery: the structure is what counts here


@pytest.fixture(scope="module")
def model():
    return positive_bn_model(5)


@pytest.fixture(scope="module")
def data():
    return synthetic_cifar10(160, 40, seed=4)


def test_shape_macs_is_the_compressed_nets_count(model, data):
    ex = make_explorer(model, data, "w", 16)
    assert shape_macs(BASELINE_SHAPE) == 40_551_040
    # the shipped residual-stream configuration (its 20,063,792 MACs are pinned in test_headline)
    assert shape_macs(StageWidths((14, 28, 56), (8, 16, 44))) == 20_063_792
    for shape in (StageWidths((8, 24, 64), (8, 8, 40)), StageWidths((12, 16, 56), (8, 8, 40)),
                  StageWidths((16, 32, 48), (16, 8, 24))):
        assert count_macs(ex.compressed(shape.config(FAST))) == shape_macs(shape), shape


def test_shape_config():
    cfg = StageWidths((8, 24, 64), (8, 8, 40)).config(replace(FAST, space="data", recovery="lsq"))
    assert cfg.stream == {1: 8, 2: 24} and cfg.space == "data" and cfg.recovery == "lsq"
    assert cfg.ks == {f"layer{s}.{b}.conv1": k for s, k in ((1, 8), (2, 8), (3, 40)) for b in range(3)}
    assert StageWidths((16, 32, 64), (16, 32, 64)).config(FAST).clustered is False
    with pytest.raises(ClusteringError, match="needs fold_bn"):
        StageWidths((8, 24, 64), (8, 8, 40)).config(ClusteringConfig())


def test_width_grid_is_every_valid_shape_in_the_band():
    grid = width_grid(0.65, 0.005, 8)
    base = shape_macs(BASELINE_SHAPE)
    assert len(grid) == len(set(grid)) == 17
    # exactly the shapes a brute force over every k accepts (valid configuration, in the band)
    ks = [range(8, w + 1, 8) for w in (16, 32, 64)]
    brute = set()
    for stream in itertools.product(*ks):
        for conv1 in itertools.product(*ks):
            shape = StageWidths(stream, conv1)
            try:
                shape.config(FAST)
            except ClusteringError:
                continue
            if 0.65 <= 1 - shape_macs(shape) / base <= 0.655:
                brute.add(shape)
    assert set(grid) == brute
    assert StageWidths((8, 24, 64), (8, 8, 40)) in grid  # the shipped 65% configuration
    assert StageWidths((16, 32, 64), (8, 8, 16)) in grid  # streams unclustered: only the conv1s
    for s in grid:
        assert 0.65 <= 1 - shape_macs(s) / base <= 0.655
        assert all(k % 8 == 0 for k in s.stream + s.conv1)
        s.config(FAST)  # valid: the option-A rule holds
    saved = [1 - shape_macs(s) / base for s in grid]
    assert saved == sorted(saved)
    # stage 2's stream must hold stage 1's 16 unclustered channels plus the padded group: 16 is too few
    assert not any(s.stream[0] == 16 and s.stream[1] == 16 for s in width_grid(0.6, 0.1, 8))
    assert len(width_grid(0.65, 0.005, 4)) > len(grid)
    # a step that does not divide a width still offers that width (the stream left unclustered)
    assert any(s.stream[0] == 16 for s in width_grid(0.5, 0.01, 12))
    for bad, match in (((1.2, 0.005, 8), "fraction"), ((0.65, -1, 8), "band"), ((0.65, 0.005, 0), "step")):
        with pytest.raises(ClusteringError, match=match):
            width_grid(*bad)


class Counting:
    def __init__(self, explorer):
        self.e, self.calls, self.model, self.data = explorer, 0, explorer.model, explorer.data

    def select_top1(self, config):
        self.calls += 1
        return self.e.select_top1(config)

    def compressed(self, config):
        return self.e.compressed(config)


def test_rank_widths_ranks_on_held_out_images_resumes_and_rebuilds(model, data, tmp_path):
    shapes = [StageWidths((8, 24, 64), (8, 8, 40)), StageWidths((16, 32, 64), (8, 8, 16)),
              StageWidths((8, 16, 48), (8, 16, 48))]
    ex = Counting(make_explorer(model, data, "w", 16))
    path = tmp_path / "w.widths.json"
    doc = rank_widths(ex, shapes, FAST, path, progress=False)
    recs = doc["records"]
    assert ex.calls == 3 and len(recs) == 3 and json.loads(path.read_text()) == doc
    assert [r["select_top1"] for r in recs] == sorted((r["select_top1"] for r in recs), reverse=True)
    for r in recs:
        cfg = ClusteringConfig.from_dict(r["config"])
        assert r["select_top1"] == ex.e.select_top1(cfg)[0]
        assert r["macs"] == shape_macs(StageWidths(tuple(r["stream"]), tuple(r["conv1"])))
    # the test split does not choose: an explorer whose test evaluator raises ranks the same
    class Trap:
        mixed = False

        def evaluate(self, *a, **k):
            raise AssertionError("the ranking read the test split")

    trapped = make_explorer(model, data, "w2", 16)
    trapped.engine = Trap()
    other = rank_widths(trapped, shapes, FAST, None, progress=False)
    assert [r["label"] for r in other["records"]] == [r["label"] for r in recs]
    # resume: nothing re-evaluated; other options refused; a damaged file is ranked again
    calls = ex.calls
    assert rank_widths(ex, shapes, FAST, path, progress=False) == doc and ex.calls == calls
    with pytest.raises(ResultsMismatch, match="other clustering options"):
        rank_widths(ex, shapes, replace(FAST, seed=1), path, progress=False)
    path.write_text(path.read_text()[:40])
    assert rank_widths(ex, shapes, FAST, path, progress=False)["records"] == recs and ex.calls == calls + 3
    damaged = json.loads(path.read_text())
    del damaged["records"][0]["select_top1"]
    path.write_text(json.dumps(damaged))
    assert rank_widths(ex, shapes, FAST, path, progress=False)["records"] == recs and ex.calls == calls + 6
    # the file pins the weights and the dataset
    with pytest.raises(ResultsMismatch, match="another checkpoint"):
        rank_widths(Counting(make_explorer(positive_bn_model(6), data, "w3", 16)), shapes, FAST, path, progress=False)
    pinned = json.loads(path.read_text())
    path.write_text(json.dumps({**pinned, "dataset": {**pinned["dataset"], "fingerprint": "0"}}))
    with pytest.raises(ResultsMismatch, match="another dataset"):
        rank_widths(ex, shapes, FAST, path, progress=False)
    path.write_text(json.dumps({"header": {}, "evaluations": {}}))  # a search result given as --out
    with pytest.raises(ClusteringError, match="not a --widths ranking"):
        rank_widths(ex, shapes, FAST, path, progress=False)


def test_search_cli_widths(model, tmp_path, capsys):
    from explorer.cli.search import main

    ck = tmp_path / "rand.pt"
    ckpt.save_torch({k: v.clone() for k, v in model.state_dict().items()}, ck)
    out, cfg = tmp_path / "r.widths.json", tmp_path / "best.json"
    argv = ["--checkpoint", str(ck), "--synthetic", "160", "--widths", "--target-reduction", "0.65", "--band", "0.002",
            "--fold-bn", "--out", str(out), "--quiet", "--cache-mb", "16"]
    assert main(argv + ["--write-config", str(cfg)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert len(doc["records"]) == len(width_grid(0.65, 0.002, 8)) and doc["records"][0]["label"] in printed
    assert ClusteringConfig.from_json(cfg.read_text()).to_dict() == doc["records"][0]["config"]
    # another target in the same file: its shapes are added, and only they are printed and chosen from
    assert main([a if a != "0.65" else "0.5" for a in argv] + ["--write-config", str(cfg)]) == 0
    half = capsys.readouterr().out
    assert doc["records"][0]["label"] not in half
    assert len(json.loads(out.read_text())["records"]) == len(doc["records"]) + len(width_grid(0.5, 0.002, 8))
    half_grid = {(s.stream, s.conv1) for s in width_grid(0.5, 0.002, 8)}
    halves = [r for r in json.loads(out.read_text())["records"] if (tuple(r["stream"]), tuple(r["conv1"])) in half_grid]
    best = max(halves, key=lambda r: r["select_top1"])
    assert ClusteringConfig.from_json(cfg.read_text()).to_dict() == best["config"]  # the best 50% one, not 65%
    # flags of the greedy search do not apply to --widths, nor --band / --step without it
    for extra, msg in ((["--objective", "params"], "--objective does not apply to --widths"),
                       (["--stream-k", "1=8", "--layers", "conv1"], "--layers, --stream-k do not apply to --widths"),
                       (["--seeds", "3"], "--seeds picks a k-means seed")):
        with pytest.raises(SystemExit):
            main(argv + extra)
        assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([a for a in argv if a != "--widths"])
    assert "--band does not apply without --widths" in capsys.readouterr().err
    assert main(argv[:5] + ["--fold-bn", "--out", str(out)]) == 2
    assert "--widths needs --target-reduction" in capsys.readouterr().err
    assert main([a for a in argv if a != "--fold-bn"]) == 2  # no --fold-bn: a stream cannot be clustered
    assert "needs fold_bn" in capsys.readouterr().err
    assert main(argv + ["--step", "16", "--band", "0"]) == 2
    assert "widen --band" in capsys.readouterr().err
