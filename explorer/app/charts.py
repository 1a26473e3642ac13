"""Altair chart builders, tables and display formatting for the app (no Streamlit imports here).

Conventions (see DESIGN.md): accuracies are fractions in code and shown as percentages with one
decimal; accuracy differences are shown in percentage points ("pp"); MACs are per image.
Every builder takes plain arrays / :class:`explorer.evaluate.Comparison` objects and returns an
``altair.Chart`` (or a pandas DataFrame), so it can be tested without a browser.
"""
from __future__ import annotations

import io
from typing import Sequence

import altair as alt
import numpy as np
import pandas as pd

BASELINE_COLOR = "#9aa5b1"
PRUNED_COLOR = "#e4572e"


# ---------------------------------------------------------------- formatting

def pct(fraction: float) -> str:
    """0.91234 -> '91.2%' (one decimal, as everywhere in the UI)."""
    return f"{100 * fraction:.1f}%"


def pp(delta: float) -> str:
    """A difference of fractions as signed percentage points: -0.0123 -> '-1.2 pp'."""
    v = 100 * delta
    if abs(v) < 0.05:
        v = 0.0  # no "-0.0 pp"
    return f"{v:+.1f} pp"


def count(n: int) -> str:
    """1234567 -> '1.23 M', 270000 -> '270.0 k', 950 -> '950'."""
    n = int(n)
    if abs(n) >= 1_000_000:
        return f"{n / 1e6:.2f} M"
    if abs(n) >= 10_000:
        return f"{n / 1e3:.1f} k"
    return f"{n:,}"


# ---------------------------------------------------------------- tables

def per_class_frame(comparison) -> pd.DataFrame:
    """:meth:`explorer.evaluate.Comparison.table` (class, baseline, pruned, delta; fractions) plus
    the number of test images of each class (support)."""
    df = comparison.table()
    df["support"] = comparison.baseline.confusion.sum(axis=1).astype(int)
    return df


def per_class_display(comparison) -> pd.DataFrame:
    """:func:`per_class_frame` in display units: percentages and percentage points, one decimal."""
    df = per_class_frame(comparison)
    return pd.DataFrame({
        "class": df["class"],
        "baseline %": (100 * df["baseline"]).round(1),
        "pruned %": (100 * df["pruned"]).round(1),
        "Δ pp": (100 * df["delta"]).round(1),
        "images": df["support"],
    })


def per_class_csv(comparison) -> bytes:
    """CSV of :func:`per_class_frame` plus a final ``top-1`` row (fractions, full precision)."""
    df = per_class_frame(comparison)
    top = pd.DataFrame([{"class": "top-1", "baseline": comparison.baseline.top1, "pruned": comparison.pruned.top1,
                         "delta": comparison.top1_delta, "support": int(df["support"].sum())}])
    return pd.concat([df, top], ignore_index=True).to_csv(index=False).encode()


def confusion_frame(comparison) -> pd.DataFrame:
    """Long form of the three confusion matrices: one row per (true, predicted) class pair with
    baseline and pruned counts and their difference (pruned - baseline)."""
    classes = list(comparison.baseline.classes)
    b = comparison.baseline.confusion
    p = comparison.pruned.confusion
    n = len(classes)
    ii, jj = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return pd.DataFrame({
        "true": [classes[i] for i in ii.ravel()],
        "predicted": [classes[j] for j in jj.ravel()],
        "baseline": b.ravel().astype(int),
        "pruned": p.ravel().astype(int),
        "delta": (p.astype(np.int64) - b.astype(np.int64)).ravel(),
    })


def confusion_csv(comparison) -> bytes:
    """CSV of :func:`confusion_frame` (rows = true class, ``predicted`` = predicted class)."""
    buf = io.StringIO()
    confusion_frame(comparison).to_csv(buf, index=False)
    return buf.getvalue().encode()


# ---------------------------------------------------------------- per-class charts

def per_class_chart(comparison, height: int = 280) -> alt.Chart:
    """Grouped bars: baseline vs pruned accuracy per class (percent), with tooltips."""
    df = per_class_frame(comparison)
    long = pd.concat([
        pd.DataFrame({"class": df["class"], "model": "baseline", "accuracy": 100 * df["baseline"], "delta": 100 * df["delta"]}),
        pd.DataFrame({"class": df["class"], "model": "pruned", "accuracy": 100 * df["pruned"], "delta": 100 * df["delta"]}),
    ], ignore_index=True)
    lo = max(0.0, float(np.floor(long["accuracy"].min() / 10) * 10) - 10)
    return alt.Chart(long, height=height).mark_bar().encode(
        x=alt.X("class:N", sort=list(df["class"]), title=None, axis=alt.Axis(labelAngle=-40, labelOverlap=False)),
        xOffset=alt.XOffset("model:N", sort=["baseline", "pruned"]),
        y=alt.Y("accuracy:Q", title="accuracy (%)", scale=alt.Scale(domain=[lo, 100], clamp=True)),
        color=alt.Color("model:N", scale=alt.Scale(domain=["baseline", "pruned"], range=[BASELINE_COLOR, PRUNED_COLOR]),
                        legend=alt.Legend(orient="top", title=None)),
        tooltip=[alt.Tooltip("class:N"), alt.Tooltip("model:N"), alt.Tooltip("accuracy:Q", format=".1f", title="accuracy %"),
                 alt.Tooltip("delta:Q", format="+.1f", title="Δ pp (pruned - baseline)")],
    ).properties(title="Per-class accuracy")


def per_class_delta_chart(comparison, height: int = 280) -> alt.Chart:
    """Horizontal bars of the per-class change (pruned - baseline) in percentage points."""
    df = per_class_frame(comparison)
    df = df.assign(delta_pp=100 * df["delta"], baseline_pct=100 * df["baseline"], pruned_pct=100 * df["pruned"],
                   sign=np.where(df["delta"] < 0, "worse", "better or equal"))
    return alt.Chart(df, height=height).mark_bar().encode(
        y=alt.Y("class:N", sort=list(df["class"]), title=None, axis=alt.Axis(labelOverlap=False)),
        # At least +-1 pp: with nothing changed Vega-Lite's domain collapses to one tick, "0.000000".
        x=alt.X("delta_pp:Q", title="Δ accuracy (pp)", axis=alt.Axis(format="+.1~f"),
                scale=alt.Scale(domain=[min(-1.0, float(df["delta_pp"].min())), max(1.0, float(df["delta_pp"].max()))])),
        color=alt.Color("sign:N", scale=alt.Scale(domain=["worse", "better or equal"], range=[PRUNED_COLOR, "#2e86ab"]),
                        legend=None),
        tooltip=[alt.Tooltip("class:N"), alt.Tooltip("baseline_pct:Q", format=".1f", title="baseline %"),
                 alt.Tooltip("pruned_pct:Q", format=".1f", title="pruned %"),
                 alt.Tooltip("delta_pp:Q", format="+.1f", title="Δ pp")],
    ).properties(title="Change per class")


# ---------------------------------------------------------------- confusion heatmaps

def confusion_chart(matrix: np.ndarray, classes: Sequence[str], title: str, kind: str = "counts",
                    size: int = 320) -> alt.Chart:
    """Heatmap of a (C, C) confusion matrix, rows = true class (y), columns = predicted class (x),
    class names on both axes, counts in the cells and a tooltip with the count and its share of the
    true class. ``kind="delta"`` draws a difference matrix with a diverging scale centred on 0
    (blue = more images in that cell after pruning on the diagonal is good, red off-diagonal is bad;
    the tooltip says which)."""
    m = np.asarray(matrix)
    n = len(classes)
    ii, jj = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    row_total = np.abs(m).sum(axis=1, keepdims=True) if kind == "delta" else m.sum(axis=1, keepdims=True)
    share = np.divide(m, np.maximum(row_total, 1)).ravel()
    df = pd.DataFrame({"true": [classes[i] for i in ii.ravel()], "predicted": [classes[j] for j in jj.ravel()],
                       "count": m.ravel().astype(int), "share": 100 * share,
                       "cell": np.where(ii.ravel() == jj.ravel(), "correct", "error")})
    base = alt.Chart(df, width=size, height=size)
    # labelOverlap=False: Vega-Lite's default drops every other rotated label on a 320 px axis, and
    # every class must be named.
    axis_x = alt.X("predicted:N", sort=list(classes), title="predicted",
                   axis=alt.Axis(labelAngle=-45, labelOverlap=False))
    axis_y = alt.Y("true:N", sort=list(classes), title="true", axis=alt.Axis(labelOverlap=False))
    if kind == "delta":
        lim = max(1, int(np.abs(m).max()))
        # On the diagonal more is better; off the diagonal fewer is better. Flip colours off-diagonal so
        # that blue always means "better" and red "worse".
        df["goodness"] = np.where(df["cell"] == "correct", df["count"], -df["count"])
        base = alt.Chart(df, width=size, height=size)
        color = alt.Color("goodness:Q", title=["better (+)", "worse (-)"],
                          scale=alt.Scale(scheme="redblue", domain=[-lim, lim], domainMid=0),
                          legend=alt.Legend(gradientLength=size // 2))
        tooltip = [alt.Tooltip("true:N"), alt.Tooltip("predicted:N"), alt.Tooltip("count:Q", title="Δ images (pruned - baseline)"),
                   alt.Tooltip("cell:N", title="cell")]
        text_cond = alt.condition("datum.count != 0", alt.Text("count:Q", format="+d"), alt.value(""))
    else:
        color = alt.Color("count:Q", title="images", scale=alt.Scale(scheme="blues", type="sqrt"),
                          legend=alt.Legend(gradientLength=size // 2))
        tooltip = [alt.Tooltip("true:N"), alt.Tooltip("predicted:N"), alt.Tooltip("count:Q", title="images"),
                   alt.Tooltip("share:Q", format=".1f", title="% of true class")]
        text_cond = alt.Text("count:Q")
    heat = base.mark_rect().encode(x=axis_x, y=axis_y, color=color, tooltip=tooltip)
    threshold = float(np.abs(m).max()) * 0.5
    text = base.mark_text(fontSize=9).encode(
        x=axis_x, y=axis_y, text=text_cond,
        color=alt.condition(f"abs(datum.count) > {threshold}", alt.value("white"), alt.value("#222")),
        tooltip=tooltip,
    )
    # "pad": the cells keep their size and axes/legend are added around them (Streamlit's default "fit"
    # would squeeze the whole chart, legend included, into width x height).
    return (heat + text).properties(title=title, autosize=alt.AutoSizeParams(type="pad"))


# ---------------------------------------------------------------- filters in 2D

def projection_frame(projection, lmap) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """DataFrames for :func:`projection_chart` from a 2D ``projection``
    (:class:`explorer.projection.Projection`) of the layer described by ``lmap``
    (:class:`explorer.projection.LayerMap`): one row per point (x, y, name, cluster, norm, cluster
    size) and one per centroid (x, y, cluster, members); an unclustered layer shows every point as
    its own cluster."""
    p = projection.points
    labels = np.arange(len(p)) if lmap.labels is None else np.asarray(lmap.labels)
    sizes = lmap.cluster_sizes()
    pts = pd.DataFrame({"x": p[:, 0], "y": p[:, 1], "point": list(lmap.names), "cluster": labels.astype(int),
                        "norm": np.asarray(lmap.norms, dtype=float), "cluster size": sizes[labels].astype(int)})
    cents = None
    if projection.centroids is not None:
        c = projection.centroids
        cents = pd.DataFrame({"x": c[:, 0], "y": c[:, 1], "cluster": np.arange(len(c)),
                              "members": sizes[: len(c)].astype(int)})
    return pts, cents


def projection_chart(points: pd.DataFrame, centroids: pd.DataFrame | None, title: str, height: int = 420) -> alt.Chart:
    """Scatter of a layer's filters (circles, coloured by cluster) and its centroids (large black-edged
    diamonds in the same colour), with tooltips: filter index, cluster, norm, cluster size."""
    n_clusters = int(points["cluster"].max()) + 1
    scheme = "tableau10" if n_clusters <= 10 else "tableau20"
    color = alt.Color("cluster:N", scale=alt.Scale(scheme=scheme),
                      legend=alt.Legend(title="cluster", columns=2, symbolLimit=24) if n_clusters <= 24 else None)
    dots = alt.Chart(points).mark_circle(size=70, opacity=0.85).encode(
        x=alt.X("x:Q", title=None, axis=alt.Axis(labels=False, ticks=False), scale=alt.Scale(zero=False, padding=12)),
        y=alt.Y("y:Q", title=None, axis=alt.Axis(labels=False, ticks=False), scale=alt.Scale(zero=False, padding=12)),
        color=color,
        tooltip=[alt.Tooltip("point:N", title="filter"), alt.Tooltip("cluster:N"), alt.Tooltip("norm:Q", format=".3f"),
                 alt.Tooltip("cluster size:Q")],
    )
    layers = [dots]
    if centroids is not None and len(centroids):
        layers.append(alt.Chart(centroids).mark_point(shape="diamond", size=260, filled=True, stroke="black",
                                                      strokeWidth=1.5, opacity=1).encode(
            x="x:Q", y="y:Q", color=color,
            tooltip=[alt.Tooltip("cluster:N", title="centroid of cluster"), alt.Tooltip("members:Q")]))
    return alt.layer(*layers).properties(title=title, height=height).interactive()


def biggest_changes(comparison, n: int = 8) -> pd.DataFrame:
    """The ``n`` confusion-matrix cells whose count changed most (by absolute change), as a table:
    true, predicted, baseline, pruned, change; diagonal cells are the per-class correct counts."""
    df = confusion_frame(comparison)
    df = df[df["delta"] != 0].assign(mag=lambda d: d["delta"].abs()).sort_values(["mag", "true"], ascending=[False, True])
    return df.drop(columns="mag").head(n).rename(columns={"delta": "change"}).reset_index(drop=True)


def cluster_size_chart(sizes: np.ndarray, height: int = 200) -> alt.Chart:
    """Bars of the number of filters in each cluster (``sizes`` (k,)), largest first, coloured like
    the 2D map."""
    sizes = np.asarray(sizes)
    df = pd.DataFrame({"cluster": np.arange(len(sizes)), "filters": sizes})
    scheme = "tableau10" if len(sizes) <= 10 else "tableau20"
    return alt.Chart(df, height=height).mark_bar().encode(
        x=alt.X("cluster:N", sort="-y", title="cluster", axis=alt.Axis(labels=len(sizes) <= 32, labelAngle=0)),
        # whole filters only: Vega-Lite's default ticks for small counts are 0.0, 0.5, 1.0, ...
        y=alt.Y("filters:Q", title="filters", axis=alt.Axis(tickMinStep=1, format="d")),
        color=alt.Color("cluster:N", scale=alt.Scale(scheme=scheme), legend=None),
        tooltip=["cluster:N", "filters:Q"],
    ).properties(title="Cluster sizes")


def rgb_filter(weight: np.ndarray, scale: int = 16) -> np.ndarray:
    """A stem filter (3, kh, kw) over the RGB input as a colour image: weights min-max scaled to
    0..255 per filter (the usual first-layer visualisation), enlarged ``scale`` times. uint8 (H, W, 3)."""
    w = np.asarray(weight, dtype=np.float32)
    lo, hi = float(w.min()), float(w.max())
    img = ((w - lo) / max(hi - lo, 1e-12) * 255).round().astype(np.uint8).transpose(1, 2, 0)
    return np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)


def filter_mosaic(weight: np.ndarray, scale: int = 6, vmax: float | None = None) -> np.ndarray:
    """A small RGB image of one filter (Cin, kh, kw): its Cin kernels tiled in a near-square grid with
    1-pixel gaps, a diverging colour map (blue negative, white 0, red positive) scaled by ``vmax``
    (default: the filter's largest absolute weight), and each pixel enlarged ``scale`` times.
    Returns uint8 (H, W, 3)."""
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim == 2:
        w = w[None]
    cin, kh, kw = w.shape
    cols = int(np.ceil(np.sqrt(cin)))
    rows = int(np.ceil(cin / cols))
    grid = np.full((rows * (kh + 1) - 1, cols * (kw + 1) - 1), np.nan, np.float32)
    for c in range(cin):
        r, q = divmod(c, cols)
        grid[r * (kh + 1): r * (kh + 1) + kh, q * (kw + 1): q * (kw + 1) + kw] = w[c]
    vmax = float(vmax if vmax is not None else np.nanmax(np.abs(w))) or 1.0
    t = np.clip(np.nan_to_num(grid, nan=0.0) / vmax, -1, 1)
    pos, neg = np.clip(t, 0, 1), np.clip(-t, 0, 1)
    red = np.array([214, 39, 40], np.float32)
    blue = np.array([31, 119, 180], np.float32)
    white = np.array([255, 255, 255], np.float32)
    img = white + pos[..., None] * (red - white) + neg[..., None] * (blue - white)
    img[np.isnan(grid)] = (235, 235, 235)
    img = img.round().astype(np.uint8)
    return np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
