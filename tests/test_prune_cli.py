"""Evaluation reports (explorer.evaluate), the Explorer pipeline and the ``python -m explorer.prune``
CLI, on a random checkpoint written to tmp and synthetic data (the CLI on the shipped checkpoint and
the real test split: tests/test_headline.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from explorer import checkpoints as ckpt
from explorer import pipeline
from explorer.cli import prune
from explorer.clustering import ClusteringConfig, recalibrate_bn
from explorer.compress import load_compressed
from explorer.data import CLASSES, synthetic_cifar10
from explorer.evaluate import Comparison, Evaluation, evaluate, evaluation_from_predictions, predict_logits
from explorer.model import CONV_LAYER_NAMES, resnet20

torch.set_num_threads(1)

BASELINE_MACS = 40_551_040


# ---------------------------------------------------------------- evaluation

def test_evaluation_from_predictions_by_hand():
    labels = [0, 0, 1, 1, 2, 2, 2, 3]
    preds = [0, 1, 1, 1, 2, 0, 2, 9]
    ev = evaluation_from_predictions(preds, labels)
    cm = np.zeros((10, 10), dtype=np.int64)
    cm[0, 0] = cm[0, 1] = 1
    cm[1, 1] = 2
    cm[2, 2], cm[2, 0] = 2, 1
    cm[3, 9] = 1
    np.testing.assert_array_equal(ev.confusion, cm)
    np.testing.assert_allclose(ev.per_class, [0.5, 1.0, 2 / 3, 0, 0, 0, 0, 0, 0, 0])
    assert ev.top1 == 5 / 8
    np.testing.assert_array_equal(ev.predictions, preds)
    d = ev.to_dict()
    assert d["top1"] == 5 / 8 and d["per_class"]["bird"] == pytest.approx(2 / 3) and d["confusion"] == cm.tolist()


def test_evaluation_of_nothing():
    ev = evaluation_from_predictions([], [])
    assert ev.top1 == 0.0 and ev.confusion.sum() == 0 and (ev.per_class == 0).all()


def _ev(per_class, top1):
    per_class = np.asarray(per_class, dtype=float)
    return Evaluation(top1, per_class, np.zeros((10, 10), dtype=np.int64), np.zeros(0, dtype=np.int64))


def test_comparison_lines_and_deltas():
    base = _ev([0.9, 0.95, 0.74, 0.6, 0.8, 0.7, 0.9, 0.88, 0.93, 0.91], 0.8812)
    pruned = _ev([0.9, 0.96, 0.71, 0.55, 0.8, 0.72, 0.9, 0.88, 0.93, 0.91], 0.8745)
    cmp = Comparison(base, pruned)
    lines = [line.strip() for line in cmp.lines()]
    assert len(lines) == 11
    assert lines[2] == "bird: 74.0% -> 71.0% (-3.0)"
    assert lines[1] == "automobile: 95.0% -> 96.0% (+1.0)"
    assert lines[0] == "airplane: 90.0% -> 90.0% (+0.0)"
    assert lines[10] == "top-1: 88.12% -> 87.45% (-0.67)"
    assert cmp.top1_delta == pytest.approx(-0.0067)
    np.testing.assert_allclose(cmp.per_class_delta[:4], [0, 0.01, -0.03, -0.05], atol=1e-12)
    rows = cmp.rows()
    assert [r["class"] for r in rows] == list(CLASSES)
    assert rows[3] == {"class": "cat", "baseline": 0.6, "pruned": 0.55, "delta": pytest.approx(-0.05)}


def test_confusion_delta():
    b = evaluation_from_predictions([0, 1, 1], [0, 1, 0])
    p = evaluation_from_predictions([1, 1, 1], [0, 1, 0])
    delta = Comparison(b, p).confusion_delta
    assert delta[0, 0] == -1 and delta[0, 1] == 1 and delta.sum() == 0 and np.abs(delta).sum() == 2


def test_evaluate_matches_a_manual_forward():
    torch.manual_seed(0)
    m = resnet20().eval()
    data = synthetic_cifar10(8, 40, seed=1)
    recalibrate_bn(m, data.train_images)
    ev = evaluate(m, data.test_images, data.test_labels, batch_size=16)
    from explorer.data import normalize

    with torch.no_grad():
        preds = m(normalize(data.test_images)).argmax(1)
    np.testing.assert_array_equal(ev.predictions, preds.numpy())
    assert ev.top1 == pytest.approx((preds == data.test_labels).float().mean().item())
    assert ev.confusion.sum() == 40
    with pytest.raises(ValueError, match="precision"):
        predict_logits(m, data.test_images, precision="fp16")


# ---------------------------------------------------------------- fixtures for the CLI

@pytest.fixture(scope="module")
def synthetic():
    return synthetic_cifar10(128, 60, seed=3)


@pytest.fixture(scope="module")
def base_model(synthetic):
    torch.manual_seed(1)
    m = resnet20()
    recalibrate_bn(m, synthetic.train_images)
    return m.eval()


@pytest.fixture
def checkpoint(tmp_path, base_model):
    path = tmp_path / "tiny.pt"
    ckpt.save_torch(base_model.state_dict(), path)
    return path


@pytest.fixture
def fake_data(monkeypatch, synthetic):
    """The CLI's dataset is the synthetic one; records the roots it was asked for."""
    calls = []

    def load(root=None, download=True):
        calls.append(root)
        return synthetic

    monkeypatch.setattr(pipeline, "load_cifar10", load)
    return calls


@pytest.fixture
def no_data(monkeypatch):
    """Fail loudly if a test that should stop early reaches the dataset (no download attempts)."""
    def load(root=None, download=True):
        raise AssertionError("the dataset must not be loaded")

    monkeypatch.setattr(pipeline, "load_cifar10", load)


# ---------------------------------------------------------------- Explorer

def assert_same_up_to_near_ties(ev: Evaluation, model, data, margin: float = 1e-3):
    """The pipeline's evaluation engine may differ from a plain eager fp32 pass only on near-ties."""
    logits = predict_logits(model, data.test_images)
    eager = logits.argmax(1).numpy()
    differ = np.nonzero(ev.predictions != eager)[0]
    top2 = logits.topk(2, dim=1).values
    for i in differ:
        assert float(top2[i, 0] - top2[i, 1]) < margin, f"image {i} differs without a near-tie"
    assert abs(ev.top1 - float((eager == data.test_labels.numpy()).mean())) <= len(differ) / len(eager) + 1e-12


def test_explorer_run_is_cached_and_leaves_the_base_model_alone(base_model, synthetic):
    ex = pipeline.Explorer(base_model, synthetic, "tiny")
    before = {k: v.clone() for k, v in base_model.state_dict().items()}
    cfg = ClusteringConfig.uniform(3, fold_bn=True, recalibrate_bn=64)
    r1 = ex.run(cfg)
    assert ex.run(ClusteringConfig.from_json(cfg.to_json())) is r1
    for k, v in base_model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert_same_up_to_near_ties(ex.baseline, base_model, synthetic)
    assert_same_up_to_near_ties(r1.evaluation, r1.model, synthetic)
    s = r1.summary()
    assert s["config"] == cfg.to_dict()
    assert s["top1"] == r1.evaluation.top1 and s["top1_delta"] == pytest.approx(s["top1"] - s["baseline_top1"])
    assert len(s["per_class"]) == 10
    assert s["macs"] < s["baseline_macs"] == BASELINE_MACS
    json.dumps(s)  # JSON-ready


def test_explorer_preview_and_run_of_one_slider_move_prune_once(base_model, synthetic, monkeypatch):
    ex = pipeline.Explorer(base_model, synthetic, "tiny")
    calls = []
    real = pipeline.prune
    monkeypatch.setattr(pipeline, "prune", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = ClusteringConfig(recalibrate_bn=64).with_k("layer2.0.conv1", 5)
    prev = ex.preview(cfg)
    r = ex.run(cfg)
    assert len(calls) == 1  # BN re-estimation (a pass over 64 training images) ran once, not twice
    assert len(prev.predictions) == len(ex.engine.preview_index) and len(r.evaluation.predictions) == len(synthetic.test_labels)


def test_explorer_warm_leaves_the_first_data_aware_move_no_reference_to_compute(base_model, synthetic, monkeypatch):
    from explorer import recovery

    ex = pipeline.Explorer(base_model, synthetic, "tiny")
    computed = []
    real = recovery._sample_positions
    monkeypatch.setattr(recovery, "_sample_positions", lambda *a: computed.append(1) or real(*a))
    recovery._REFERENCES.data.clear()
    ex.warm(ClusteringConfig(space="weight", recovery="none"))
    assert computed == []  # nothing reads the reference there
    ex.warm()
    assert len(computed) == 19  # one tap per conv layer: the reference of the app's defaults
    ex._prune(pipeline.app_default_config().with_k("conv1", 3))
    assert len(computed) == 19  # the move reused it


# ---------------------------------------------------------------- CLI happy paths (synthetic data)

def test_cli_json_with_save(checkpoint, fake_data, tmp_path, capsys, base_model, synthetic):
    out_dir = tmp_path / "out"
    rc = prune.main(["--k", "3", "--json", "--checkpoint", str(checkpoint), "--data", "/some/where",
                     "--save", str(out_dir), "--threads", "1"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert fake_data == ["/some/where"]
    s = json.loads(cap.out)
    assert s["config"]["ks"] == ClusteringConfig.uniform(3).active
    assert len(s["per_class"]) == 10 and [r["class"] for r in s["per_class"]] == list(CLASSES)
    assert 0 <= s["top1"] <= 1
    eager = evaluate(base_model, synthetic.test_images, synthetic.test_labels).top1
    assert abs(s["baseline_top1"] - eager) <= 1 / len(synthetic.test_labels) + 1e-12  # engine vs eager: near-ties
    assert s["macs"] < s["baseline_macs"] == BASELINE_MACS
    assert s["params"] < s["baseline_params"] and s["compression_ratio"] == pytest.approx(
        s["baseline_params"] / s["params"])
    assert s["dataset"]["name"] == "synthetic" and s["checkpoint"] == str(checkpoint)
    saved = [Path(p) for p in s["saved"]]
    assert [p.name for p in saved] == ["tiny_clustered.pt", "tiny_clustered.json", "tiny_clustered.onnx"]
    assert all(p.is_file() for p in saved)
    meta = ckpt.read_json(saved[1])
    assert meta["clustering"] == s["config"] and meta["top1"] == s["top1"] and meta["source"] == "tiny"
    # the saved net reproduces the reported accuracy
    loaded = load_compressed(saved[0])
    top1 = evaluate(loaded, synthetic.test_images, synthetic.test_labels).top1
    assert abs(top1 - s["top1"]) <= 1 / len(synthetic.test_labels) + 1e-12


def test_cli_table(checkpoint, fake_data, capsys):
    rc = prune.main(["--layer", "layer3.2.conv2=16", "--layer", "layer3.1.conv1=32", "--fold-bn",
                     "--checkpoint", str(checkpoint)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    out = cap.out
    assert "2 layers clustered (euclidean, filter, BN folded)" in out
    for c in CLASSES:
        assert f"\n{c:>10}  " in out
    assert "top-1" in out and "compression ratio" in out and "MACs per image" in out
    assert f"baseline {BASELINE_MACS:,}" in out


def test_cli_layer_overrides_k_and_config_file(checkpoint, fake_data, tmp_path, capsys):
    rc = prune.main(["--k", "8", "--layer", "conv1=2", "--metric", "cosine", "--json", "--checkpoint", str(checkpoint)])
    s = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert s["config"]["ks"]["conv1"] == 2 and s["config"]["ks"]["layer3.0.conv1"] == 8
    assert s["config"]["metric"] == "cosine"

    cfg = ClusteringConfig(ks={"layer2.1.conv1": 5}, granularity="kernel", seed=4)
    path = tmp_path / "cfg.json"
    path.write_text(cfg.to_json())
    rc = prune.main(["--config", str(path), "--json", "--checkpoint", str(checkpoint)])
    s = json.loads(capsys.readouterr().out)
    assert rc == 0 and s["config"] == cfg.to_dict()


# ---------------------------------------------------------------- CLI errors

def _run_error(argv, capsys):
    rc = prune.main(argv)
    cap = capsys.readouterr()
    assert rc == 2
    assert cap.out == ""
    assert cap.err.startswith("error: ")
    assert "Traceback" not in cap.err
    return cap.err


def test_cli_unknown_layer(checkpoint, no_data, capsys):
    err = _run_error(["--layer", "bogus=3", "--checkpoint", str(checkpoint)], capsys)
    assert "unknown conv layer 'bogus'" in err
    for name in CONV_LAYER_NAMES:
        assert name in err


@pytest.mark.parametrize("argv,message", [
    (["--layer", "layer1.0.conv1=0"], "k = 0 < 1"),
    (["--layer", "layer1.0.conv1=17"], "exceeds its 16 filters"),
    (["--layer", "layer1.0.conv1"], "expects NAME=K"),
    (["--layer", "layer1.0.conv1=x"], "K must be an integer"),
    (["--k", "0"], "--k must be >= 1"),
    (["--k", "3", "--recalibrate-bn", "-5"], "recalibrate_bn must be in"),
    (["--k", "3", "--n-init", "0"], "n_init must be in"),
    (["--k", "3", "--seed", "-1"], "seed must be in"),
])
def test_cli_bad_configuration(checkpoint, no_data, capsys, argv, message):
    err = _run_error(argv + ["--checkpoint", str(checkpoint)], capsys)
    assert message in err


def test_cli_bad_config_files(checkpoint, no_data, capsys, tmp_path):
    missing = tmp_path / "nope.json"
    assert "cannot read --config" in _run_error(["--config", str(missing), "--checkpoint", str(checkpoint)], capsys)
    bad = tmp_path / "bad.json"
    bad.write_text('{"ks": {"conv1": 99}}')
    assert "exceeds its 16 filters" in _run_error(["--config", str(bad), "--checkpoint", str(checkpoint)], capsys)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage")
    assert "cannot read --config" in _run_error(["--config", str(binary), "--checkpoint", str(checkpoint)], capsys)


def test_cli_missing_checkpoint(tmp_path, no_data, capsys):
    err = _run_error(["--k", "3", "--checkpoint", str(tmp_path / "missing.pt")], capsys)
    assert "no such checkpoint file" in err


def test_cli_not_a_resnet20(tmp_path, no_data, capsys):
    p = tmp_path / "other.pt"
    ckpt.save_torch({"weight": torch.zeros(3)}, p)
    assert "not a ResNet20 state dict" in _run_error(["--k", "3", "--checkpoint", str(p)], capsys)
    p.write_bytes(b"not a zip file at all")
    assert "not a valid checkpoint" in _run_error(["--k", "3", "--checkpoint", str(p)], capsys)


class _Payload:
    """Unpickling this creates (opens for writing) the file at ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_cli_refuses_a_malicious_pickle(tmp_path, no_data, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"conv1.weight": _Payload(marker)}, evil)
    err = _run_error(["--k", "3", "--checkpoint", str(evil)], capsys)
    assert "not a valid checkpoint" in err
    assert not marker.exists()
    # the payload is real: an unsafe load would have run it
    probe = tmp_path / "probe"
    probe_pt = tmp_path / "probe.pt"
    torch.save({"x": _Payload(probe)}, probe_pt)
    obj = torch.load(probe_pt, weights_only=False)
    obj["x"].close()
    assert probe.exists()


def test_cli_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        prune.main(["--k", "three"])
    assert e.value.code == 2
    assert "invalid int value" in capsys.readouterr().err
