"""Altair chart builders for the analysis results (no Streamlit imports): used by the report
(:mod:`.report`) and by the app's Analysis page (:mod:`explorer.app.analysis_page`).

Inputs are the tidy pandas DataFrames of :func:`.sensitivity.load_sensitivity`,
:func:`.search.pareto_table` and the small frames built by :mod:`.report`.
Conventions as in :mod:`explorer.app.charts`: accuracies are fractions in data and shown as
percentages; accuracy differences are percentage points (pp); MACs are per 32x32 image.
Every builder returns an ``altair`` chart; none needs a network to build (viewing Altair HTML
loads the Vega JavaScript from a CDN; PNG/SVG export needs ``vl-convert-python``).
"""
from __future__ import annotations

import altair as alt
import pandas as pd

from ..data import CLASSES
from ..model import CONV_LAYER_NAMES

LAYER_ORDER = list(CONV_LAYER_NAMES)
SOURCE_COLORS = {"greedy": "#e4572e", "uniform": "#4c78a8", "fine-tuned": "#2e9e4f", "fine-tuned, pruned": "#b279a2", "baseline": "#9aa5b1"}


def _title(text: str, subtitle: str | None = None):
    return alt.TitleParams(text, subtitle=subtitle or [], anchor="start")


def sensitivity_heatmap(df: pd.DataFrame, title: str = "Sensitivity: points lost when only one layer is clustered",
                        subtitle: str | None = None, clip: float | None = None) -> alt.Chart:
    """Layer (rows, forward order) x k (columns) -> top-1 points lost (colour, text). ``df``: rows of
    one option set from :func:`.sensitivity.load_sensitivity` (columns layer, k, drop_pts,
    top1, filters, mac_reduction). ``clip`` caps the colour scale (text keeps the real value)."""
    d = df[["layer", "k", "drop_pts", "top1", "filters", "mac_reduction"]].copy()
    d["label"] = d["drop_pts"].map(lambda v: f"{v:.1f}")
    top = clip if clip is not None else max(1.0, float(d["drop_pts"].max()) if len(d) else 1.0)
    base = alt.Chart(d).encode(
        x=alt.X("k:O", title="k (clusters in the layer)"),
        y=alt.Y("layer:N", sort=LAYER_ORDER, title=None, axis=alt.Axis(labelOverlap=False)),
    )
    rect = base.mark_rect().encode(
        color=alt.Color("drop_pts:Q", title="pp lost", scale=alt.Scale(scheme="orangered", domain=[0, top],
                                                                      clamp=True)),
        tooltip=[alt.Tooltip("layer:N"), alt.Tooltip("k:O"), alt.Tooltip("filters:Q", title="filters"),
                 alt.Tooltip("drop_pts:Q", title="pp lost", format=".2f"),
                 alt.Tooltip("top1:Q", title="top-1", format=".2%"),
                 alt.Tooltip("mac_reduction:Q", title="MACs saved", format=".1%")],
    )
    text = base.mark_text(fontSize=9).encode(
        text="label:N",
        color=alt.condition(alt.datum.drop_pts > top * 0.6, alt.value("white"), alt.value("black")),
    )
    return (rect + text).properties(width=320, height=380, title=_title(title, subtitle))


def sensitivity_lines(df: pd.DataFrame, title: str = "Sensitivity per layer", columns: int = 4) -> alt.Chart:
    """Top-1 points lost vs k (log2 axis), one line per layer, one panel per stage (``columns``
    panels per row)."""
    d = df[["layer", "stage", "k", "drop_pts"]].copy()
    d["stage"] = d["stage"].map(lambda s: "stem" if s == 0 else f"stage {s}")
    return alt.Chart(d).mark_line(point=True).encode(
        x=alt.X("k:Q", scale=alt.Scale(type="log", base=2), axis=alt.Axis(values=[1, 2, 4, 8, 16, 32, 64]),
                title="k"),
        y=alt.Y("drop_pts:Q", title="pp lost"),
        color=alt.Color("layer:N", sort=LAYER_ORDER, legend=alt.Legend(columns=2, symbolLimit=19)),
        tooltip=["layer:N", "k:Q", alt.Tooltip("drop_pts:Q", format=".2f")],
    ).properties(width=180, height=160).facet(facet=alt.Facet("stage:N", title=None), columns=columns).properties(
        title=_title(title))


def metric_sensitivity_chart(df: pd.DataFrame, title: str = "Euclidean vs cosine, one layer at a time"
                             ) -> alt.Chart:
    """Points lost per layer at each k for each metric: rows of :func:`load_sensitivity` with both
    metrics (other options fixed). Bars: layer x metric, one panel per k."""
    d = df[["layer", "k", "metric", "drop_pts"]].copy()
    d = d[d["k"] < df["filters"]]
    return alt.Chart(d).mark_bar().encode(
        x=alt.X("layer:N", sort=LAYER_ORDER, title=None, axis=alt.Axis(labelAngle=-60)),
        xOffset="metric:N",
        y=alt.Y("drop_pts:Q", title="pp lost"),
        color=alt.Color("metric:N"),
        tooltip=["layer:N", "k:Q", "metric:N", alt.Tooltip("drop_pts:Q", format=".2f")],
    ).properties(width=520, height=120).facet(row=alt.Row("k:O", title="k")).properties(title=_title(title))


def pareto_chart(df: pd.DataFrame, baseline_top1: float | None = None, x: str = "macs",
                 title: str = "Accuracy vs MACs of the compressed net") -> alt.Chart:
    """Every verified configuration (``df`` from :func:`.search.pareto_table`, columns
    source, top1, macs, params, drop_pts, mac_reduction, config; plus any extra rows such as
    fine-tuned results) as points coloured by source, the Pareto front as a step line, and the
    baseline top-1 as a rule. ``x``: "macs" or "params"."""
    d = df.copy()
    d["x"] = d[x] / 1e6 if x == "macs" else d[x] / 1e3
    xt = "MACs per image (M)" if x == "macs" else "parameters (k)"
    flag = f"pareto_{x}"
    sources = list(dict.fromkeys(d["source"]))
    color = alt.Color("source:N", scale=alt.Scale(domain=sources, range=[SOURCE_COLORS.get(s, "#888") for s in sources]))
    pts = alt.Chart(d).mark_circle(size=60, opacity=0.8).encode(
        x=alt.X("x:Q", title=xt), y=alt.Y("top1:Q", title="top-1", axis=alt.Axis(format="%"),
                                            scale=alt.Scale(zero=False)),
        color=color,
        tooltip=[alt.Tooltip("source:N"), alt.Tooltip("top1:Q", format=".2%"),
                 alt.Tooltip("drop_pts:Q", title="pp lost", format=".2f"),
                 alt.Tooltip("mac_reduction:Q", title="MACs saved", format=".1%"),
                 alt.Tooltip("params:Q", format=","), alt.Tooltip("config:N", title="ks")],
    )
    layers = [pts]
    if flag in d:
        front = d[d[flag]].sort_values("x")
        layers.insert(0, alt.Chart(front).mark_line(interpolate="step-after", color="#333", strokeDash=[4, 3])
                      .encode(x="x:Q", y="top1:Q"))
    if baseline_top1 is not None:
        layers.append(alt.Chart(pd.DataFrame({"top1": [baseline_top1]})).mark_rule(color=SOURCE_COLORS["baseline"])
                      .encode(y="top1:Q"))
    return alt.layer(*layers).properties(width=480, height=300, title=_title(title))


def per_class_chart(df: pd.DataFrame, value: str = "delta", title: str = "Per-class change",
                    subtitle: str | None = None) -> alt.Chart:
    """Grouped bars: class x variant. ``df`` columns: class, variant, and ``value`` (fractions;
    "delta" is shown in pp, anything else as a percentage)."""
    d = df.copy()
    if value == "delta":
        d["v"] = 100 * d[value]
        y = alt.Y("v:Q", title="change (pp)")
        tip = alt.Tooltip("v:Q", title="pp", format="+.1f")
    else:
        d["v"] = d[value]
        y = alt.Y("v:Q", title="accuracy", axis=alt.Axis(format="%"), scale=alt.Scale(zero=False))
        tip = alt.Tooltip("v:Q", title="accuracy", format=".1%")
    return alt.Chart(d).mark_bar().encode(
        x=alt.X("class:N", sort=list(CLASSES), title=None, axis=alt.Axis(labelAngle=-40, labelOverlap=False)),
        xOffset="variant:N", y=y, color=alt.Color("variant:N", title=None),
        tooltip=["class:N", "variant:N", tip],
    ).properties(width=480, height=220, title=_title(title, subtitle))


def baseline_per_class_chart(per_class: dict[str, float], title: str = "Baseline per-class accuracy",
                             subtitle: str | None = None) -> alt.Chart:
    """Bars of per-class accuracy (``{class: fraction}``) with the value as text."""
    d = pd.DataFrame({"class": list(per_class), "accuracy": list(per_class.values())})
    base = alt.Chart(d).encode(x=alt.X("class:N", sort=list(CLASSES), title=None,
                                                 axis=alt.Axis(labelAngle=-40, labelOverlap=False)),
                               y=alt.Y("accuracy:Q", axis=alt.Axis(format="%"), scale=alt.Scale(domain=[0, 1])))
    return (base.mark_bar(color=SOURCE_COLORS["baseline"]) + base.mark_text(dy=-6, fontSize=9).encode(
        text=alt.Text("accuracy:Q", format=".1%"))).properties(width=480, height=200, title=_title(title, subtitle))


def recovery_chart(curves: pd.DataFrame, baseline_top1: float | None = None,
                   title: str = "Fine-tuning recovery (test top-1 per epoch)") -> alt.Chart:
    """Test top-1 vs epoch (epoch 0 = clustered, before fine-tuning), one line per run
    (``curves`` columns: run, epoch, test_top1), baseline as a rule."""
    lines = alt.Chart(curves).mark_line(point=True).encode(
        x=alt.X("epoch:Q", title="epoch"), y=alt.Y("test_top1:Q", title="test top-1", axis=alt.Axis(format="%"),
                                                    scale=alt.Scale(zero=False)),
        color=alt.Color("run:N", title=None),
        tooltip=["run:N", "epoch:Q", alt.Tooltip("test_top1:Q", format=".2%")],
    )
    layers = [lines]
    if baseline_top1 is not None:
        layers.append(alt.Chart(pd.DataFrame({"top1": [baseline_top1]})).mark_rule(
            color=SOURCE_COLORS["baseline"], strokeDash=[4, 3]).encode(y="top1:Q"))
    return alt.layer(*layers).properties(width=480, height=260, title=_title(title))


def comparison_chart(df: pd.DataFrame, title: str = "Metric and granularity, same k in every layer") -> alt.Chart:
    """Top-1 vs uniform k for each (metric, granularity) variant, one panel per BN setting when
    ``df`` has a ``recalibrate`` column: ``df`` columns k, top1, metric, granularity[, recalibrate]."""
    d = df.copy()
    d["variant"] = d["metric"] + " / " + d["granularity"]
    ks = sorted(int(k) for k in d["k"].unique())
    chart = alt.Chart(d).mark_line(point=True).encode(
        x=alt.X("k:Q", scale=alt.Scale(type="log", base=2), axis=alt.Axis(values=ks), title="k (every layer)"),
        y=alt.Y("top1:Q", title="top-1", axis=alt.Axis(format="%")),
        color=alt.Color("variant:N", title=None),
        tooltip=["variant:N", "k:Q", alt.Tooltip("top1:Q", format=".2%")],
    ).properties(width=300 if "recalibrate" in d else 480, height=240)
    if "recalibrate" in d:
        d["BN"] = d["recalibrate"].map({True: "BN re-estimated", False: "no BN re-estimation"})
        chart = chart.properties(data=d).facet(column=alt.Column("BN:N", title=None, sort="descending"))
    return chart.properties(title=_title(title))


def recovery_comparison_chart(half: pd.DataFrame, seed: int = 0,
                              title: str = "Each layer alone at half its filters: points lost, by space and recovery",
                              subtitle: str | None = None) -> alt.Chart:
    """Layer (x, forward order) -> top-1 points lost (y, symlog), one line per variant (clustering
    space + recovery). ``half``: :func:`.comparison.half_points` (columns layer, variant, seed,
    drop_pts, top1)."""
    d = half[half["seed"] == seed][["layer", "variant", "drop_pts", "top1"]].copy()
    return alt.Chart(d).mark_line(point=True).encode(
        x=alt.X("layer:N", sort=LAYER_ORDER, title=None, axis=alt.Axis(labelAngle=-60, labelOverlap=False)),
        y=alt.Y("drop_pts:Q", title="pp lost (symlog)", scale=alt.Scale(type="symlog")),
        color=alt.Color("variant:N", title="space + recovery", legend=alt.Legend(orient="bottom", columns=3)),
        tooltip=["layer:N", "variant:N", alt.Tooltip("drop_pts:Q", title="pp lost", format=".2f"),
                 alt.Tooltip("top1:Q", title="top-1", format=".2%")],
    ).properties(width=620, height=300, title=_title(title, subtitle))


def finetuned_comparison_chart(df: pd.DataFrame, title: str = "Clustering vs pruning after fine-tuning",
                               subtitle: str | None = None) -> alt.Chart:
    """Top-1 (x) before and after fine-tuning (colour) per run (y), one panel per (MACs, epochs)
    budget. ``df``: :func:`.baselines.finetuned_table`."""
    d = df.copy()
    d["budget"] = [f"{100 * m:.1f}% fewer MACs, {e} epochs" for m, e in zip(d["mac_reduction"], d["epochs"])]
    d["run"] = [f"{m} [{n}]" for m, n in zip(d["method"], d["name"])]
    long = d.melt(id_vars=["budget", "run", "method", "name", "drop_pts"], value_vars=["before", "after"],
                  var_name="when", value_name="top1")
    return alt.Chart(long).mark_bar().encode(
        x=alt.X("top1:Q", title="top-1", axis=alt.Axis(format="%"), scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("method:N", title=None, sort=None),
        yOffset=alt.YOffset("when:N", sort=["before", "after"]),
        color=alt.Color("when:N", sort=["before", "after"], title="fine-tuning"),
        tooltip=["budget:N", "run:N", "when:N", alt.Tooltip("top1:Q", format=".2%"),
                 alt.Tooltip("drop_pts:Q", title="pp lost after", format=".2f")],
    ).properties(width=300, height=160).facet(column=alt.Column("budget:N", title=None)).properties(
        title=_title(title, subtitle))


def baselines_chart(df: pd.DataFrame, title: str = "Clustering vs pruning at the same MACs, before fine-tuning",
                    subtitle: str | None = None) -> alt.Chart:
    """Top-1 (x) per method (y) and recovery (colour), one panel per MACs point. ``df``:
    :func:`.baselines.table` (columns label, method, recovery, top1, mac_reduction)."""
    d = df.copy()
    d["point"] = [f"{lab}: {100 * m:.1f}% fewer MACs" for lab, m in zip(d["label"], d["mac_reduction"])]
    return alt.Chart(d).mark_bar().encode(
        x=alt.X("top1:Q", title="top-1", axis=alt.Axis(format="%"), scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("method:N", title=None, sort=None),
        yOffset=alt.YOffset("recovery:N", sort=["none", "bn", "lsq"]),
        color=alt.Color("recovery:N", sort=["none", "bn", "lsq"], title="recovery"),
        tooltip=["point:N", "method:N", "recovery:N", alt.Tooltip("top1:Q", format=".2%"),
                 alt.Tooltip("drop_pts:Q", title="pp lost", format=".2f")],
    ).properties(width=300, height=260).facet(column=alt.Column("point:N", title=None)).properties(
        title=_title(title, subtitle))
