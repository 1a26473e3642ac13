"""ResNet20 filter-clustering explorer: ``streamlit run streamlit_app.py``.

This script only wires widgets to :mod:`explorer` calls; the maths lives in ``explorer/`` (clustering,
evaluation, compression, projection), the charts in ``explorer/ui/charts.py`` and the URL/view state,
downloads and training launcher in ``explorer/app_support.py``.

State: the whole view (checkpoint, clustering options, every layer's k, selected layer, projection)
lives in ``st.query_params`` so a copied URL reproduces it; widgets are initialised from the URL once
per session and the URL is rewritten from the widgets after every run. Sharing: the model, data and
baseline evaluation are loaded once per process (``st.cache_resource``) and never mutated; each
configuration's results are cached by :class:`explorer.pipeline.Explorer`. Slider changes re-run only
the ``explore`` fragment (controls + results); a layer/projection change re-runs only its fragment.
Uploads: a ``.pt`` uploaded in the sidebar is validated (``sup.check_upload``) and kept in that
session's state only; it is never written to disk and never offered to other sessions.
Analysis: ``?page=analysis`` (the switch under the title) shows the analysis results of the selected
checkpoint instead (``explorer/ui/analysis_page.py``; it reads result files only).
"""
from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import streamlit as st
import torch

from explorer import app_support as sup
from explorer import checkpoints as ckpt
from explorer import projection
from explorer.clustering import (GRANULARITIES, MAX_RECALIBRATION_IMAGES, METRICS, ClusteringConfig,
                                 ClusteringError, cluster_model, layer_points)
from explorer.data import DataNotFoundError, load_cifar10, resolve_root
from explorer.model import CONV_LAYERS, conv_layer
from explorer.pipeline import Explorer
from explorer.ui import analysis_page, charts

st.set_page_config(page_title="ResNet20 filter clustering explorer", page_icon=":material/scatter_plot:",
                   layout="wide", initial_sidebar_state="expanded")

ss = st.session_state
STAGES = (("Stem", 0), ("Stage 1 · 16 filters", 1), ("Stage 2 · 32 filters", 2), ("Stage 3 · 64 filters", 3))
OPTION_DEFAULTS = {name: getattr(ClusteringConfig(), name) for name in sup.CONFIG_KEYS}
METRIC_HELP = {"euclidean": "k-means on the raw filters",
               "cosine": "k-means on unit-length filters; each filter keeps its own norm"}


# ---------------------------------------------------------------- process-wide resources

@st.cache_resource(show_spinner=False)
def init_process() -> int:
    """Once per server process: the torch thread count (``EXPLORER_THREADS``, else torch's default)."""
    n = os.environ.get("EXPLORER_THREADS", "").strip()
    if n.isdigit() and int(n) > 0:
        torch.set_num_threads(int(n))
    return torch.get_num_threads()


@st.cache_resource(show_spinner="Loading CIFAR-10 (the first start decodes the image files, later starts take seconds)...")
def load_data(root: str | None):
    return load_cifar10(root)


@st.cache_resource(show_spinner="Loading the checkpoint and evaluating it on the 10,000 test images...", max_entries=4)
def load_explorer(digest: str, data_root: str | None, _weights: bytes, _name: str) -> Explorer:
    """One Explorer per weights content (``digest``), shared by all sessions and never mutated."""
    return Explorer(sup.model_from_bytes(_weights, f"{_name}.pt"), load_data(data_root), _name)


@st.cache_resource(show_spinner="Evaluating the uploaded checkpoint on the 10,000 test images...",
                   max_entries=sup.MAX_UPLOAD_EXPLORERS)
def load_upload_explorer(digest: str, data_root: str | None, _weights: bytes, _name: str) -> Explorer:
    """An uploaded checkpoint's Explorer, keyed by its content (so only a session holding the same bytes
    reaches it); kept apart from the shipped checkpoints' and bounded in number and activation cache."""
    return Explorer(sup.model_from_bytes(_weights, f"{_name}.pt"), load_data(data_root), _name,
                    activation_cache_mb=sup.UPLOAD_ACTIVATION_CACHE_MB)


# ---------------------------------------------------------------- view state <-> widgets

def query_dict() -> dict[str, list[str]]:
    return {k: st.query_params.get_all(k) for k in st.query_params.keys()}


def put_view(view: sup.ViewState, only_missing: bool) -> None:
    """Write a view into the widgets' session-state keys (all, or only those not yet set)."""
    def put(key, value):
        if not only_missing or key not in ss:
            ss[key] = value

    if view.ckpt is not None:
        put("ckpt", view.ckpt)
    c = view.config
    for name in OPTION_DEFAULTS:
        put(f"opt.{name}", getattr(c, name))
    for layer in CONV_LAYERS:
        put(f"k.{layer.name}", int(c.ks.get(layer.name, layer.filters)))
    put("layer", view.layer)
    put("proj", view.proj)
    put("uniform_k", 8)


def current_config() -> ClusteringConfig:
    ks = {l.name: int(ss[f"k.{l.name}"]) for l in CONV_LAYERS if int(ss[f"k.{l.name}"]) < l.filters}
    return ClusteringConfig(ks=ks, **{name: type(OPTION_DEFAULTS[name])(ss[f"opt.{name}"]) for name in OPTION_DEFAULTS})


def sync_url() -> None:
    """Rewrite the URL from the widgets (only when it changed)."""
    view = sup.ViewState(ss.get("ckpt"), current_config(), ss.get("layer", sup.DEFAULT_LAYER),
                         ss.get("proj", sup.DEFAULT_PROJECTION))
    q = sup.view_query(view)
    if {k: [v] for k, v in q.items()} != query_dict():
        st.query_params.from_dict(q)


def apply_uniform() -> None:
    k = int(ss["uniform_k"])
    for layer in CONV_LAYERS:
        ss[f"k.{layer.name}"] = min(k, layer.filters)


def reset_all() -> None:
    for layer in CONV_LAYERS:
        ss[f"k.{layer.name}"] = layer.filters
    for name, v in OPTION_DEFAULTS.items():
        ss[f"opt.{name}"] = v


def layer_label(name: str) -> str:
    l = conv_layer(name)
    return f"{name} · {l.filters}×{l.filter_shape[0]}×3×3"


# ---------------------------------------------------------------- sidebar: checkpoints, training

def on_upload() -> None:
    """The uploader changed: validate the file (explorer.app_support.check_upload) and keep it in this
    session only, selected in the picker; an invalid file leaves the session's checkpoints as they were."""
    f = ss.get("upload")
    ss.pop("upload_error", None)
    previous = ss.pop("uploaded", None)
    if f is None:  # removed from the uploader
        if previous is not None and ss.get("ckpt") == previous.key:
            ss.pop("ckpt", None)
        return
    try:
        up = sup.check_upload(f.name, f.getvalue())
    except sup.UploadError as e:
        ss["upload_error"] = str(e)
        if previous is not None and ss.get("ckpt") == previous.key:
            ss.pop("ckpt", None)
        return
    ss["uploaded"] = up
    ss["ckpt"] = up.key


def training_enabled() -> bool:
    try:
        secrets = st.secrets.to_dict() if hasattr(st.secrets, "to_dict") else dict(st.secrets)
    except Exception:  # no secrets.toml
        secrets = {}
    return sup.training_enabled(secrets)


@st.fragment(run_every=5)
def training_progress(ckpt_dir: str, signature: tuple) -> None:
    """Live progress of running trainers; re-runs every 5 s. When a run starts or ends, the whole
    page re-runs so that the checkpoint picker shows it."""
    infos = ckpt.list_checkpoints(ckpt_dir)
    if checkpoint_signature(infos) != signature:
        st.rerun()
    shown = False
    for info in infos:
        s = info.status or {}
        if not info.training:
            continue
        shown = True
        epoch, epochs = float(s.get("epoch") or 0), int(s.get("epochs") or info.meta.get("epochs") or 1)
        eta = s.get("eta_seconds")
        age = time.time() - float(s.get("updated") or time.time())
        st.progress(min(1.0, epoch / max(1, epochs)), text=f"**{info.name}** training: epoch {epoch:.1f}/{epochs}")
        bits = []
        if s.get("test_top1") is not None:
            bits.append(f"latest test top-1 {charts.pct(s['test_top1'])} (bf16 monitor)")
        if eta:
            bits.append(f"ETA {int(eta) // 3600} h {int(eta) % 3600 // 60:02d} min")
        bits.append(f"updated {int(age)} s ago")
        st.caption(" · ".join(bits))
    rec = sup.last_launch()
    if rec is not None and rec.alive and not any(i.name == rec.name and i.training for i in infos):
        shown = True
        st.caption(f"Starting **{rec.name}** (pid {rec.pid}); it appears above once its first status is written.")
        log = sup.tail(rec.log, 3)
        if log:
            st.code(log, language=None)
    if not shown:
        st.caption("No training run in progress.")


def checkpoint_signature(infos) -> tuple:
    return tuple((i.name, i.complete, i.training, i.error is None) for i in infos)


def training_form(ckpt_dir: Path) -> None:
    with st.expander("Train a new checkpoint"):
        if not training_enabled():
            st.caption(f"Disabled on this server. Enable with `{sup.ENV_ALLOW_TRAINING}=1` or `allow_training = true` "
                       "under `[explorer]` in `.streamlit/secrets.toml`; or run `python -m explorer.train` yourself.")
            return
        with st.form("train_form"):
            epochs = st.number_input("Epochs", 1, sup.MAX_EPOCHS, 90, key="train.epochs")
            seed = st.number_input("Seed", 0, 2**31 - 1, 1, key="train.seed")
            name = st.text_input("Name", "resnet20_seed1", max_chars=64, key="train.name",
                                 help="Writes checkpoints/<name>.pt and .json; must not exist yet")
            go = st.form_submit_button("Start training", type="primary", key="train.submit")
        if go:
            try:
                rec = sup.launch_training(name.strip(), int(epochs), int(seed), ckpt_dir)
            except sup.LaunchError as e:
                st.error(str(e))
            else:
                st.success(f"Started `{name}` (pid {rec.pid}); log: `{rec.log}`")


# ---------------------------------------------------------------- main area: results

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
               f"{len(result.config.active)} of {len(CONV_LAYERS)} conv layers clustered · "
               f"{exp.data.identity.name}")


def per_class_section(result) -> None:
    cmp = result.comparison
    left, right = st.columns([3, 2])
    with left:
        st.altair_chart(charts.per_class_chart(cmp), width="stretch", height=320)
    with right:
        st.altair_chart(charts.per_class_delta_chart(cmp), width="stretch", height=320)
    st.dataframe(charts.per_class_display(cmp), hide_index=True, width="stretch",
                 column_config={"baseline %": st.column_config.NumberColumn(format="%.1f%%"),
                                "pruned %": st.column_config.NumberColumn(format="%.1f%%"),
                                "Δ pp": st.column_config.NumberColumn(format="%+.1f")})


def confusion_section(result) -> None:
    cmp = result.comparison
    classes = list(cmp.baseline.classes)
    left, right = st.columns(2)
    with left:
        st.altair_chart(charts.confusion_chart(cmp.baseline.confusion, classes, "Baseline"), width="content")
    with right:
        st.altair_chart(charts.confusion_chart(cmp.pruned.confusion, classes, "Pruned"), width="content")
    left, right = st.columns(2)
    with left:
        st.altair_chart(charts.confusion_chart(cmp.confusion_delta, classes, "Difference (pruned - baseline)", "delta"),
                        width="content")
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
    method = ss.get("proj") or sup.DEFAULT_PROJECTION
    sync_url()
    info = conv_layer(layer)
    modules = dict(exp.model.named_modules())
    fold = config.fold_bn and config.granularity == "filter"
    pts = layer_points(modules[layer].weight, modules[info.bn], config.granularity, fold)
    space = projection.clustering_space(pts, config.metric)
    k = config.active.get(layer)
    labels = centroids = None
    if k:
        lc = cluster_model(exp.model, replace(config, ks={layer: k}, recalibrate_bn=0)).layers[layer]
        labels, centroids = lc.labels, lc.centroids
    if config.granularity == "kernel":
        cin = info.filter_shape[0]
        names = [f"{i // cin} (in-channel {i % cin})" for i in range(len(pts))]
        what = "2D kernels"
    else:
        names = [str(i) for i in range(len(pts))]
        what = "filters"
    proj, note = None, ""
    if method == "umap":
        fut = projection.submit_embed(space, centroids, "umap", seed=0)
        if fut.done() and fut.exception() is None:
            proj = fut.result()
        elif fut.done():
            note = f"UMAP failed ({str(fut.exception())[:200]}); showing PCA."
        else:
            note = ("Computing UMAP in the background (the first UMAP in a server process compiles umap-learn's "
                    "numba code, about a minute); showing PCA until it is ready.")
            st.fragment(umap_poller, run_every=2)(fut)
    if proj is None:
        proj = projection.embed(space, centroids, "pca", seed=0)
    if note:
        st.info(note, icon=":material/hourglass_top:")
    if proj.note:
        st.caption(proj.note)
    p_df, c_df = charts.projection_frame(proj, labels, np.linalg.norm(pts, axis=1), names)
    detail = (f"n_neighbors={proj.params['n_neighbors']}" if proj.method == "umap"
              else f"explained variance {100 * sum(proj.params.get('explained_variance', [])):.0f}%")
    title = (f"{layer}: {len(pts)} {what}, " + (f"k = {k} clusters" if k else "not clustered") +
             f" ({proj.method.upper()}, {detail})")
    left, right = st.columns([3, 1])
    with left:
        st.altair_chart(charts.projection_chart(p_df, c_df, title), width="stretch", height=440)
    with right:
        thumbnails(layer, config, labels, centroids, pts)
    st.caption(f"Each dot is one of {layer}'s {what} (in the space k-means used: "
               f"{'unit-length, cosine metric' if config.metric == 'cosine' else 'raw weights'}"
               f"{', BN folded, bias as an extra coordinate' if fold else ''}); diamonds are the centroids, placed "
               "with the map fitted on the filters, so moving k never moves the filters.")


def thumbnails(layer, config, labels, centroids, pts, n_max: int = 9) -> None:
    """Cluster sizes, and small pictures of the largest clusters' centroids (or the first filters) where
    they are readable: the RGB stem filters and the 16-input-channel layers."""
    info = conv_layer(layer)
    cin = info.filter_shape[0]
    if labels is not None:
        st.altair_chart(charts.cluster_size_chart(labels), width="stretch", height=220)
    if config.granularity != "filter" or cin > 16:
        return
    if centroids is not None:
        vecs = centroids[:, : cin * 9]
        sizes = np.bincount(labels, minlength=len(centroids))
        order = np.argsort(-sizes, kind="stable")[:n_max]
        caps = [f"c{i} · {sizes[i]} filters" for i in order]
        st.markdown("**Largest clusters' centroids**")
    else:
        vecs = pts[:, : cin * 9]
        order = np.arange(min(n_max, len(vecs)))
        caps = [f"filter {i}" for i in order]
        st.markdown("**First filters**")
    w = np.asarray(vecs)[order].reshape(len(order), cin, 3, 3)
    if cin == 3:
        imgs = [charts.rgb_filter(x, scale=16) for x in w]
        note = "RGB filters of the stem, each scaled to its own range"
    else:
        vmax = float(np.abs(w).max()) or 1.0
        imgs = [charts.filter_mosaic(x, scale=5, vmax=vmax) for x in w]
        note = "Each tile: one filter's 16 input-channel kernels (red +, blue -, common scale)"
    st.image(imgs, caption=caps, width=64)
    st.caption(note)


@st.fragment
def explore(exp: Explorer, name: str) -> None:
    """Clustering controls (sidebar) and everything that depends on them (main area). A slider
    change re-runs only this fragment."""
    with st.sidebar:
        st.subheader("Clustering")
        with st.expander("Options"):
            st.selectbox("Metric", METRICS, key="opt.metric", help="; ".join(f"{k}: {v}" for k, v in METRIC_HELP.items()))
            st.selectbox("Granularity", GRANULARITIES, key="opt.granularity",
                         help="filter: one point per output filter (structural savings); kernel: one per 2D kernel")
            st.checkbox("Fold BatchNorm into filters", key="opt.fold_bn",
                        help="Cluster BN-folded filters; lets both convs of a block shrink")
            st.number_input("BN re-estimation images (0 = off)", 0, MAX_RECALIBRATION_IMAGES, step=500,
                            key="opt.recalibrate_bn", help="Re-estimate BatchNorm statistics on N training images")
            st.number_input("k-means seed", 0, 2**31 - 1, key="opt.seed")
            st.number_input("k-means restarts", 1, 20, key="opt.n_init")
        a, b, c = st.columns([5, 4, 4], vertical_alignment="bottom")
        a.number_input("Uniform k", 1, 64, key="uniform_k", help="Sets every layer to min(k, its filters)")
        b.button("Apply", on_click=apply_uniform, width="stretch")
        c.button("Reset", on_click=reset_all, width="stretch", help="Every layer unclustered, default options")
        for title, stage in STAGES:
            with st.expander(title, expanded=True):
                for l in (l for l in CONV_LAYERS if l.stage == stage):
                    st.slider(layer_label(l.name), 1, l.filters, key=f"k.{l.name}",
                              help=f"k for {l.name}: {l.filters} filters of shape {l.filter_shape} "
                                   f"({l.filters} = unchanged)")
    config = current_config()
    sync_url()
    head = st.container()
    tabs = st.tabs(["Per-class accuracy", "Confusion matrices", "Filters in 2D", "Downloads"])
    with tabs[2]:
        projection_section(exp, config)
    with head:
        preview = st.empty()
        try:
            if config.active and exp.cached(config) is None:
                # A quick, labelled answer first (2,000 images, bf16), replaced by the full result.
                ev = exp.preview(config)
                preview.info(sup.preview_text(exp, ev), icon=":material/hourglass_top:")
            with st.spinner(f"Clustering {len(config.active)} layers and evaluating on the full test split...",
                            show_time=True):
                result = exp.run(config)
        except ClusteringError as e:
            preview.empty()
            st.error(f"This configuration cannot be applied: {e}")
            return
        preview.empty()
        headline(result, exp)
    with tabs[0]:
        per_class_section(result)
    with tabs[1]:
        confusion_section(result)
    with tabs[3]:
        downloads_section(result, exp, name)
        with st.expander("Configuration JSON"):
            st.code(sup.config_json(config).decode(), language="json")


# ---------------------------------------------------------------- page

def main() -> None:
    init_process()
    ckpt_dir = sup.checkpoint_dir()
    infos = ckpt.list_checkpoints(ckpt_dir)
    usable = sup.usable_checkpoints(infos)
    by_name = {i.name: i for i in usable}
    labels = {i.name: sup.checkpoint_label(i) for i in usable}
    upload = ss.get("uploaded")  # this session's uploaded checkpoint (memory only), if any
    if upload is not None and upload.key not in by_name:
        labels[upload.key] = upload.label
    names = list(labels)

    st.title("ResNet20 filter clustering explorer")
    page, query, page_warns = analysis_page.split_query(query_dict())  # ?page=analysis: the Analysis page
    analysis_page.page_switch(page)
    first_run = not ss.get("_initialised")
    view, warns = sup.parse_query(query, names)
    warns += page_warns
    if first_run:
        put_view(view, only_missing=False)
        ss["_initialised"] = True
        for w in warns:
            st.warning(w, icon=":material/link_off:")
    else:
        put_view(view, only_missing=True)
    if ss.get("ckpt") not in labels and names:
        ss["ckpt"] = names[0]

    with st.sidebar:
        st.header("Checkpoint")
        if not names:
            st.error(f"No usable checkpoint in `{ckpt_dir}`.")
        else:
            st.selectbox("Checkpoint", names, key="ckpt", format_func=labels.__getitem__,
                         label_visibility="collapsed")
            st.caption(labels[ss["ckpt"]])
        st.file_uploader(f"Upload a checkpoint (.pt, at most {sup.MAX_UPLOAD_MB} MB)", type=["pt"], key="upload",
                         on_change=on_upload, max_upload_size=sup.MAX_UPLOAD_MB,
                         help="A ResNet20 state dict (`torch.save(model.state_dict(), 'name.pt')`). It is checked "
                              "(loaded without running any code from the file), kept in this browser session's "
                              "memory only, and neither saved on the server nor shown to anyone else.")
        if ss.get("upload_error"):
            st.error(ss["upload_error"], icon=":material/error:")
        launch = sup.last_launch()
        if any(i.training for i in infos) or (launch and launch.alive):
            training_progress(str(ckpt_dir), checkpoint_signature(infos))
        for bad in (i for i in infos if i.error):
            st.error(f"{bad.name}: {bad.error}", icon=":material/error:")

    if not names:
        st.info("Train one with `python -m explorer.train` (see the README), or enable training from the app below.")
        with st.sidebar:
            training_form(ckpt_dir)
        return
    if page == "analysis":  # reads result files only: no model, no dataset
        analysis_page.render(ckpt_dir, by_name.get(ss["ckpt"]), view)
        return

    data_root = resolve_root()
    data_root = str(data_root) if data_root else None
    if upload is not None and ss["ckpt"] == upload.key:
        exp, name = open_upload(upload, data_root), upload.name
    else:
        exp, name = open_shipped(by_name[ss["ckpt"]], data_root), ss["ckpt"]
    if exp is None:
        return
    explore(exp, name)
    with st.sidebar:
        st.divider()
        training_form(ckpt_dir)
        st.caption(f"torch threads: {torch.get_num_threads()} · share this view by copying the URL")


def open_upload(upload: sup.UploadedCheckpoint, data_root: str | None) -> Explorer | None:
    """The Explorer of this session's uploaded checkpoint and its caption (an st.error and None if it fails)."""
    try:
        exp = load_upload_explorer(upload.digest, data_root, upload.weights, upload.name)
    except DataNotFoundError as e:
        st.error(sup.data_error_message(e))
        return None
    except ckpt.CheckpointError as e:
        st.error(str(e))
        return None
    st.caption(f"**{upload.filename}** · uploaded in this session (kept in its memory only, not saved on the "
               f"server) · evaluated here on {exp.data.identity.name} ({len(exp.data.test_labels):,} test images)")
    return exp


def open_shipped(info: ckpt.CheckpointInfo, data_root: str | None) -> Explorer | None:
    """The Explorer of a checkpoint in the checkpoint directory and its caption or "in training" banner
    (an st.error and None if it fails)."""
    try:
        weights, digest = sup.read_weights(info.path)
        pin = ss.get(f"pinned.{info.name}")
        if info.complete or pin is None:
            exp = load_explorer(digest, data_root, weights, info.name)
            if not info.complete:  # rewritten every epoch: this session stays on these weights until asked
                ss[f"pinned.{info.name}"] = pin = {"digest": digest, "epoch": info.meta.get("epochs_done"), "explorer": exp}
        else:
            exp = pin["explorer"]
    except DataNotFoundError as e:
        st.error(sup.data_error_message(e))
        return None
    except ckpt.CheckpointError as e:
        st.error(f"{info.name}: {e}")
        return None

    meta = info.meta
    ds = meta.get("dataset", {}).get("name", "?")
    if info.complete:
        st.caption(f"**{info.name}** · trained {meta.get('epochs_done', meta.get('epochs', '?'))} epochs on {ds} · "
                   f"evaluated here on {exp.data.identity.name} ({len(exp.data.test_labels):,} test images)")
    else:
        epoch = pin["epoch"]
        state = "in training" if info.training else "incomplete (trainer not running)"
        with st.container(border=True):
            a, b = st.columns([5, 1], vertical_alignment="center")
            a.warning(f"**{info.name} is {state}**: you are exploring its weights after epoch {epoch} of "
                      f"{meta.get('epochs', '?')}; accuracies are not final.", icon=":material/model_training:")
            if digest != pin["digest"]:
                if b.button("Load latest weights", type="primary", help="The trainer has saved newer weights"):
                    del ss[f"pinned.{info.name}"]
                    st.rerun()
            else:
                b.caption("latest weights")
    return exp

main()
