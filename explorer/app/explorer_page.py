"""The Explorer page: per-layer k sliders and clustering options (sidebar), and what they give on
the full test split (headline metrics, per-class accuracy, confusion matrices, the layer's filters
in 2D, downloads). It only draws: the numbers come from :meth:`explorer.pipeline.Explorer.run`
(and ``preview``), the 2D view from :func:`explorer.projection.layer_map` / ``submit_embed``,
the charts from :mod:`.charts`, the widget state from :mod:`.state`.

Sharing: the model, data and baseline evaluation are loaded once per process (``st.cache_resource``,
keyed by the weights' content) and never mutated. A slider change re-runs only the ``explore``
fragment; a layer or projection change only its own fragment.

What a slider move costs the page beyond the engine (docs/app.md, "How fast the page answers"):
the headline is computed and drawn first (the labelled preview as soon as it exists); then only the
section picked in the ``tab`` switch is built (a segmented control, not ``st.tabs``, which builds
every hidden tab on every run); its charts' Vega-Lite specs are cached by content (:func:`chart`),
so an unchanged chart (the baseline's confusion matrix, a configuration seen before) costs a
dictionary look-up; and the seed spread runs only on request, once the page is idle (:mod:`.spread`).
"""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import streamlit as st
import torch

from .. import checkpoints as ckpt
from .. import data as data_mod
from .. import limits, projection
from ..clustering import (GRANULARITIES, MAX_N_INIT, MAX_RECALIBRATION_IMAGES, MAX_SEED, MAX_SEEDS, METRICS,
                          RECOVERIES, SPACES, ClusteringConfig, ClusteringError)
from ..lru import LRUCache
from ..model import CONV_LAYERS, conv_layer
from ..pipeline import Explorer
from . import charts, sidebar, spread, state
from . import finetuning
from . import support as sup

STAGES = (("Stem", 0), ("Stage 1 · 16 filters", 1), ("Stage 2 · 32 filters", 2), ("Stage 3 · 64 filters", 3))
METRIC_HELP = {"euclidean": "k-means on the raw filters",
               "cosine": "k-means on unit-length filters; each filter keeps its own norm"}
SPACE_LABELS = {"weight": "weights", "data": "data-aware (output error)"}
SPACE_HELP = {"weight": "distances between the filters' weights",
              "data": "distances in the layer's output error on 512 training images (Sigma-weighted)"}
TAB_LABELS = {"per_class": "Per-class accuracy", "confusion": "Confusion matrices", "filters": "Filters in 2D",
              "downloads": "Downloads", "finetune": "Fine-tune"}
RECOVERY_LABELS = {"none": "none", "bn": "BN re-estimation", "lsq": "least squares"}
RECOVERY_HELP = {"none": "centroids as they are",
                 "bn": "re-estimate BatchNorm statistics on training images",
                 "lsq": "re-fit every layer from the first clustered one, in closed form, to the original "
                        "net's outputs on training images (includes the BN shift)"}


# ---------------------------------------------------------------- process-wide resources

@st.cache_resource(show_spinner="Loading CIFAR-10 (the first start decodes the image files, later starts take seconds)...")
def load_data(root: str | None):
    return data_mod.load_cifar10(root)


@st.cache_resource(show_spinner="Loading the checkpoint and evaluating it on the 10,000 test images...", max_entries=4)
def load_explorer(digest: str, data_root: str | None, _weights: bytes, _name: str) -> Explorer:
    """One Explorer per weights content (``digest``), shared by all sessions and never mutated."""
    exp = Explorer(sup.model_from_bytes(_weights, f"{_name}.pt"), load_data(data_root), _name)
    exp.warm()
    return exp


@st.cache_resource(show_spinner="Evaluating the uploaded checkpoint on the 10,000 test images...",
                   max_entries=sup.MAX_UPLOAD_EXPLORERS)
def load_upload_explorer(digest: str, data_root: str | None, _weights: bytes, _name: str) -> Explorer:
    """An uploaded checkpoint's Explorer, keyed by its content (so only a session holding the same bytes
    reaches it); kept apart from the shipped checkpoints' and bounded in number and activation cache."""
    # Not warmed (Explorer.warm): the reference cache holds two checkpoints', and an upload would
    # evict a shipped checkpoint's that every session uses.
    return Explorer(sup.model_from_bytes(_weights, f"{_name}.pt"), load_data(data_root), _name,
                    activation_cache_mb=sup.UPLOAD_ACTIVATION_CACHE_MB)


def layer_label(name: str) -> str:
    l = conv_layer(name)
    return f"{name} · {l.filters}×{l.filter_shape[0]}×3×3"


def slider_label(name: str, limit: int) -> str:
    """A k slider's label: the layer and its filter shape, and the largest k it can be clustered to
    when that is below its filter count (:func:`explorer.limits.layer_limits`)."""
    # non-breaking spaces: a label that wraps keeps "k ≤ 9" together
    return layer_label(name) + (f" · k\u00a0≤\u00a0{limit}" if limit < conv_layer(name).filters else "")


def slider_help(name: str, limit: int) -> str:
    l = conv_layer(name)
    text = f"k for {name}: {l.filters} filters of shape {l.filter_shape} ({l.filters} = unchanged)"
    if limit < l.filters:
        text += (f". This checkpoint holds only {limit} distinct filters there (an already clustered, fine-tuned "
                 f"layer): k can be 1..{limit} (k = {limit} is the net as it is) or {l.filters}; a k between them "
                 f"cannot be clustered")
    return text


# ---------------------------------------------------------------- charts, cached by content

_SPECS = LRUCache(256)  # process-wide: Vega-Lite specs (a few kB each) by what they draw


def _vega_spec(chart) -> dict:
    """What ``st.altair_chart`` sends for ``chart`` (Streamlit's own conversion where it has one)."""
    try:
        from streamlit.elements.vega_charts import _convert_altair_to_vega_lite_spec
    except ImportError:  # another Streamlit: Altair's own dict (theme defaults included)
        return chart.to_dict()
    return _convert_altair_to_vega_lite_spec(chart)


def chart(key: tuple, build, **kw) -> None:
    """Draw the Altair chart ``build()`` under ``key`` (everything it depends on, e.g. the numbers it
    shows): built and converted once per key and process, then drawn from the cached spec. Building
    and converting a confusion heatmap costs about 0.1 s on this machine; a cached one nothing."""
    spec = _SPECS.get(key)
    if spec is None:
        spec = _vega_spec(build())
        _SPECS.put(key, spec)
    st.vega_lite_chart(spec=copy.copy(spec), **kw)  # Streamlit reassigns top-level keys of the spec it is given


def _numbers(*arrays) -> tuple:
    """A hashable key for charts of these arrays (their bytes, shapes and dtypes)."""
    return tuple((a.tobytes(), a.shape, str(a.dtype)) for a in map(np.asarray, arrays))


# ---------------------------------------------------------------- results

def headline(result, exp: Explorer) -> None:
    ev, cmp, comp = result.evaluation, result.comparison, result.compression
    n = int(ev.confusion.sum())
    c = st.columns(5)
    c[0].metric("Pruned top-1", charts.pct(ev.top1), charts.pp(cmp.top1_delta),
                help="Top-1 accuracy of the clustered model on the full test split; delta vs the baseline")
    c[1].metric("Baseline top-1", charts.pct(cmp.baseline.top1), help="The checkpoint as trained")
    c[2].metric("Unique parameters", charts.count(comp.params),
                f"{100 * (comp.params / comp.baseline_params - 1):+.1f}%" if comp.params != comp.baseline_params else None,
                delta_color="inverse", help=f"Baseline {comp.baseline_params:,}. Parameters of the structurally "
                                            "compressed net (k distinct filters per layer + per-channel affines)")
    c[3].metric("MACs / image", charts.count(comp.macs),
                f"{-100 * comp.mac_reduction:+.1f}%" if comp.macs != comp.baseline_macs else None,
                delta_color="inverse", help=f"Multiply-accumulates per 32×32 image; baseline {comp.baseline_macs:,}")
    c[4].metric("Compression ratio", f"{comp.compression_ratio:.2f}×", help="baseline parameters / unique parameters")
    correct = int(np.trace(ev.confusion))
    base_correct = int(np.trace(cmp.baseline.confusion))
    st.caption(f"{correct:,} of {n:,} test images correct (baseline {base_correct:,}) · "
               f"{len(result.config.active)} of {len(CONV_LAYERS)} conv layers clustered"
               + (f" + residual stream of stage {', '.join(map(str, result.config.active_stream))}"
                  if result.config.active_stream else "") + " · "
               f"{exp.data.identity.name}")


def recovery_caption(result) -> str:
    """Which clustering space and recovery produced the numbers on screen."""
    cfg, cl = result.config, result.clustering
    rec = {"none": "no recovery", "bn": f"recovery: BN re-estimation on {cfg.recalibrate_bn:,} training images",
           "lsq": f"recovery: least squares on {cfg.recalibrate_bn:,} training images"}[cfg.recovery]
    text = f"Clustering space: {SPACE_LABELS[cfg.space]} · {rec}"
    if cfg.seeds > 1 and cl.chosen_seed is not None:
        text += (f" · best of {cfg.seeds} k-means seeds on held-out training images: seed {cl.chosen_seed} "
                 f"({charts.pct(cl.holdout_top1[cl.chosen_seed])} there)")
    return text


def seed_spread_section(exp: Explorer, config: ClusteringConfig) -> None:
    """Top-1 over k-means seeds 0..4 for this configuration, on request: computed in the background
    (its own fragment, polling every 2 s until it is there). Not started by itself: on 2 cores a
    spread running behind the next slider move slowed that move by about a second (browser
    benchmark, docs/app.md)."""
    fut = spread.existing(exp, config)
    if fut is None:
        if st.button(f"Measure the seed spread ({spread.DEFAULT_SEEDS} k-means seeds)", key="spread.go",
                     help="Top-1 of this configuration for k-means seeds 0..4 on the full test split, computed in "
                          "the background while you look (a measurement: nothing is chosen by it)"):
            fut = spread.request(exp, config)
        else:
            return
    if not fut.done():
        st.caption(f"Seed spread over {spread.DEFAULT_SEEDS} k-means seeds: computing in the background...")
        st.fragment(umap_poller, run_every=2)(fut)
        return
    if fut.exception() is not None:
        st.caption(f"Seed spread unavailable: {str(fut.exception())[:200]}")
        return
    r = fut.result()
    st.caption(f"Seed spread, {len(r['seeds'])} k-means seeds (full test split, a measurement, nothing chosen by it): "
               f"min {charts.pct(r['min'])} · median {charts.pct(r['median'])} · max {charts.pct(r['max'])} "
               f"({(r['max'] - r['min']) * 100:.1f} points apart)")


def per_class_section(result) -> None:
    cmp = result.comparison
    key = _numbers(cmp.baseline.confusion, cmp.pruned.confusion) + (tuple(cmp.baseline.classes),)
    left, right = st.columns([3, 2])
    with left:
        chart(("per_class",) + key, lambda: charts.per_class_chart(cmp), width="stretch", height=320)
    with right:
        chart(("per_class_delta",) + key, lambda: charts.per_class_delta_chart(cmp), width="stretch", height=320)
    st.dataframe(charts.per_class_display(cmp), hide_index=True, width="stretch",
                 column_config={"baseline %": st.column_config.NumberColumn(format="%.1f%%"),
                                "pruned %": st.column_config.NumberColumn(format="%.1f%%"),
                                "Δ pp": st.column_config.NumberColumn(format="%+.1f")})


def confusion_section(result) -> None:
    cmp = result.comparison
    classes = list(cmp.baseline.classes)

    def heatmap(matrix, title, kind="counts"):
        chart(("confusion", kind, title, tuple(classes)) + _numbers(matrix),
              lambda: charts.confusion_chart(matrix, classes, title, kind), width="content")

    left, right = st.columns(2)
    with left:
        heatmap(cmp.baseline.confusion, "Baseline")
    with right:
        heatmap(cmp.pruned.confusion, "Pruned")
    left, right = st.columns(2)
    with left:
        heatmap(cmp.confusion_delta, "Difference (pruned - baseline)", "delta")
    with right:
        st.markdown("**Largest changes**")
        changes = charts.biggest_changes(cmp)
        if len(changes):
            st.dataframe(changes, hide_index=True, width="stretch")
        else:
            st.caption("No cell changed.")
        st.caption("Rows: true class; columns: predicted class. In the difference, blue cells got better "
                   "(more correct on the diagonal, fewer confusions off it), red cells got worse. "
                   "Hover a cell for its counts.")


def downloads_section(result, exp: Explorer, name: str) -> None:
    cfg = result.config
    stem = f"{name}_clustered"
    c = st.columns(4)
    c[0].download_button("Configuration (JSON)", sup.config_json(cfg), f"{stem}.config.json", "application/json",
                         on_click="ignore", width="stretch", help="Reusable with `python -m explorer.prune --config FILE`")
    c[1].download_button("Compressed model (.zip)",
                         lambda: sup.compressed_zip(result, name, exp.data.identity.to_dict()),
                         f"{stem}.zip", "application/zip", on_click="ignore", width="stretch",
                         help="The structurally smaller net (.pt state dict + .json specs) and the configuration")
    c[2].download_button("Per-class accuracy (CSV)", charts.per_class_csv(result.comparison), f"{stem}.per_class.csv",
                         "text/csv", on_click="ignore", width="stretch")
    c[3].download_button("Confusion matrices (CSV)", charts.confusion_csv(result.comparison), f"{stem}.confusion.csv",
                         "text/csv", on_click="ignore", width="stretch")


def umap_poller(fut) -> None:
    """Run as a fragment every 2 s while a background UMAP is computed; re-runs the page when done."""
    if fut.done():
        st.rerun()


@st.fragment
def projection_section(exp: Explorer, config: ClusteringConfig) -> None:
    """Filters of one layer in 2D with their k centroids. Its own fragment: choosing another layer or
    method re-runs only this part. The map is fitted once per layer (see explorer.projection)."""
    c1, c2 = st.columns([3, 2])
    layer = c1.selectbox("Layer", [l.name for l in CONV_LAYERS], key="layer", format_func=layer_label)
    c2.segmented_control("Projection", list(projection.METHODS), key="proj", required=True,
                         format_func=lambda m: {"umap": "UMAP", "pca": "PCA (fast)"}[m])
    method = st.session_state.get("proj") or state.DEFAULT_PROJECTION
    state.sync_url()
    try:
        lmap = projection.layer_map(exp.model, limits.check(exp.model, config, [layer]), layer, exp.data.train_images)
    except ClusteringError as e:
        st.error(f"This configuration cannot be applied: {e}")
        return
    proj, note = None, ""
    if method == "umap":
        fut = projection.submit_embed(lmap.space, lmap.centroids, "umap", seed=0)
        if fut.done() and fut.exception() is None:
            proj = fut.result()
        elif fut.done():
            note = f"UMAP failed ({str(fut.exception())[:200]}); showing PCA."
        else:
            note = ("Computing UMAP in the background (the first UMAP in a server process compiles umap-learn's "
                    "numba code, about a minute); showing PCA until it is ready.")
            st.fragment(umap_poller, run_every=2)(fut)
    if proj is None:
        proj = projection.embed(lmap.space, lmap.centroids, "pca", seed=0)
    if note:
        st.info(note, icon=":material/hourglass_top:")
    if proj.note:
        st.caption(proj.note)
    p_df, c_df = charts.projection_frame(proj, lmap)
    detail = (f"n_neighbors={proj.params['n_neighbors']}" if proj.method == "umap"
              else f"explained variance {100 * sum(proj.params.get('explained_variance', [])):.0f}%")
    title = (f"{layer}: {len(lmap.points)} {lmap.what}, " + (f"k = {lmap.k} clusters" if lmap.k else "not clustered") +
             f" ({proj.method.upper()}, {detail})")
    left, right = st.columns([3, 1])
    with left:
        st.altair_chart(charts.projection_chart(p_df, c_df, title), width="stretch", height=440)
    with right:
        thumbnails(lmap)
    fold = config.fold_bn and config.granularity == "filter"
    st.caption(f"Each dot is one of {layer}'s {lmap.what} (in the space k-means used: "
               f"{'unit-length, cosine metric' if config.metric == 'cosine' else 'raw weights'}"
               f"{', BN folded, bias as an extra coordinate' if fold else ''}); diamonds are the centroids, placed "
               "with the map fitted on the filters, so moving k never moves the filters.")


def thumbnails(lmap: projection.LayerMap, n_max: int = 9) -> None:
    """Cluster sizes, and small pictures of the largest clusters' centroids (or the first filters) where
    they are readable: the RGB stem filters and the 16-input-channel layers."""
    if lmap.labels is not None:
        st.altair_chart(charts.cluster_size_chart(lmap.cluster_sizes()), width="stretch", height=220)
    if lmap.granularity != "filter" or lmap.in_channels > 16:
        return
    order, w, sizes = lmap.thumbnails(n_max)
    if sizes is not None:
        caps = [f"c{i} · {n} filters" for i, n in zip(order, sizes)]
        st.markdown("**Largest clusters' centroids**")
    else:
        caps = [f"filter {i}" for i in order]
        st.markdown("**First filters**")
    if lmap.in_channels == 3:
        imgs = [charts.rgb_filter(x, scale=16) for x in w]
        note = "RGB filters of the stem, each scaled to its own range"
    else:
        vmax = float(np.abs(w).max()) or 1.0
        imgs = [charts.filter_mosaic(x, scale=5, vmax=vmax) for x in w]
        note = "Each tile: one filter's 16 input-channel kernels (red +, blue -, common scale)"
    st.image(imgs, caption=caps, width=64)
    st.caption(note)


def controls(limit_of: dict[str, int] | None = None) -> None:
    """The clustering options, uniform k and one k slider per layer, in the sidebar. ``limit_of``:
    each layer's largest k that can be clustered (:func:`explorer.limits.layer_limits`), which its
    slider names."""
    with st.sidebar:
        st.subheader("Clustering")
        with st.expander("Options"):
            st.selectbox("Metric", METRICS, key=state.opt_key("metric"),
                         help="; ".join(f"{k}: {v}" for k, v in METRIC_HELP.items()))
            st.selectbox("Granularity", GRANULARITIES, key=state.opt_key("granularity"),
                         help="filter: one point per output filter (structural savings); kernel: one per 2D kernel")
            st.checkbox("Fold BatchNorm into filters", key=state.opt_key("fold_bn"),
                        help="Cluster BN-folded filters; lets both convs of a block shrink")
            st.selectbox("Clustering space", SPACES, key=state.opt_key("space"), format_func=SPACE_LABELS.__getitem__,
                         help="; ".join(f"{SPACE_LABELS[k]}: {v}" for k, v in SPACE_HELP.items()))
            st.selectbox("Recovery (no training)", RECOVERIES, key=state.opt_key("recovery"),
                         format_func=RECOVERY_LABELS.__getitem__, on_change=state.recovery_changed,
                         help="; ".join(f"{RECOVERY_LABELS[k]}: {v}" for k, v in RECOVERY_HELP.items()))
            st.number_input("Recovery images (training split)", 0, MAX_RECALIBRATION_IMAGES, step=256,
                            key=state.opt_key("recalibrate_bn"),
                            help="Training images the recovery fits on (0 = its default: BN 2,000, least squares 512)")
            st.number_input("k-means seed", 0, MAX_SEED, key=state.opt_key("seed"))
            st.number_input("k-means restarts", 1, MAX_N_INIT, key=state.opt_key("n_init"))
            st.number_input("Best of k-means seeds", 1, MAX_SEEDS, key=state.opt_key("seeds"),
                            help="Try seeds seed..seed+S-1 and keep the net with the best top-1 on 2,000 held-out "
                                 "training images (never the test split)")
        a, b, c = st.columns([5, 4, 4], vertical_alignment="bottom")
        a.number_input("Uniform k", 1, 64, key="uniform_k", help="Sets every layer to min(k, its filters)")
        b.button("Apply", on_click=state.apply_uniform, width="stretch")
        c.button("Reset", on_click=state.reset_all, width="stretch", help="Every layer unclustered, default options")
        for title, stage in STAGES:
            with st.expander(title, expanded=True):
                for l in (l for l in CONV_LAYERS if l.stage == stage):
                    limit = (limit_of or {}).get(l.name, l.filters)
                    st.slider(slider_label(l.name, limit), 1, l.filters, key=state.k_key(l.name),
                              help=slider_help(l.name, limit))


def tab_switch() -> str:
    """The section switch under the headline (URL ``tab``): only the section it names is built."""
    st.segmented_control("Section", list(state.TABS), key="tab", required=True, format_func=TAB_LABELS.__getitem__,
                         label_visibility="collapsed")
    return st.session_state.get("tab") or state.DEFAULT_TAB


def results(exp: Explorer, config: ClusteringConfig):
    """The headline of ``config`` (a labelled preview first when it is not cached) and the seed
    spread; returns its :class:`~explorer.pipeline.PruneResult`, or None (with an st.error) when the
    configuration cannot be applied."""
    preview = st.empty()
    try:
        limits.check(exp.model, config)
        if config.clustered and exp.cached(config) is None:
            # A quick, labelled answer first (2,000 test images), replaced by the full result.
            ev = exp.preview(config)
            preview.info(sup.preview_text(exp, ev), icon=":material/hourglass_top:")
        streams = f" and {len(config.active_stream)} residual streams" if config.active_stream else ""
        with st.spinner(f"Clustering {len(config.active)} layers{streams} and evaluating on the full test split...",
                        show_time=True):
            result = exp.run(config)
    except ClusteringError as e:
        preview.empty()
        st.error(f"This configuration cannot be applied: {e}")
        return None
    preview.empty()
    headline(result, exp)
    st.caption(recovery_caption(result))
    if config.clustered:
        st.fragment(seed_spread_section)(exp, config)
    else:
        spread.cancel(exp)
    return result


def tab_section(tab: str, result, exp: Explorer, name: str, config: ClusteringConfig) -> None:
    """The one section shown. The 2D view and Fine-tune say themselves why a configuration that
    cannot be applied has nothing to show (``result`` None); the others are then left out."""
    if tab == "filters":
        projection_section(exp, config)
    elif tab == "finetune":
        finetuning.section(exp.model, config)
    elif result is None:
        return
    elif tab == "per_class":
        per_class_section(result)
    elif tab == "confusion":
        confusion_section(result)
    elif tab == "downloads":
        downloads_section(result, exp, name)
        finetuning.export_downloads(name)
        with st.expander("Configuration JSON"):
            st.code(sup.config_json(config).decode(), language="json")


@st.fragment
def explore(exp: Explorer, name: str) -> None:
    """Clustering controls (sidebar) and everything that depends on them (main area). A slider
    change re-runs only this fragment: the headline first, then the one section picked."""
    with spread.page_run():
        controls(limits.layer_limits(exp.model, state.current_config()))
        sidebar.stream_sliders(limits.stream_limits(exp.model))
        config = state.current_config()
        state.sync_url()
        result = results(exp, config)
        tab = tab_switch()
        tab_section(tab, result, exp, name, config)


# ---------------------------------------------------------------- opening a checkpoint

def open_upload(upload: sup.UploadedCheckpoint, data_root: str | None) -> Explorer | None:
    """The Explorer of this session's uploaded checkpoint and its caption (an st.error and None if it fails)."""
    try:
        exp = load_upload_explorer(upload.digest, data_root, upload.weights, upload.name)
    except data_mod.DataNotFoundError as e:
        st.error(sup.data_error_message(e))
        return None
    except ckpt.CheckpointError as e:
        st.error(str(e))
        return None
    st.caption(f"**{upload.filename}** · uploaded in this session (kept in its memory only, not saved on the "
               f"server) · evaluated here on {exp.data.identity.name} ({len(exp.data.test_labels):,} test images)")
    return exp


def finetuned_from(meta: dict) -> str:
    """" (fine-tuned from **base**, 89.1% top-1)" for a fine-tuning result's metadata, else "": the
    headline's baseline is this checkpoint itself, so the net it was reduced from is named here."""
    base = (meta.get("finetune") or {}).get("base_checkpoint")
    top1 = (meta.get("baseline") or {}).get("top1")
    if not base:
        return ""
    return f" (fine-tuned from **{base}**" + (f", {charts.pct(top1)} top-1)" if isinstance(top1, (int, float)) else ")")


def open_shipped(info: ckpt.CheckpointInfo, data_root: str | None) -> Explorer | None:
    """The Explorer of a checkpoint in the checkpoint directory and its caption or "in training" banner
    (an st.error and None if it fails)."""
    ss = st.session_state
    try:
        weights, digest = sup.read_weights(info.path)
        pin = ss.get(f"pinned.{info.name}")
        if info.complete or pin is None:
            exp = load_explorer(digest, data_root, weights, info.name)
            if not info.complete:  # rewritten every epoch: this session stays on these weights until asked
                ss[f"pinned.{info.name}"] = pin = {"digest": digest, "epoch": info.meta.get("epochs_done"), "explorer": exp}
        else:
            exp = pin["explorer"]
    except data_mod.DataNotFoundError as e:
        st.error(sup.data_error_message(e))
        return None
    except ckpt.CheckpointError as e:
        st.error(f"{info.name}: {e}")
        return None

    meta = info.meta
    ds = meta.get("dataset", {}).get("name", "?")
    if info.complete:
        st.caption(f"**{info.name}** · trained {meta.get('epochs_done', meta.get('epochs', '?'))} epochs on {ds}"
                   f"{finetuned_from(meta)} · evaluated here on {exp.data.identity.name} "
                   f"({len(exp.data.test_labels):,} test images)")
    else:
        epoch = pin["epoch"]
        status = "in training" if info.training else "incomplete (trainer not running)"
        with st.container(border=True):
            a, b = st.columns([5, 1], vertical_alignment="center")
            a.warning(f"**{info.name} is {status}**: you are exploring its weights after epoch {epoch} of "
                      f"{meta.get('epochs', '?')}; accuracies are not final.", icon=":material/model_training:")
            if digest != pin["digest"]:
                if b.button("Load latest weights", type="primary", help="The trainer has saved newer weights"):
                    del ss[f"pinned.{info.name}"]
                    st.rerun()
            else:
                b.caption("latest weights")
    return exp


def render(ctx: sidebar.Context) -> None:
    """The Explorer page for the checkpoint picked in the shared sidebar."""
    data_root = data_mod.resolve_root()
    data_root = str(data_root) if data_root else None
    selected = ctx.selected
    if ctx.upload is not None and selected == ctx.upload.key:
        exp, name = open_upload(ctx.upload, data_root), ctx.upload.name
    else:
        exp, name = open_shipped(ctx.by_name[selected], data_root), selected
    if exp is None:
        return
    tied_offer(exp)
    explore(exp, name)
    with st.sidebar:
        st.divider()
        sidebar.training_form(ctx.ckpt_dir)
        st.caption(f"torch threads: {torch.get_num_threads()} · share this view by copying the URL")


def tied_offer(exp: Explorer) -> None:
    """For a checkpoint whose weights hold duplicate filters (a clustered, fine-tuned net), a
    button that sets every slider to its layer's distinct count (:func:`explorer.limits.tied_config`):
    unclustered, its headline counts the full-width form it is stored in, 269.7 k parameters."""
    tied = limits.tied_config(exp.model)
    if tied is None:
        return
    current = state.current_config()
    # the k-means seed cannot matter there: the duplicates are the clusters
    if dataclasses.replace(current, seed=tied.seed, n_init=tied.n_init).key() == tied.key():
        st.caption("The sliders are at this checkpoint's own ties: the headline is the compressed net its weights hold.")
        return
    streams = f" and {len(tied.active_stream)} residual streams" if tied.active_stream else ""
    a, b = st.columns([3, 2], vertical_alignment="center")
    a.caption(f"This checkpoint holds duplicate filters in {len(tied.active)} layers{streams} (a clustered, "
              "fine-tuned net); unclustered, the headline counts the full-width form it is stored in.")
    b.button("Cluster it as it was fine-tuned", on_click=state.apply_tied, args=(tied,), key="tied_apply",
             help="Every slider to its layer's distinct filters (and stream k to its stream's distinct channels), "
                  "BN folded where the duplicates survive it, weight space, no recovery: k-means finds the "
                  "duplicates themselves, so the headline shows the checkpoint's own top-1 with its real MACs "
                  "and unique parameters.")
