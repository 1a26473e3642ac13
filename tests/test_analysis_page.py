"""The app's Analysis page (``?page=analysis``, :mod:`explorer.ui.analysis_page`) under AppTest, on
small synthetic result files in a temporary checkpoint directory (``EXPLORER_CHECKPOINTS``): it
renders the charts, tables and per-budget buttons; missing files give an st.info with the command
that writes them; an unreadable file gives a warning, never an exception; and "Apply best
configuration for budget X" opens the explorer on that configuration (sliders, options and URL).

The page reads JSON files only. The apply test then runs the explorer page itself, on a random
ResNet20 and tiny synthetic data (the app's dataset loader is patched), so nothing here needs the
real CIFAR-10 copy or a trained checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from explorer import checkpoints as ckpt
from explorer.clustering import ClusteringConfig
from explorer.data import CLASSES
from explorer.model import CONV_LAYER_NAMES, CONV_LAYERS, conv_layer
from explorer.analysis.search import run_key
from explorer.analysis.sensitivity import k_grid, options_key, point_key
from explorer.app import analysis_page, state

REPO = Path(__file__).resolve().parent.parent
APP = REPO / "streamlit_app.py"
NAME = "random"
BASE_TOP1 = 0.9
BASE_MACS, BASE_PARAMS = 40_551_040, 269_722
SENS_LAYERS = ("conv1", "layer1.0.conv1", "layer3.2.conv2")
BEST = {  # budget -> ks of its best configuration
    0.5: {"layer3.2.conv2": 16},
    1.0: {"layer3.2.conv2": 8, "layer3.1.conv1": 16},
}


# ---------------------------------------------------------------- synthetic result files

def _per_class(top1: float) -> dict:
    return {c: top1 for c in CLASSES}


def _record(ks: dict, top1: float, source: str, options: ClusteringConfig = ClusteringConfig()) -> dict:
    cfg = ClusteringConfig(ks=ks, **{k: v for k, v in options.to_dict().items() if k != "ks"})
    saved = sum(conv_layer(n).filters - k for n, k in ks.items()) / 1000
    macs, params = int(BASE_MACS * (1 - saved)), int(BASE_PARAMS * (1 - saved))
    return {"config": cfg.to_dict(), "source": source, "top1": top1, "top1_delta": top1 - BASE_TOP1,
            "drop_pts": 100 * (BASE_TOP1 - top1), "per_class": _per_class(top1), "macs": macs, "params": params,
            "baseline_macs": BASE_MACS, "baseline_params": BASE_PARAMS, "mac_reduction": 1 - macs / BASE_MACS,
            "compression_ratio": BASE_PARAMS / params}


def write_sensitivity(d: Path, metrics=("euclidean", "cosine")) -> None:
    points = {}
    for metric in metrics:
        opts = ClusteringConfig(metric=metric)
        for layer in SENS_LAYERS:
            info = conv_layer(layer)
            for k in k_grid(info.filters):
                top1 = BASE_TOP1 - (0.0 if k == info.filters else 0.3 / k)
                points[point_key(layer, k, opts)] = {
                    "layer": layer, "layer_index": CONV_LAYER_NAMES.index(layer), "stage": info.stage, "filters": info.filters, "k": k,
                    **{n: v for n, v in opts.to_dict().items() if n != "ks"},
                    "top1": top1, "top1_delta": top1 - BASE_TOP1, "per_class": _per_class(top1),
                    "per_class_delta": _per_class(top1 - BASE_TOP1), "macs": BASE_MACS, "params": BASE_PARAMS,
                    "baseline_macs": BASE_MACS, "baseline_params": BASE_PARAMS, "seconds": 1.0}
    ckpt.save_json({"header": {"checkpoint": NAME, "test_images": 10000, "baseline_top1": BASE_TOP1},
                    "points": points}, d / f"{NAME}.sensitivity.json")


def write_search(d: Path) -> None:
    opts = ClusteringConfig()
    evals, runs = {}, {}
    for i, (budget, ks) in enumerate(BEST.items()):
        rec = _record(ks, BASE_TOP1 - budget / 100 * 0.8, "greedy")
        evals[ClusteringConfig.from_dict(rec["config"]).key()] = rec
        runs[run_key(budget, "macs", opts)] = {"budget": budget, "objective": "macs", "best": rec, "accepted": [],
                                                "rejected": [], "evaluations": 3 + i, "stopped_by_max_evals": False,
                                                "feasible": True, "options": options_key(opts), "tau": 0.05}
    uniform = []
    for k in (2, 8):
        cfg = ClusteringConfig.uniform(k)
        evals[cfg.key()] = _record(cfg.active, 0.2 + k / 20, "uniform")
        uniform.append(cfg.key())
    ckpt.save_json({"header": {"checkpoint": NAME, "test_images": 10000, "baseline_top1": BASE_TOP1},
                    "evaluations": evals, "runs": runs, "uniform": uniform}, d / f"{NAME}.search.json")


def write_finetuned(d: Path, name: str, complete: bool) -> None:
    from explorer.model import resnet20

    ks = {"layer1.0.conv1": 8, "layer3.0.conv1": 16}
    meta = {"architecture": "resnet20", "status": "complete" if complete else "training", "epochs": 4,
            "epochs_done": 4 if complete else 2, "dataset": {"name": "synthetic"},
            "finetune": {"base_checkpoint": NAME, "hyperparameters": {"lr": 0.02, "epochs": 4, "distill": 0.7}},
            "clustering": ClusteringConfig(ks=ks).to_dict(),
            "baseline": {"top1": BASE_TOP1, "per_class": _per_class(BASE_TOP1)},
            "before": {"top1": 0.3, "per_class": _per_class(0.3)},
            "recovery": [{"epoch": 0, "test_top1": 0.3}, {"epoch": 2, "test_top1": 0.8}]}
    if complete:
        meta["recovery"].append({"epoch": 4, "test_top1": 0.88})
        meta.update(test_top1=0.88, after={"top1": 0.88, "per_class": _per_class(0.88)},
                    compression={"macs": BASE_MACS // 2, "params": BASE_PARAMS // 2, "baseline_macs": BASE_MACS,
                                 "baseline_params": BASE_PARAMS, "mac_reduction": 0.5, "compression_ratio": 2.0})
    ckpt.save_torch(resnet20().state_dict(), d / f"{name}.pt")
    ckpt.save_json(meta, d / f"{name}.json")


def checkpoint_dir(d: Path, results: bool = True) -> Path:
    """A random ResNet20 named ``random`` and (``results``) synthetic analysis files for it."""
    from explorer.model import resnet20

    d.mkdir(parents=True, exist_ok=True)
    ckpt.save_torch(resnet20().state_dict(), d / f"{NAME}.pt")
    ckpt.save_json({"architecture": "resnet20", "status": "complete", "test_top1": 0.1,
                    "dataset": {"name": "CIFAR-10"}}, d / f"{NAME}.json")
    if results:
        write_sensitivity(d)
        write_search(d)
        write_finetuned(d, f"{NAME}_ft", complete=True)
        write_finetuned(d, f"{NAME}_kd_ft", complete=False)
    return d


# ---------------------------------------------------------------- app helpers

@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.setenv("EXPLORER_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.delenv("EXPLORER_ALLOW_TRAINING", raising=False)
    (tmp_path / "no-data").mkdir()
    monkeypatch.setenv("EXPLORER_DATA", str(tmp_path / "no-data"))

    def use(d: Path) -> Path:
        monkeypatch.setenv("EXPLORER_CHECKPOINTS", str(d))
        return d
    return use


def make_app(params: dict):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=300)
    for k, v in params.items():
        at.query_params[k] = v
    return at


def no_exception(at) -> None:
    assert not at.exception, "\n".join(f"{e.message}\n{e.stack_trace}" for e in at.exception)


def apply_buttons(at) -> list:
    return [b for b in at.button if b.label.startswith("Apply best configuration")]


# ---------------------------------------------------------------- tests

def test_split_query_names_the_page_and_warns_on_unknown():
    assert state.split_page({"ckpt": ["a"]}) == ("explorer", {"ckpt": ["a"]}, [])
    page, rest, warns = state.split_page({"page": ["analysis"], "k.conv1": ["3"]})
    assert (page, rest, warns) == ("analysis", {"k.conv1": ["3"]}, [])
    page, rest, warns = state.split_page({"page": ["nope"]})
    assert page == "explorer" and rest == {} and "nope" in warns[0]


def test_commands_name_the_checkpoint_only_when_not_the_default(tmp_path):
    from explorer.analysis.results import default_checkpoint

    assert analysis_page.command("search", "--budget 0.5 1 2", Path(default_checkpoint())) == \
        "python -m explorer.search --budget 0.5 1 2"
    cmd = analysis_page.command("finetune", "--config cfg.json", tmp_path / "x.pt", tmp_path)
    assert cmd == f"python -m explorer.finetune --config cfg.json --checkpoint {tmp_path / 'x.pt'} --out {tmp_path}"


def test_analysis_page_renders_the_results(env, tmp_path):
    env(checkpoint_dir(tmp_path / "ckpts"))
    at = make_app({"page": "analysis"}).run()
    no_exception(at)
    assert not at.info and not at.warning and not at.error
    assert at.segmented_control(key=state.NAV_KEY).value == "Analysis"
    assert at.query_params["page"] == "analysis" and at.query_params["ckpt"] == NAME
    # heatmap, lines, euclidean vs cosine, Pareto, recovery, per-class
    assert len(at.get("vega_lite_chart")) == 6
    assert [b.label for b in apply_buttons(at)] == ["Apply best configuration for budget 0.5 pts",
                                                    "Apply best configuration for budget 1 pts"]
    metric = at.segmented_control(key="analysis.metric")
    assert metric.value == "euclidean" and list(metric.options) == ["euclidean", "cosine"]
    n = sum(len(k_grid(conv_layer(l).filters)) for l in SENS_LAYERS)
    assert any(f"{n} of 113 points" in c.value for c in at.caption)  # a partial sweep says so
    frames = [df.value for df in at.dataframe]
    runs = next(f for f in frames if "run" in f.columns)
    assert list(runs["run"]) == [f"{NAME}_ft", f"{NAME}_kd_ft"]
    assert list(runs["status"]) == ["complete", "training"]
    assert runs["MACs saved %"].iloc[0] == pytest.approx(50.0)
    per_class = next(f for f in frames if "airplane" in f.columns).set_index("")
    assert list(per_class.columns) == list(CLASSES)
    assert list(per_class.index) == ["baseline %", "clustered %", "fine-tuned %", "fine-tuned - baseline pp"]
    assert per_class.loc["fine-tuned %"].tolist() == pytest.approx([88.0] * 10)
    assert per_class.loc["fine-tuned - baseline pp"].tolist() == pytest.approx([-2.0] * 10)

    metric.set_value("cosine").run()
    no_exception(at)
    assert at.segmented_control(key="analysis.metric").value == "cosine"
    at.selectbox(key="analysis.ft_run").set_value(f"{NAME}_kd_ft").run()  # still training: no "after"
    no_exception(at)
    per_class = next(df.value for df in at.dataframe if "airplane" in df.value.columns)
    assert list(per_class[""]) == ["baseline %", "clustered %"]
    assert any("still training" in c.value for c in at.caption)


def test_a_pruning_baselines_run_is_listed_beside_the_clustering_ones(env, tmp_path):
    # The shipped FPGM run (metadata "pruning", no "clustering") made the whole fine-tuning table
    # a warning, "A fine-tuning result could not be read: 'clustering'".
    d = checkpoint_dir(tmp_path / "ckpts")
    write_finetuned(d, f"{NAME}_fpgm_ft", complete=True)
    meta = ckpt.read_json(d / f"{NAME}_fpgm_ft.json")
    del meta["clustering"], meta["compression"]["compression_ratio"], meta["compression"]["baseline_params"]
    meta["pruning"] = {"criterion": "fpgm", "ks": {"layer1.0.conv1": 8, "layer3.0.conv1": 16}}
    meta["finetune"].update(method_name="pruned", pruning="fpgm")
    ckpt.save_json(meta, d / f"{NAME}_fpgm_ft.json")
    env(d)
    at = make_app({"page": "analysis"}).run()
    no_exception(at)
    assert not at.warning and not at.error
    runs = next(df.value for df in at.dataframe if "run" in df.value.columns).set_index("run")
    assert list(runs.index) == [f"{NAME}_fpgm_ft", f"{NAME}_ft", f"{NAME}_kd_ft"]
    row = runs.loc[f"{NAME}_fpgm_ft"]
    assert row["options"] == "pruning (fpgm)" and row["layers reduced"] == 2
    assert row["compression"] == f"{BASE_PARAMS / (BASE_PARAMS // 2):.2f}×"
    # its per-class block names its before-net for what it is: pruned, not clustered
    at.selectbox(key="analysis.ft_run").set_value(f"{NAME}_fpgm_ft").run()
    no_exception(at)
    per_class = next(df.value for df in at.dataframe if "airplane" in df.value.columns)
    assert list(per_class[""]) == ["baseline %", "pruned %", "fine-tuned %", "fine-tuned - baseline pp"]
    assert any("the base checkpoint, pruned (before fine-tuning)" in c.value for c in at.caption)


def test_missing_results_show_the_commands(env, tmp_path):
    d = env(checkpoint_dir(tmp_path / "ckpts", results=False))
    at = make_app({"page": "analysis"}).run()
    no_exception(at)
    assert not at.error and not at.warning
    infos = [i.value for i in at.info]
    assert len(infos) == 3, infos
    assert f"python -m explorer.sensitivity --checkpoint {d / 'random.pt'}" in infos[0]
    assert f"python -m explorer.search --budget 0.5 1 2 --checkpoint {d / 'random.pt'}" in infos[1]
    assert f"python -m explorer.finetune --config cfg.json --checkpoint {d / 'random.pt'} --out {d}" in infos[2]
    assert not apply_buttons(at) and not at.get("vega_lite_chart")


def test_unreadable_results_warn_without_exception(env, tmp_path):
    d = env(checkpoint_dir(tmp_path / "ckpts"))
    (d / f"{NAME}.search.json").write_text('{"header": {"baseline_top1": 0.9}, "evaluations": {"x": {"top1": 1}}}')
    (d / f"{NAME}.sensitivity.json").write_text("{not json")
    at = make_app({"page": "analysis"}).run()
    no_exception(at)
    warnings = [w.value for w in at.warning]
    assert len(warnings) == 2 and f"{NAME}.sensitivity.json" in warnings[0] and f"{NAME}.search.json" in warnings[1]
    assert not apply_buttons(at)
    assert len(at.get("vega_lite_chart")) == 2  # fine-tuning: recovery and per-class still shown


def test_apply_best_configuration_opens_the_explorer_on_it(env, tmp_path, monkeypatch):
    import explorer.data

    from explorer.data import synthetic_cifar10

    env(checkpoint_dir(tmp_path / "ckpts"))
    monkeypatch.setattr(explorer.data, "load_cifar10", lambda root=None, download=True: synthetic_cifar10(64, 40, 3))
    at = make_app({"page": "analysis", "proj": "pca"}).run()
    no_exception(at)
    apply_buttons(at)[1].click().run()  # budget 1 pts
    no_exception(at)
    expected = ClusteringConfig(ks=BEST[1.0])
    # no page: the explorer, in its URL form (space and recovery named where they differ from the app's defaults)
    assert at.query_params == state.view_query(state.ViewState(NAME, expected, proj="pca"))
    assert at.query_params["space"] == "weight" and at.query_params["recovery"] == "none"
    assert at.segmented_control(key=state.NAV_KEY).value == "Explorer"
    sliders = {s.key: s.value for s in at.slider if s.key and s.key.startswith("k.")}
    assert sliders == {f"k.{l.name}": BEST[1.0].get(l.name, l.filters) for l in CONV_LAYERS}
    assert any(m.label == "Pruned top-1" for m in at.metric)
    assert any("2 of 19 conv layers clustered" in c.value for c in at.caption)

    # To the Analysis page and back: the explorer's configuration survives in the URL.
    at.segmented_control(key=state.NAV_KEY).set_value("Analysis").run()
    no_exception(at)
    assert at.query_params["page"] == "analysis" and at.query_params["k.layer3.2.conv2"] == "8"
    assert apply_buttons(at) and not at.slider
    at.segmented_control(key=state.NAV_KEY).set_value("Explorer").run()
    no_exception(at)
    assert "page" not in at.query_params
    assert {s.key: s.value for s in at.slider if s.key and s.key.startswith("k.")} == sliders


def test_result_files_are_cached_until_rewritten(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    ckpt.save_json({"header": {"test_images": 1}}, path)
    reads = []
    monkeypatch.setitem(analysis_page._LOADERS, "json", lambda p: reads.append(p) or ckpt.read_json(p))
    analysis_page._read_cached.clear()
    for _ in range(3):  # page reruns: one read of the file
        assert analysis_page.read_result("json", path)["header"]["test_images"] == 1
    assert len(reads) == 1
    ckpt.save_json({"header": {"test_images": 22}}, path)  # an atomic rewrite: new mtime and size
    assert analysis_page.read_result("json", path)["header"]["test_images"] == 22
    assert len(reads) == 2
    path.unlink()
    with pytest.raises(ckpt.CheckpointError):
        analysis_page.read_result("json", path)


def _widths_record(stream, conv1, top1):
    from explorer.analysis.widths import StageWidths, shape_macs

    shape = StageWidths(stream, conv1)
    macs = shape_macs(shape)
    return {"stream": list(stream), "conv1": list(conv1), "label": shape.label(),
            "config": shape.config(ClusteringConfig(fold_bn=True)).to_dict(), "macs": macs,
            "mac_reduction": 1 - macs / 40_551_040, "select_top1": top1, "select_drop_pts": 100 * (0.5 - top1)}


def test_widths_ranking_is_listed_and_a_shape_applies(env, tmp_path, monkeypatch):
    import explorer.data

    from explorer.data import synthetic_cifar10

    d = env(checkpoint_dir(tmp_path / "ckpts"))
    path = d / f"{NAME}.widths.json"
    at = make_app({"page": "analysis"}).run()
    no_exception(at)
    assert any("No shapes ranked for this checkpoint yet: `python -m explorer.search --widths --target-reduction 0.65"
               in c.value for c in at.caption)
    ckpt.save_json({"options": {}, "baseline_select_top1": 0.5,
                    "records": [_widths_record((8, 24, 64), (8, 8, 40), 0.25),
                                _widths_record((8, 32, 56), (8, 16, 56), 0.45),  # 50.6%: another target
                                _widths_record((16, 32, 64), (8, 8, 16), 0.40)]}, path)
    monkeypatch.setattr(explorer.data, "load_cifar10", lambda root=None, download=True: synthetic_cifar10(64, 40, 3))
    at = make_app({"page": "analysis"}).run()
    no_exception(at)
    assert not at.warning
    table = next(df.value for df in at.dataframe if "shape" in df.value.columns)
    assert list(table["shape"]) == ["streams 16/32/64, conv1 8/8/16", "streams 8/24/64, conv1 8/8/40"]  # best first
    assert table["held-out top-1 %"].tolist() == pytest.approx([40.0, 25.0])
    assert table["MACs"].tolist() == [14_008_960, 14_045_824]
    assert any("2 shapes, best first" in c.value and "trained on them: 50.0%)" in c.value for c in at.caption)
    target = at.selectbox(key="analysis.width_target")
    assert target.value == 65 and target.options == ["65-66% fewer MACs (2 shapes)", "50-51% fewer MACs (1 shape)"]
    target.set_value(50).run()
    table = next(df.value for df in at.dataframe if "shape" in df.value.columns)
    assert list(table["shape"]) == ["streams 8/32/56, conv1 8/16/56"]
    at.selectbox(key="analysis.width_target").set_value(65).run()
    at.selectbox(key="analysis.width_shape.65").set_value("streams 8/24/64, conv1 8/8/40").run()
    next(b for b in at.button if b.key == "analysis.width_apply").click().run()
    no_exception(at)
    assert at.segmented_control(key=state.NAV_KEY).value == "Explorer"
    assert at.query_params["s.1"] == "8" and at.query_params["s.2"] == "24" and "s.3" not in at.query_params
    sliders = {s.key: s.value for s in at.slider if s.key}
    assert sliders["k.layer3.0.conv1"] == 40 and sliders["k.layer1.2.conv1"] == 8 and sliders["s.2"] == 24
    # a damaged file is a warning on the Analysis page, not an exception
    path.write_text('{"records": [{"label": 1}]}')
    at = make_app({"page": "analysis"}).run()
    no_exception(at)
    assert any(f"`{NAME}.widths.json` could not be read" in w.value for w in at.warning)
