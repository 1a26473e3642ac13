"""The benchmark runs end to end and its fast path agrees with the naive one (timings not asserted)."""
from __future__ import annotations

import pytest
import torch

from explorer.analysis import benchmark as bench
from explorer.checkpoints import save_torch
from explorer.data import synthetic_cifar10
from explorer.model import resnet20


def test_bench_runs_and_fast_path_agrees_with_naive(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "random.pt"
    save_torch(resnet20().state_dict(), path)
    data = synthetic_cifar10(200, 300, seed=3)
    r = bench.run(str(path), None, changes=4, seed=0, naive_repeats=1, sessions=2, data=data, umap=False)
    for name in ("last_layer", "first_layer"):
        s = r["scenarios"][name]
        assert s["top1_fast"] == s["top1_naive"]  # same configuration, same answer
        assert s["speedup"] == pytest.approx(s["naive_s"] / s["fast_s"])
    seq = r["random_sequence"]
    # a count of re-checked images over the 4 changes, at most all 300 test images each
    assert float(r["rechecked_per_change"] * 4).is_integer() and r["rechecked_per_change"] <= 300
    assert "re-checked in fp32 per change" in bench.format_table(r)
    assert seq["changes"] == 4 and len(seq["fast_s"]) == 4
    assert seq["speedup_median"] == pytest.approx(seq["naive_median_s"] / seq["fast_median_s"])
    assert r["sessions"]["sessions"] == 2 and r["peak_rss_mb"] > 100
    assert r["umap"] is None
    table = bench.format_table(r)
    assert "4 random changes, median" in table and "concurrent sessions" in table


def test_exactness_counts_differences_against_fp32(tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "random.pt"
    save_torch(resnet20().state_dict(), path)
    data = synthetic_cifar10(100, 300, seed=4)
    r = bench.exactness(str(path), None, seeds=(0, 1), changes=3, data=data)
    assert r["configurations"] == 6 and len(r["rows"]) == 6 and r["images"] == 300
    assert r["differ_max"] <= 3  # the bound: near-ties only
    assert r["differ_total"] == sum(row["differ"] for row in r["rows"])
    for row in r["rows"]:  # a prediction can differ only where the bound was below some image's flip error
        assert row["differ"] == 0 or row["tau"] < row["flip_error_full"]
    if r["tau_over_full_min"] >= 1:  # the bound exceeded every image's flip error: nothing can differ
        assert r["differ_total"] == 0
    assert all(row["tau"] >= 0.05 and row["flip_error_full"] > 0 for row in r["rows"])  # 0.05: the bound's floor


def test_random_changes_are_single_layer_steps_and_replayable():
    steps = list(bench.random_changes(0, 6))
    assert [c.to_dict() for _, c in steps] == [c.to_dict() for _, c in bench.random_changes(0, 6)]
    prev = {}
    for layer, cfg in steps:
        ks = cfg.ks
        assert {n for n in ks if ks[n] != prev.get(n)} <= {layer} and 1 <= ks[layer] < dict(
            (c.name, c.filters) for c in bench.CONV_LAYERS)[layer]
        prev = dict(ks)


def test_recovery_cost_compares_variants_on_the_same_changes(tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "random.pt"
    save_torch(resnet20().state_dict(), path)
    from explorer import recovery

    process_cache = recovery._PREFIXES
    r = bench.recovery_cost(str(path), None, changes=3, seed=0, data=synthetic_cifar10(300, 100, seed=2))
    assert recovery._PREFIXES is process_cache  # the per-variant caches were swapped back
    assert r["changes"] == 3 and set(r) >= {"none", "lsq", "data+lsq"}
    # what was timed is the sequence's configurations with each recovery: an Explorer of its own agrees
    from dataclasses import replace

    from explorer.checkpoints import load_model
    from explorer.pipeline import Explorer

    ref = Explorer(load_model(path), synthetic_cifar10(300, 100, seed=2))
    seq = [cfg for _, cfg in bench.random_changes(0, 3)]
    for v, opts in (("none", {}), ("lsq", {"recovery": "lsq"}), ("data+lsq", {"space": "data", "recovery": "lsq"}),
                    ("data+lsq, no prefix cache", {"space": "data", "recovery": "lsq", "seed": 1})):
        assert r[v]["top1"] == [ref.run(replace(c, **opts)).evaluation.top1 for c in seq], v
    text = bench.format_recovery_cost(r)
    assert "extra median s" in text and "re-fitted-prefix cache" in text


def test_bench_refuses_two_benchmarks_at_once(capsys):
    from explorer.cli.bench import main

    with pytest.raises(SystemExit) as e:
        main(["--conv-widths", "--latency", "x.pt"])
    assert e.value.code == 2
    assert "--latency and --conv-widths are different benchmarks; run them one at a time" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--exactness", "--load"])
    assert e.value.code == 2
    assert "--exactness and --load are different benchmarks" in capsys.readouterr().err
