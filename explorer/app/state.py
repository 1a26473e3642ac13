"""The app's view state, in one place: what a shared URL reproduces (:class:`ViewState`), its
lenient parsing and canonical form (:func:`parse_query`, :func:`view_query`, :func:`split_page`,
pure functions), and the only code that reads or writes the widget-state keys the view lives in:
``ckpt``, ``opt.<option>`` (:func:`opt_key`), ``k.<layer>`` (:func:`k_key`), ``layer``, ``proj``,
``tab``, ``uniform_k`` and the page switch ``nav.page``.

The flow: on a session's first run the URL is parsed into a view and written into the widgets'
keys (:func:`put_view`); the widgets own the state from then on, and the URL is rewritten from
them after every run (:func:`sync_url`). ``page=analysis`` selects the Analysis page; the
explorer's parameters stay in the URL meanwhile, so switching back restores the explorer as it was.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

import streamlit as st

from ..clustering import STREAM_KEY, ClusteringConfig
from ..model import CONV_LAYER_NAMES, CONV_LAYERS, STREAM_STAGES, stream_width
from ..pipeline import APP_DEFAULTS, app_default_config, with_app_defaults  # noqa: F401 (re-exported)
from ..projection import METHODS
from ..urlquery import last_value
from .support import UPLOAD_PREFIX

DEFAULT_LAYER = "conv1"
DEFAULT_PROJECTION = "umap"
DEFAULT_UNIFORM_K = 8
# The Explorer's sections, one shown at a time (only the shown one is built): URL ``tab``.
TABS = ("per_class", "confusion", "filters", "downloads", "finetune")
DEFAULT_TAB = "per_class"
VIEW_KEYS = ("ckpt", "layer", "proj", "tab")
# Every ClusteringConfig option is a URL parameter and an ``opt.<name>`` widget key; the stream ks
# are one ``s.<stage>`` key per stage instead (:func:`s_key`), like the layers' ``k.<layer>``.
CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(ClusteringConfig) if f.name not in ("ks", "stream"))
STREAMLIT_KEYS = ("embed", "embed_options")  # understood by Streamlit itself; never warned about
PAGE_PARAM = "page"
PAGES = {"explorer": "Explorer", "analysis": "Analysis"}
NAV_KEY = "nav.page"
EXPLORER_STATE_PREFIXES = ("k.", "opt.", STREAM_KEY)
# What the app shows when the URL does not say (explorer.pipeline.APP_DEFAULTS, beside the Explorer
# so that the benchmarks can time what the page computes without importing the app); the URL names
# space and recovery whenever they differ from these.
EXPLORER_STATE_KEYS = ("layer", "proj", "uniform_k", "tab")


def k_key(layer: str) -> str:
    """Widget key of a layer's k slider (and its URL parameter): ``k.<layer>``."""
    return f"k.{layer}"


def s_key(stage: int) -> str:
    """Widget key of a stage's residual-stream k slider (and its URL parameter): ``s.<stage>``."""
    return f"{STREAM_KEY}{stage}"


def opt_key(name: str) -> str:
    """Widget key of a clustering option: ``opt.<name>``."""
    return f"opt.{name}"


@dataclass(frozen=True)
class ViewState:
    """Everything a shared URL reproduces. ``ckpt`` None means "no usable checkpoint"."""

    ckpt: str | None
    config: ClusteringConfig
    layer: str = DEFAULT_LAYER
    proj: str = DEFAULT_PROJECTION
    tab: str = DEFAULT_TAB


# ---------------------------------------------------------------- URL <-> view (pure)

def split_page(query: Mapping[str, object]) -> tuple[str, dict, list[str]]:
    """The page named by the URL's ``page`` parameter ("explorer" unless it says "analysis"), the
    other parameters (the explorer's view), and a warning for an unknown page name."""
    rest = {k: v for k, v in query.items() if k != PAGE_PARAM}
    raw = query.get(PAGE_PARAM)
    if not raw:
        return "explorer", rest, []
    value = last_value(raw).strip().lower()
    if value in PAGES:
        return value, rest, []
    return "explorer", rest, [f"page={value[:30]!r} is not a page of this app ({', '.join(PAGES)}); "
                              f"showing the explorer"]


def _choice(params: Mapping[str, object], key: str, options, default: str, verb: str, warns: list[str]) -> str:
    """The URL's ``key`` (lower-cased) when it is one of ``options``, else ``default`` with a warning."""
    if key not in params:
        return default
    raw = last_value(params[key]).strip().lower()
    if raw in options:
        return raw
    warns.append(f"{key}={raw[:20]!r} is not one of {', '.join(options)}; {verb} {default}")
    return default


def parse_query(params: Mapping[str, object], checkpoints: list[str]) -> tuple[ViewState, list[str]]:
    """Parse URL query parameters into a :class:`ViewState`, leniently: never raises; unknown
    checkpoints, layers, keys, non-numbers and out-of-range k are ignored or clamped, each with a
    warning. ``checkpoints`` are the names the app offers (the first is the default). Values may be
    strings or lists of strings (repeated keys: the last wins)."""
    params = {str(k)[:200]: v for k, v in params.items()}
    config, warns = ClusteringConfig.from_query(with_app_defaults(params))
    default_ckpt = checkpoints[0] if checkpoints else None
    name = default_ckpt
    if "ckpt" in params:
        raw = last_value(params["ckpt"]).strip()
        if raw in checkpoints:
            name = raw
        elif raw.startswith(UPLOAD_PREFIX) and default_ckpt is not None:
            warns.append(f"checkpoint {raw[:60]!r} was uploaded in another session (uploads are kept only by the "
                         f"session that uploaded them); upload the file again; showing {default_ckpt!r}")
        elif default_ckpt is not None:
            warns.append(f"checkpoint {raw[:60]!r} is not available here; showing {default_ckpt!r}")
        else:
            warns.append(f"checkpoint {raw[:60]!r} is not available here")
    layer = DEFAULT_LAYER
    if "layer" in params:
        raw = last_value(params["layer"]).strip()
        if raw in CONV_LAYER_NAMES:
            layer = raw
        else:
            warns.append(f"layer={raw[:40]!r} is not a conv layer of ResNet20; showing {DEFAULT_LAYER}")
    proj = _choice(params, "proj", METHODS, DEFAULT_PROJECTION, "using", warns)
    tab = _choice(params, "tab", TABS, DEFAULT_TAB, "showing", warns)
    known = set(VIEW_KEYS) | set(CONFIG_KEYS) | set(STREAMLIT_KEYS)
    unknown = [k for k in params if k not in known and not k.startswith(("k.", STREAM_KEY))]
    if unknown:
        shown = ", ".join(repr(k[:30]) for k in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        warns.append(f"ignored unknown URL parameter{'s' if len(unknown) > 1 else ''} {shown}")
    return ViewState(name, config, layer, proj, tab), warns


def view_query(view: ViewState) -> dict[str, str]:
    """Canonical query parameters of a view: ``ckpt`` always (so a shared link keeps naming its
    checkpoint even when others are added), then the configuration's non-default options and every
    clustered layer's ``k.<layer>``, then ``layer``/``proj``/``tab`` when not at their defaults."""
    q: dict[str, str] = {}
    if view.ckpt:
        q["ckpt"] = view.ckpt
    cq = view.config.to_query()
    cfg = view.config
    # space and recovery relative to the app's defaults, so that a link says what differs from them
    cq.pop("space", None)
    if cfg.space != APP_DEFAULTS["space"]:
        cq["space"] = cfg.space
    if cfg.recovery == APP_DEFAULTS["recovery"] and "recalibrate_bn" not in cq:
        cq.pop("recovery", None)
    elif cfg.recovery == "none":
        cq["recovery"] = "none"
    q.update(cq)
    if view.layer != DEFAULT_LAYER:
        q["layer"] = view.layer
    if view.proj != DEFAULT_PROJECTION:
        q["proj"] = view.proj
    if view.tab != DEFAULT_TAB:
        q["tab"] = view.tab
    return q


# ---------------------------------------------------------------- widgets <-> view <-> URL (Streamlit)

def query_dict() -> dict[str, list[str]]:
    """The page's URL query parameters, every value as the list of its values."""
    return {k: st.query_params.get_all(k) for k in st.query_params.keys()}


def _ss():
    return st.session_state


def write_config(config: ClusteringConfig, only_missing: bool = False) -> None:
    """Set the option and k widgets to ``config`` (all, or only the keys not set yet)."""
    ss = _ss()

    def put(key, value):
        if not only_missing or key not in ss:
            ss[key] = value

    for name in CONFIG_KEYS:
        put(opt_key(name), getattr(config, name))
    active = config.active
    for layer in CONV_LAYERS:
        put(k_key(layer.name), int(active.get(layer.name, layer.filters)))
    for stage in STREAM_STAGES:
        put(s_key(stage), int(config.active_stream.get(stage, stream_width(stage))))


def put_view(view: ViewState, only_missing: bool) -> None:
    """Write a view into the widgets' session-state keys (all, or only those not yet set)."""
    ss = _ss()
    if view.ckpt is not None and (not only_missing or "ckpt" not in ss):
        ss["ckpt"] = view.ckpt
    write_config(view.config, only_missing)
    for key, value in (("layer", view.layer), ("proj", view.proj), ("tab", view.tab),
                       ("uniform_k", DEFAULT_UNIFORM_K)):
        if not only_missing or key not in ss:
            ss[key] = value


def current_config() -> ClusteringConfig:
    """The configuration the widgets show."""
    ss = _ss()
    default = ClusteringConfig()
    ks = {l.name: int(ss[k_key(l.name)]) for l in CONV_LAYERS if int(ss[k_key(l.name)]) < l.filters}
    stream = {s: int(ss.get(s_key(s), stream_width(s))) for s in STREAM_STAGES}
    stream = {s: k for s, k in stream.items() if k < stream_width(s)}
    return ClusteringConfig(ks=ks, stream=stream, **{n: type(getattr(default, n))(ss[opt_key(n)]) for n in CONFIG_KEYS})


def current_view() -> ViewState:
    ss = _ss()
    return ViewState(ss.get("ckpt"), current_config(), ss.get("layer", DEFAULT_LAYER), ss.get("proj", DEFAULT_PROJECTION),
                     ss.get("tab") or DEFAULT_TAB)


def sync_url() -> None:
    """Rewrite the explorer's URL from the widgets (only when it changed)."""
    q = view_query(current_view())
    if {k: [v] for k, v in q.items()} != query_dict():
        st.query_params.from_dict(q)


def apply_uniform() -> None:
    """Button callback: every layer to min(uniform k, its filters)."""
    ss = _ss()
    k = int(ss["uniform_k"])
    for layer in CONV_LAYERS:
        ss[k_key(layer.name)] = min(k, layer.filters)
    for stage in STREAM_STAGES:  # a uniform k sets the stream writers' own k, which excludes a stream k
        ss[s_key(stage)] = stream_width(stage)


def reset_all() -> None:
    """Button callback: every layer unclustered, the app's default options."""
    write_config(app_default_config())


def recovery_changed() -> None:
    """Recovery widget callback: a new recovery starts from its own default image count (BN 2,000,
    least squares 512), and "none" from none."""
    _ss()[opt_key("recalibrate_bn")] = 0


def apply_configuration(name: str, config: ClusteringConfig, layer: str, proj: str, what: str) -> None:
    """Button callback (Analysis page): the explorer's widgets and URL to ``config`` on checkpoint
    ``name``, without ``page`` so the rerun shows the explorer. The URL alone would do when the
    widgets' state was dropped while the Analysis page was shown; the session state covers the case
    where it was kept."""
    _ss()["ckpt"] = name
    write_config(config)
    st.query_params.from_dict(view_query(ViewState(name, config, layer, proj)))
    st.toast(f"Applied {what}: {len(config.active)} layers clustered", icon=":material/tune:")


def apply_tied(config: ClusteringConfig) -> None:
    """Button callback: the widgets to a checkpoint's own ties (:func:`explorer.limits.tied_config`)."""
    write_config(config)
    st.toast(f"Clustered as fine-tuned: {len(config.active)} layers"
             + (f", {len(config.active_stream)} residual streams" if config.active_stream else ""),
             icon=":material/tune:")


def keep_explorer_state() -> None:
    """Re-assign the explorer's widget values as plain session state (the router does it every
    run). Its widgets are not drawn on the Analysis page, nor in a run that only switches pages, and
    Streamlit drops the state of widgets missing from a run, which would bring the explorer back on
    stale values."""
    ss = _ss()
    for key in list(ss.keys()):
        if key.startswith(EXPLORER_STATE_PREFIXES) or key in EXPLORER_STATE_KEYS:
            ss[key] = ss[key]


def _on_switch() -> None:
    if _ss().get(NAV_KEY) == PAGES["analysis"]:
        st.query_params[PAGE_PARAM] = "analysis"
    elif PAGE_PARAM in st.query_params:
        del st.query_params[PAGE_PARAM]


def page_switch(page: str) -> None:
    """The Explorer / Analysis switch; it reflects the URL and changes only its ``page`` parameter."""
    _ss()[NAV_KEY] = PAGES[page]
    st.segmented_control("Page", list(PAGES.values()), key=NAV_KEY, required=True, on_change=_on_switch,
                         label_visibility="collapsed")
