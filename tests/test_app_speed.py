"""The page answers as fast as the engine (issue 15, part 1): what a slider move builds besides the
engine's result, under AppTest on the tiny image folder (p58 checkpoint, fp32 engine; seconds).

- only the section picked in the ``tab`` switch is built (``st.tabs`` built every hidden tab on
  every run); the headline is computed before it;
- a chart whose numbers did not change is not rebuilt (the cached Vega-Lite spec is drawn), and
  the page shows the same spec and the same numbers as an independent Explorer;
- the seed spread waits until no page run is in progress and the page has been idle a while.

The browser-perceived timings are measured by ``python -m explorer.bench --browser``
(:mod:`explorer.analysis.browser_bench`), never asserted here.
"""
from __future__ import annotations

import json
import os
import threading
import time
from types import SimpleNamespace

import pytest

from explorer import checkpoints as ckpt
from explorer.app import charts, explorer_page, finetuning, spread, state
from explorer.clustering import ClusteringConfig
from explorer.data import load_cifar10
from explorer.lru import LRUCache
from explorer.pipeline import Explorer, SpreadAbandoned
from streamlit.elements.vega_charts import _convert_altair_to_vega_lite_spec

from test_user_failures import P58, make_app, no_exception, p58_tiny_env

Q = {"ckpt": P58, "proj": "pca", "space": "weight", "recovery": "none"}
SECTIONS = ("per_class_section", "confusion_section", "projection_section", "downloads_section")


@pytest.fixture
def tiny_app_env(monkeypatch, tmp_path):
    d = p58_tiny_env(monkeypatch, tmp_path)
    monkeypatch.setattr(explorer_page, "_SPECS", LRUCache(256))  # no charts cached by earlier tests
    return d


@pytest.fixture
def calls(monkeypatch):
    """Counts of the section builders' calls, and the order of the headline and the section."""
    counts = {name: 0 for name in SECTIONS + ("finetune", "results", "tab_section")}
    order: list[str] = []

    def counted(module, name, label):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            counts[label] += 1
            order.append(label)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    for name in SECTIONS + ("results", "tab_section"):
        counted(explorer_page, name, name)
    counted(finetuning, "section", "finetune")
    return SimpleNamespace(counts=counts, order=order)


def built(calls) -> dict:
    return {k: v for k, v in calls.counts.items() if v and k not in ("results", "tab_section")}


def metrics(at) -> dict:
    return {m.label: m.value for m in at.metric}


def test_only_the_shown_section_is_built(tiny_app_env, calls):
    at = make_app(Q).run()
    no_exception(at)
    assert built(calls) == {"per_class_section": 1}  # the default tab; hidden ones cost nothing
    assert calls.order[:2] == ["results", "tab_section"]  # the headline first
    at.slider(key="k.layer3.2.conv2").set_value(32).run()
    no_exception(at)
    assert built(calls) == {"per_class_section": 2}
    headline = metrics(at)
    at.segmented_control(key="tab").set_value("confusion").run()
    no_exception(at)
    assert built(calls) == {"per_class_section": 2, "confusion_section": 1}
    assert at.query_params["tab"] == "confusion" and at.query_params["k.layer3.2.conv2"] == "32"
    assert metrics(at) == headline  # the same result, whichever section is shown
    at.segmented_control(key="tab").set_value("filters").run()
    at.segmented_control(key="tab").set_value("finetune").run()
    at.segmented_control(key="tab").set_value("downloads").run()
    no_exception(at)
    assert built(calls) == {"per_class_section": 2, "confusion_section": 1, "projection_section": 1,
                            "finetune": 1, "downloads_section": 1}
    assert [b.label for b in at.download_button][:1] == ["Configuration (JSON)"]


def test_url_tab_opens_that_section(tiny_app_env, calls):
    at = make_app({**Q, "tab": "confusion"}).run()
    no_exception(at)
    assert built(calls) == {"confusion_section": 1}
    assert at.segmented_control(key="tab").value == "confusion"
    bad = make_app({**Q, "tab": "everything"}).run()
    no_exception(bad)
    assert any("tab='everything' is not one of" in w.value for w in bad.warning)
    assert bad.segmented_control(key="tab").value == state.DEFAULT_TAB


def test_unchanged_charts_are_not_rebuilt(tiny_app_env, monkeypatch):
    builds = []
    original = charts.confusion_chart
    monkeypatch.setattr(charts, "confusion_chart", lambda m, c, title, *a, **k: builds.append(title) or original(m, c, title, *a, **k))
    at = make_app({**Q, "tab": "confusion"}).run()
    no_exception(at)
    assert sorted(builds) == ["Baseline", "Difference (pruned - baseline)", "Pruned"]
    first = [c.proto.spec for c in at.get("vega_lite_chart")]
    at.run()  # a rerun with nothing changed: nothing rebuilt, the same specs drawn
    assert len(builds) == 3 and [c.proto.spec for c in at.get("vega_lite_chart")] == first
    at.slider(key="k.layer3.2.conv2").set_value(32).run()
    no_exception(at)
    assert builds[3:] == ["Pruned", "Difference (pruned - baseline)"]  # the baseline's heatmap is cached
    clustered = [c.proto.spec for c in at.get("vega_lite_chart")]
    assert clustered[0] == first[0] and clustered[1:] != first[1:]
    at.slider(key="k.layer3.2.conv2").set_value(64).run()  # back to a configuration seen before
    assert len(builds) == 5 and [c.proto.spec for c in at.get("vega_lite_chart")] == first

    # The cached path draws what st.altair_chart would, from the numbers an independent Explorer computes.
    exp = Explorer(ckpt.load_model(tiny_app_env / f"{P58}.pt"), load_cifar10(), P58)
    config = ClusteringConfig(ks={"layer3.2.conv2": 32}, space="weight", recovery="none")
    result = exp.run(config)
    at.slider(key="k.layer3.2.conv2").set_value(32).run()
    assert metrics(at)["Pruned top-1"] == charts.pct(result.evaluation.top1)
    cmp = result.comparison
    want = _convert_altair_to_vega_lite_spec(original(cmp.pruned.confusion, list(cmp.baseline.classes), "Pruned"))
    got = json.loads(at.get("vega_lite_chart")[1].proto.spec)
    assert got["layer"] == json.loads(json.dumps(want["layer"]))


class _FakeExplorer:
    """An Explorer's seed-spread loop over a stand-in ``run`` that records when each seed ran."""

    seed_spread = Explorer.seed_spread

    def __init__(self):
        self.ran: list[float] = []
        self.pruned: list[int] = []
        self.exclusive: set[bool] = set()

    def cached(self, config):
        return None

    def _prune(self, config, exclusive=True):  # clustering first, then the spread asks again before the evaluation
        self.pruned.append(config.seed)
        self.exclusive.add(exclusive)

    def run(self, config, exclusive=True):
        self.exclusive.add(exclusive)
        self.ran.append(time.monotonic())
        return SimpleNamespace(evaluation=SimpleNamespace(top1=0.5 + config.seed / 100))


def test_seed_spread_waits_until_the_page_is_idle(monkeypatch):
    monkeypatch.setattr(spread, "IDLE_S", 0.3)
    exp = _FakeExplorer()
    config = ClusteringConfig(ks={"layer3.2.conv2": 8})
    with spread.page_run():  # a slider move being answered, in some session
        fut = spread.request(exp, config, seeds=3)
        time.sleep(0.5)
        assert exp.ran == [] and not fut.done()
        ended = time.monotonic()
    assert fut.result(timeout=10)["top1"] == [0.5, 0.51, 0.52]
    assert exp.ran[0] - ended >= 0.3  # not before the page has been idle IDLE_S seconds
    assert exp.exclusive == {False}  # never queued on the clustering lock a slider move waits for


def test_seed_spread_of_a_superseded_configuration_stops(monkeypatch):
    monkeypatch.setattr(spread, "IDLE_S", 0.2)
    exp = _FakeExplorer()
    with spread.page_run():
        old = spread.request(exp, ClusteringConfig(ks={"layer3.2.conv2": 8}), seeds=3)
        new = spread.request(exp, ClusteringConfig(ks={"layer3.2.conv2": 16}), seeds=3)
    assert isinstance(old.exception(timeout=10), SpreadAbandoned)
    assert new.result(timeout=10)["seeds"] == [0, 1, 2] and len(exp.ran) == 3 and exp.pruned == [0, 1, 2]
    # Nothing clustered on screen any more: the running spread stops after its seed.
    with spread.page_run():
        third = spread.request(exp, ClusteringConfig(ks={"layer3.2.conv2": 4}), seeds=3)
        spread.cancel(exp)
    assert isinstance(third.exception(timeout=10), SpreadAbandoned) and len(exp.ran) == 3


def test_seed_spread_thread_runs_at_lower_priority(monkeypatch):
    seen = {}

    class Probe(_FakeExplorer):
        def run(self, config, exclusive=True):
            seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            return super().run(config, exclusive)

    monkeypatch.setattr(spread, "IDLE_S", 0.0)
    spread.request(Probe(), ClusteringConfig(ks={"conv1": 3}), seeds=1).result(timeout=10)
    assert seen["nice"] >= min(19, os.getpriority(os.PRIO_PROCESS, 0) + spread.NICE)


def test_browser_bench_formats_top1_as_the_page():
    from explorer.analysis import browser_bench
    from explorer.app import charts

    for x in (0.91234, 0.8913, 0.1, 0.0):
        assert browser_bench._pct_text(x) == charts.pct(x)


def test_sessions_cluster_one_configuration_at_a_time(monkeypatch):
    """Concurrent sessions' clustering + recovery runs one at a time (bounded transient memory), and
    sessions asking for the same configuration wait for the one run instead of repeating it."""
    import explorer.pipeline as pipeline
    from explorer.data import synthetic_cifar10
    from explorer.model import resnet20

    exp = Explorer(resnet20(), synthetic_cifar10(n_train=64, n_test=20, seed=1), activation_cache_mb=8)
    active, peak, calls = [0], [0], []
    lock = threading.Lock()

    def slow_prune(model, config, *a, **kw):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            calls.append(dict(config.active))
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        return model, pipeline.Clustering(config, {})

    monkeypatch.setattr(pipeline, "prune", slow_prune)
    configs = [ClusteringConfig(ks={"conv1": 4}), ClusteringConfig(ks={"conv1": 4}), ClusteringConfig(ks={"conv1": 5})]
    threads = [threading.Thread(target=exp._prune, args=(c,)) for c in configs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert peak[0] == 1
    assert sorted(c["conv1"] for c in calls) == [4, 5]
