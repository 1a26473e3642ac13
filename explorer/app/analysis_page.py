"""The Analysis page (``?page=analysis``): the results of the analysis commands for the selected
checkpoint. It only reads result files; it never loads a model or the dataset.

Shown, from the files beside the checkpoint (each missing one gives an ``st.info`` with the command
that writes it, an unreadable one an ``st.warning``; never an exception):

- ``<name>.sensitivity.json`` (:mod:`explorer.analysis.sensitivity`): the layer x k heatmap of top-1
  points lost and the per-stage line charts, for the metric picked, and euclidean vs cosine on the
  points measured with both;
- ``<name>.search.json`` (:mod:`explorer.analysis.search`): accuracy vs MACs (or parameters) of
  every verified configuration, with the uniform-k ones and finished fine-tuning results, and for
  each budget searched the best configuration with a button that applies it to the explorer's
  sliders and options (:func:`explorer.app.state.apply_configuration`) and opens the explorer on it;
- ``*_ft.json`` fine-tuning results of this checkpoint (:func:`explorer.training.finetune.finetuned_for`):
  recovery curves, compression, and per-class accuracy before / after fine-tuning.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pandas as pd
import streamlit as st

from .. import checkpoints as ckpt
from ..analysis import charts as acharts
from ..analysis import baselines, comparison
from ..analysis.baselines import SUFFIX as BASELINES_SUFFIX
from ..analysis.report import finetuned_points
from ..analysis.report import ks_text as report_ks_text
from ..analysis.report import options_label as report_options_label
from ..analysis.results import default_checkpoint
from ..analysis.search import SUFFIX as SEARCH_SUFFIX, best_record, load_search, pareto_table
from ..analysis.sensitivity import SUFFIX as SENS_SUFFIX, k_grid, load_sensitivity
from ..analysis.widths import SUFFIX as WIDTHS_SUFFIX
from ..clustering import ClusteringConfig
from ..evaluate import per_class_table
from ..model import CONV_LAYERS
from ..training.finetune import finetuned_for, is_pruned
from . import charts, state
from . import support as sup

SEARCH_COMMAND_ARGS = "--budget 0.5 1 2"
WIDTHS_COMMAND_ARGS = "--widths --target-reduction 0.65 --fold-bn --space data --recovery lsq"
HEATMAP_CLIP_PTS = 20.0
# File errors shown as a warning instead of an exception (bad JSON, missing fields, odd values).
READ_ERRORS = (ckpt.CheckpointError, KeyError, TypeError, ValueError, AttributeError)


_LOADERS = {"sensitivity": load_sensitivity, "search": load_search, "json": ckpt.read_json}


@st.cache_data(max_entries=32, show_spinner=False)
def _read_cached(kind: str, path: str, stamp: tuple[int, int, int] | None):
    return _LOADERS[kind](Path(path))


def read_result(kind: str, path: Path):
    """``load_sensitivity`` / ``load_search`` / ``read_json`` of ``path``, cached per (path, inode,
    mtime, size): every widget click reruns the page, and a result file changes only when a tool
    writes it (atomically: a new file, so a new inode and mtime). Raises what the loader raises."""
    try:
        st_ = path.stat()
        stamp = (st_.st_ino, st_.st_mtime_ns, st_.st_size)
    except OSError:
        stamp = None  # the loader reports the missing file in its own words
    return _read_cached(kind, str(path), stamp)


# ---------------------------------------------------------------- helpers

def command(module: str, args: str, checkpoint: Path | None, out_dir: Path | None = None) -> str:
    """The shell command that writes a result file for ``checkpoint`` (``--checkpoint`` only when it
    is not the CLIs' default; ``--out`` for explorer.finetune when results go elsewhere)."""
    parts = [f"python -m explorer.{module}"] + ([args] if args else [])
    if checkpoint is not None and Path(checkpoint).resolve() != Path(default_checkpoint()).resolve():
        parts.append(f"--checkpoint {shlex.quote(_shown(checkpoint))}")
    if out_dir is not None and Path(out_dir).resolve() != ckpt.DEFAULT_DIR.resolve():
        parts.append(f"--out {shlex.quote(_shown(out_dir))}")
    return " ".join(parts)


def _shown(path: Path) -> str:
    p = Path(path).resolve()
    try:
        return str(p.relative_to(sup.REPO_ROOT))
    except ValueError:
        return str(p)


def _read_or_warn(path: Path, load):
    """``load()``, or None after an ``st.warning`` naming ``path`` when the file cannot be read
    (bad JSON, missing fields, odd values): a result file never raises into the page."""
    try:
        return load()
    except READ_ERRORS as e:
        st.warning(f"`{path.name}` could not be read: {e}", icon=":material/warning:")
        return None


def _variant_label(granularity: str, fold_bn: bool, recal: int, space: str = "weight", recovery: str = "none") -> str:
    parts = [granularity]
    if fold_bn:
        parts.append("BN folded")
    if space != "weight":
        parts.append("data-aware space")
    if recovery == "lsq":
        parts.append(f"least squares ({int(recal):,})")
    elif recal:
        parts.append(f"BN re-estimated ({int(recal):,})")
    return ", ".join(parts)


def _choose(label: str, options: list, key: str, **kw):
    """A segmented control that keeps a valid choice when the options change (files grow)."""
    if st.session_state.get(key) not in options:
        st.session_state[key] = options[0]
    return st.segmented_control(label, options, key=key, required=True, **kw)


# ---------------------------------------------------------------- sections

def sensitivity_section(path: Path, checkpoint: Path | None) -> None:
    st.subheader("Layer sensitivity")
    cmd = command("sensitivity", "", checkpoint)
    if not path.is_file():
        st.info(f"No sensitivity sweep for this checkpoint yet (`{path.name}`). It is written by\n\n"
                f"`{cmd}`\n\n(add `--metric both` for the cosine metric too).",
                icon=":material/info:")
        return
    df = _read_or_warn(path, lambda: read_result("sensitivity", path))
    if df is None:
        return
    if not df.empty:
        df = df.assign(recalibrate_bn=df["recalibrate_bn"].astype(int), fold_bn=df["fold_bn"].astype(bool))
    if df.empty:
        st.info(f"`{path.name}` has no points yet; `{cmd}` adds them.", icon=":material/info:")
        return
    metrics = sorted(df["metric"].unique(), key=lambda m: (m != "euclidean", m))
    c1, c2 = st.columns([1, 2], vertical_alignment="bottom")
    with c1:
        metric = _choose("Metric", metrics, "analysis.metric",
                         help="k-means metric of the sweep; only metrics with measured points are offered")
    sub = df[df["metric"] == metric]
    counts: dict[tuple, int] = {}
    for r in sub.itertuples():
        if r.seed == 0:
            v = (r.granularity, bool(r.fold_bn), int(r.recalibrate_bn), r.space, r.recovery)
            counts[v] = counts.get(v, 0) + 1
    variants = sorted(counts, key=lambda v: (-counts[v], v))  # the fullest sweep first
    if len(variants) > 1:
        labels = [_variant_label(*v) for v in variants]
        with c2:
            chosen = st.selectbox("Clustering options", labels, key="analysis.sens_variant")
        variant = variants[labels.index(chosen)]
    else:
        variant = variants[0]
    gran, fold, recal, space, recovery = variant
    g = sub[(sub["granularity"] == gran) & (sub["fold_bn"] == fold) & (sub["recalibrate_bn"] == recal)
            & (sub["space"] == space) & (sub["recovery"] == recovery) & (sub["seed"] == 0)]
    expected = sum(len(k_grid(l.filters)) for l in CONV_LAYERS)
    head = read_result("json", path).get("header", {})
    n_test = head.get("test_images")
    note = f"{len(g)} of {expected} points ({metric}, {_variant_label(*variant)})"
    if len(g) < expected:
        note += " - the sweep is partial or still running; reload the page for new points"
    left, right = st.columns([2, 3])
    with left:
        st.altair_chart(acharts.sensitivity_heatmap(
            g, subtitle=f"{metric}, {_variant_label(*variant)}; colour capped at {HEATMAP_CLIP_PTS:g} pp",
            clip=HEATMAP_CLIP_PTS), width="stretch", height=520)  # Streamlit fits labels + legend in the width
    with right:
        st.altair_chart(acharts.sensitivity_lines(g, title=f"Points lost vs k ({metric})", columns=2),
                        width="content")
    measured = f" Measured on {n_test:,} test images." if isinstance(n_test, int) else ""
    st.caption(f"Each cell: top-1 points lost when only that layer is clustered to k, all others untouched "
               f"(k = the layer's filter count is the unclustered reference). {note}.{measured}")
    both = df[(df["granularity"] == gran) & (df["fold_bn"] == fold) & (df["recalibrate_bn"] == recal)
              & (df["space"] == space) & (df["recovery"] == recovery) & (df["seed"] == 0)]
    if set(both["metric"]) >= {"euclidean", "cosine"}:
        pairs = both.groupby(["layer", "k"])["metric"].nunique()
        common = pairs[pairs == 2].index
        both = both.set_index(["layer", "k"]).loc[common].reset_index()
        both = both[both["metric"].isin(["euclidean", "cosine"])]
        with st.expander(f"Euclidean vs cosine on the {len(common)} (layer, k) points measured with both"):
            if len(common):
                piv = both[both["k"] < both["filters"]].pivot_table(index="k", columns="metric", values="drop_pts",
                                                                    aggfunc="mean")
                st.dataframe(piv.rename(columns=lambda m: f"{m}: mean pp lost").reset_index(), hide_index=True,
                             column_config={c: st.column_config.NumberColumn(format="%.2f") for c in
                                            [f"{m}: mean pp lost" for m in piv.columns]})
                st.altair_chart(acharts.metric_sensitivity_chart(both), width="content")
    elif metrics == ["euclidean"]:
        st.caption(f"Cosine points: `{command('sensitivity', '--metric cosine', checkpoint)}`")


def recovery_section(path: Path, checkpoint: Path | None) -> None:
    """Clustering spaces and recoveries side by side: each layer alone at half its filters."""
    st.subheader("Without training: clustering space and recovery, side by side")
    if not path.is_file():
        return
    try:
        df = read_result("sensitivity", path)
    except READ_ERRORS:  # the sensitivity section above has said so already
        return
    half = comparison.half_points(df)
    if half is None or half.empty or half["variant"].nunique() < 2:
        st.caption("Measured for one space and recovery only so far; each other one is added by "
                   f"`{command('sensitivity', '--space data --recovery lsq --ks 8 16 32', checkpoint)}` "
                   "(with its own --space and --recovery).")
        return
    summ = comparison.summary(half)
    st.dataframe(summ, hide_index=True, width="stretch",
                 column_config={c: st.column_config.NumberColumn(format="%.2f") for c in summ.columns
                                if c.endswith("(pp)")})
    st.altair_chart(acharts.recovery_comparison_chart(half), width="content")
    with st.expander("Per layer (points lost at half the filters, k-means seed 0)"):
        table = comparison.half_table(half)
        st.dataframe(table.reset_index(), hide_index=True, width="stretch",
                     column_config={c: st.column_config.NumberColumn(format="%.2f") for c in table.columns})
    st.caption("Each layer alone clustered to half its filters (euclidean, no BN folding), all others untouched; "
               "drops on the full test split, the held-out drop on 2,000 training images the net was not "
               "fitted on by the recovery (what the search chooses with). The seed spread is max - min top-1 over "
               "the k-means seeds measured. Weight space: k-means on the filters; data-aware: k-means in the "
               "layer's output error. Least squares re-fits the layers after the clustered one to the original "
               "net's outputs on 512 training images; no gradient step anywhere.")


def baselines_section(path: Path, checkpoint: Path | None) -> None:
    """Clustering against Torch-Pruning criteria at the same MACs, before fine-tuning."""
    st.subheader("Clustering vs pruning at the same MACs (before fine-tuning)")
    if not path.is_file():
        st.caption(f"Not measured for this checkpoint yet: "
                   f"`{command('baselines', '--config checkpoints/resnet20_cifar10_p58.config.json --label p58', checkpoint)}`")
        return
    doc = _read_or_warn(path, lambda: read_result("json", path))
    if doc is None:
        return
    t = baselines.table(doc)
    if t.empty:
        return
    st.altair_chart(acharts.baselines_chart(t), width="content")
    for label, g in t.groupby("label", sort=False):
        piv = g.pivot_table(index="method", columns="recovery", values="top1", sort=False) * 100
        st.markdown(f"**{label}**: {100 * g['mac_reduction'].iloc[0]:.1f}% fewer MACs, top-1 %")
        st.dataframe(piv.reset_index(), hide_index=True, width="stretch",
                     column_config={c: st.column_config.NumberColumn(format="%.2f") for c in piv.columns})
    st.caption("The blocks' first convs reduced to the same k: by clustering (BN folded, clusters merged) or by "
               "pruning with Torch-Pruning's importance (L1, FPGM, Taylor, random; the residual stream stays full "
               "width for both). Same MACs, the same recoveries on the same training images, the same test split.")


def finetuned_comparison_section(metas: list[dict], checkpoint: Path | None) -> None:
    """Clustering against pruning after the same fine-tuning budget (finished runs of this base)."""
    st.subheader("Clustering vs pruning after fine-tuning")
    t = baselines.finetuned_table(metas)
    if t.empty or not t["method"].str.startswith("pruning").any():
        st.caption("No pruning baseline fine-tuned for this checkpoint yet: "
                   f"`{command('finetune', '--config CFG.json --pruning fpgm --epochs 30', checkpoint)}` beside "
                   f"`{command('finetune', '--config CFG.json --method merged --epochs 30', checkpoint)}`")
        return
    st.altair_chart(acharts.finetuned_comparison_chart(t), width="content")
    show = t.assign(**{"MACs saved %": 100 * t["mac_reduction"], "before %": 100 * t["before"],
                       "after %": 100 * t["after"], "pp lost": t["drop_pts"]})
    st.dataframe(show[["name", "method", "recovery", "epochs", "distill", "MACs saved %", "before %", "after %",
                       "pp lost"]], hide_index=True, width="stretch",
                 column_config={c: st.column_config.NumberColumn(format="%.2f")
                                for c in ("MACs saved %", "before %", "after %", "pp lost")})
    st.caption("Same loop, recipe and epochs for every run. merged and pruning runs train the smaller net itself "
               "(plain SGD), starting from the reduced net after its recovery (least squares on training images); "
               "tied runs train the full-width net with cluster-averaged gradients; centripetal runs start from the "
               "base weights and pull each cluster together. Top-1 on the test split, fp32.")


def best_configurations(doc: dict) -> list[dict]:
    """One entry per budget searched (sorted by objective, budget): budget, objective, run key and
    the best verified record for it (:func:`explorer.search.best_record` with the run's options;
    None when infeasible)."""
    out = []
    runs = sorted(doc.get("runs", {}).items(), key=lambda kv: (kv[1]["objective"], float(kv[1]["budget"])))
    for key, run in runs:
        opts = ClusteringConfig.from_dict(json.loads(run["options"])) if run.get("options") else None
        rec = best_record(doc, float(run["budget"]), run["objective"], opts)
        out.append({"key": key, "budget": float(run["budget"]), "objective": run["objective"], "record": rec})
    return out


def search_section(path: Path, name: str, checkpoint: Path | None, ft_metas: list[dict], view: state.ViewState) -> None:
    st.subheader("Accuracy vs MACs: per-layer k under a budget, and the same k everywhere")
    cmd = command("search", SEARCH_COMMAND_ARGS, checkpoint)
    if not path.is_file():
        st.info(f"No search results for this checkpoint yet (`{path.name}`). They are written by\n\n`{cmd}`\n\n"
                f"(greedy per-layer k for top-1 budgets of 0.5, 1 and 2 points, every step verified on the test "
                f"split; it first completes the euclidean sensitivity sweep it needs).", icon=":material/info:")
        return
    def tables():
        doc = read_result("search", path)
        base_top1 = float(doc["header"]["baseline_top1"])
        extra = finetuned_points([m for m in ft_metas if m.get("after") and m.get("compression")], base_top1)
        return doc, pareto_table(doc), base_top1, best_configurations(doc), extra

    loaded = _read_or_warn(path, tables)
    if loaded is None:
        return
    doc, table, base_top1, bests, extra = loaded
    if table.empty:
        st.info(f"`{path.name}` has no verified configuration yet; `{cmd}` adds them.", icon=":material/info:")
        return
    full = pd.concat([table, extra], ignore_index=True) if len(extra) else table
    left, right = st.columns([3, 2])
    with left:
        x = _choose("x axis", ["macs", "params"], "analysis.pareto_x",
                    format_func=lambda v: {"macs": "MACs per image", "params": "unique parameters"}[v])
        st.altair_chart(acharts.pareto_chart(full, base_top1, x,
                                             title=f"Accuracy vs {'MACs' if x == 'macs' else 'parameters'} of the "
                                                   f"compressed net"), width="stretch")
        n_uni = int((table["source"] == "uniform").sum())
        st.caption(f"{len(table)} verified configurations ({n_uni} uniform k, the rest from the greedy search)"
                   + (f", {len(extra)} fine-tuned" if len(extra) else "") + f"; dashed step: the Pareto front; grey "
                   f"rule: the unclustered checkpoint ({charts.pct(base_top1)}). Hover a point for its ks.")
    with right:
        st.markdown("**Best configuration per budget**")
        if not bests:
            st.caption("No budget searched yet.")
        for b in bests:
            rec = b["record"]
            label = f"{b['budget']:g} pts" + (f" ({b['objective']})" if b["objective"] != "macs" else "")
            with st.container(border=True):
                if rec is None:
                    st.markdown(f"**Budget {label}**: infeasible (the options alone lose more).")
                    continue
                cfg = ClusteringConfig.from_dict(rec["config"])
                st.markdown(f"**Budget {label}** · top-1 {charts.pct(rec['top1'])} "
                            f"({-rec['drop_pts']:+.2f} pp) · {100 * rec['mac_reduction']:.1f}% fewer MACs · "
                            f"{charts.count(rec['params'])} parameters ({rec['compression_ratio']:.2f}×)")
                n = len(cfg.active)
                layers = report_ks_text(cfg.active) if cfg.active else "nothing clustered"
                st.caption(f"{report_options_label(cfg, long=True)}; {n} layer{'s' if n != 1 else ''}: {layers}")
                a, d = st.columns([3, 1], vertical_alignment="center")
                a.button(f"Apply best configuration for budget {label}", key=f"analysis.apply.{b['key']}",
                         type="primary", width="stretch", on_click=state.apply_configuration,
                         args=(name, cfg, view.layer, view.proj, f"the best configuration for budget {label}"),
                         help="Sets the explorer's sliders and options to this configuration and opens it")
                d.download_button("JSON", sup.config_json(cfg), f"{name}_budget{b['budget']:g}.config.json",
                                  "application/json", key=f"analysis.json.{b['key']}", on_click="ignore",
                                  width="stretch", help="For `python -m explorer.finetune --config FILE` "
                                                        "or `python -m explorer.prune --config FILE`")
    uni = [doc["evaluations"][k] for k in doc.get("uniform", []) if k in doc.get("evaluations", {})]
    if uni:
        with st.expander("Uniform k (the same k in every layer)"):
            st.dataframe(pd.DataFrame([{
                "k": max(u["config"]["ks"].values()) if u["config"]["ks"] else None,
                "top-1 %": 100 * u["top1"], "pp lost": u["drop_pts"], "MACs saved %": 100 * u["mac_reduction"],
                "parameters": u["params"]} for u in uni]), hide_index=True, width="stretch",
                column_config={"top-1 %": st.column_config.NumberColumn(format="%.2f"),
                               "pp lost": st.column_config.NumberColumn(format="%.2f"),
                               "MACs saved %": st.column_config.NumberColumn(format="%.1f"),
                               "parameters": st.column_config.NumberColumn(format="localized")})


def widths_section(path: Path, name: str, checkpoint: Path | None, view: state.ViewState) -> None:
    """Whole stage-width shapes ranked at a MACs target (``python -m explorer.search --widths``):
    the table, best first, and one shape applied to the explorer or downloaded as a configuration."""
    st.subheader("Whole shapes at a MACs target: a start for fine-tuning")
    if not path.is_file():
        st.caption("No shapes ranked for this checkpoint yet: "
                   f"`{command('search', WIDTHS_COMMAND_ARGS, checkpoint)}`")
        return

    def load():
        doc = read_result("json", path)
        recs = sorted(doc["records"], key=lambda r: (-r["select_top1"], r["macs"]))
        groups: dict[int, list[dict]] = {}  # a ranking per target: shapes by whole percent of MACs saved
        for r in recs:
            groups.setdefault(int(100 * float(r["mac_reduction"])), []).append(r)
        return doc, dict(sorted(groups.items(), reverse=True))

    loaded = _read_or_warn(path, load)
    if loaded is None:
        return
    doc, groups = loaded
    if not groups:
        st.caption(f"`{path.name}` has no ranked shape yet.")
        return
    target = st.selectbox("MACs saved", list(groups), key="analysis.width_target",
                          format_func=lambda g: f"{g}-{g + 1}% fewer MACs ({len(groups[g])} "
                                                f"shape{'s' if len(groups[g]) != 1 else ''})")
    recs = groups[target]
    table = pd.DataFrame([{"shape": r["label"], "MACs saved %": 100 * r["mac_reduction"], "MACs": r["macs"],
                           "held-out top-1 %": 100 * r["select_top1"], "pp lost": r["select_drop_pts"]}
                          for r in recs])
    st.dataframe(table, hide_index=True, width="stretch", height=min(38 + 35 * len(table), 320),
                 column_config={"MACs saved %": st.column_config.NumberColumn(format="%.1f"),
                                "MACs": st.column_config.NumberColumn(format="localized"),
                                "held-out top-1 %": st.column_config.NumberColumn(format="%.2f"),
                                "pp lost": st.column_config.NumberColumn(format="%.2f")})
    base = doc.get("baseline_select_top1")
    st.caption(f"{len(recs)} shape{'s' if len(recs) != 1 else ''}, best first: a residual-stream k and one k for every block's first conv, per "
               "stage (streams s1/s2/s3, conv1 c1/c2/c3; a stream k equal to its width, 16/32/64, leaves it "
               "unclustered), each clustered with the file's options and scored on the 2,000 held-out training "
               "images, not the test split"
               + (f" (the unclustered net, which trained on them: {charts.pct(base)})" if base is not None else "")
               + ". A rough guide: the net's accuracy is decided by fine-tuning.")
    labels = [r["label"] for r in recs]
    pick, a, d = st.columns([3, 2, 1], vertical_alignment="bottom")
    chosen = pick.selectbox("Shape", labels, key=f"analysis.width_shape.{target}")
    rec = recs[labels.index(chosen)]
    try:
        cfg = ClusteringConfig.from_dict(rec["config"]).validate()
    except READ_ERRORS as e:
        st.warning(f"`{path.name}`: the configuration of {chosen} could not be read: {e}", icon=":material/warning:")
        return
    a.button("Apply this shape", key="analysis.width_apply", type="primary", width="stretch",
             on_click=state.apply_configuration, args=(name, cfg, view.layer, view.proj, f"the shape {chosen}"),
             help="Sets the explorer's sliders, stream ks and options to this shape and opens it")
    d.download_button("JSON", sup.config_json(cfg), f"{name}_{rec['macs']}macs.config.json", "application/json",
                      key="analysis.width_json", on_click="ignore", width="stretch",
                      help="For `python -m explorer.finetune --config FILE`")


def _latest(m: dict) -> tuple[float | None, int | None]:
    """Fine-tuned top-1 (final, or the latest evaluated epoch while training) and its epoch."""
    if m.get("after"):
        return float(m["after"]["top1"]), m.get("epochs_done")
    rec = m.get("recovery") or []
    return (float(rec[-1]["test_top1"]), rec[-1]["epoch"]) if rec else (None, None)


def _short(run: str, base: str) -> str:
    """A fine-tuned checkpoint's name without its base's prefix, for chart legends."""
    return run[len(base) + 1:] if run.startswith(base + "_") and len(run) > len(base) + 1 else run


def finetune_section(metas: list[dict], ckpt_dir: Path, checkpoint: Path | None, base: str) -> None:
    st.subheader("Fine-tuning")
    if not metas:
        cfg_cmd = command("search", "--budget 1 --write-config cfg.json", checkpoint)
        st.info("No fine-tuned checkpoint of this one yet. Write a configuration (from a budget above with its "
                f"**JSON** button, from the explorer's Downloads tab, or with `{cfg_cmd}`), then run\n\n"
                f"`{command('finetune', '--config cfg.json', checkpoint, ckpt_dir)}`\n\n"
                "(clustered weights stay tied to their centroids while training; results appear here as "
                "`<name>_ft.json`).", icon=":material/info:")
        return
    try:
        curves = pd.DataFrame([{"run": _short(m["name"], base), "epoch": p["epoch"], "test_top1": p["test_top1"]}
                               for m in metas for p in m.get("recovery") or []])
        base_top1 = next((float(m["baseline"]["top1"]) for m in metas if m.get("baseline")), None)
        rows = []
        for m in metas:
            hp = m["finetune"].get("hyperparameters", {})
            top1, epoch = _latest(m)
            comp = m.get("compression") or {}
            if is_pruned(m):  # a pruning baseline's run (explorer.baselines): no clustering configuration
                options, reduced = baselines.method_label(m), len(m["pruning"]["ks"])
            else:
                cfg = ClusteringConfig.from_dict(m["clustering"])
                options, reduced = report_options_label(cfg, long=True), len(cfg.active)
            setting = f"lr {hp.get('lr', '?')}" + (f", KD {hp['distill']:g}" if hp.get("distill") else "")
            rows.append({
                "run": m["name"], "status": m.get("status", "?"),
                "epochs": f"{m.get('epochs_done', 0)}/{m.get('epochs', hp.get('epochs', '?'))}",
                "before top-1 %": 100 * float(m["before"]["top1"]),
                "fine-tuned top-1 %": None if top1 is None else 100 * top1,
                "Δ vs baseline pp": None if top1 is None or base_top1 is None else 100 * (top1 - base_top1),
                "MACs saved %": 100 * comp["mac_reduction"] if comp else None,
                "parameters": comp.get("params"),
                "compression": f"{comp['compression_ratio']:.2f}×" if comp else "when finished",
                "settings": setting, "options": options, "layers reduced": reduced,
            })
    except READ_ERRORS as e:
        st.warning(f"A fine-tuning result could not be read: {e}", icon=":material/warning:")
        return
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", column_config={
        "before top-1 %": st.column_config.NumberColumn(
            format="%.2f", help="the reduced net (clustered, or pruned for a pruning baseline) before fine-tuning"),
        "fine-tuned top-1 %": st.column_config.NumberColumn(format="%.2f",
                                                            help="final, or the latest evaluated epoch while training"),
        "Δ vs baseline pp": st.column_config.NumberColumn(format="%+.2f"),
        "MACs saved %": st.column_config.NumberColumn(format="%.1f"),
        "parameters": st.column_config.NumberColumn(format="localized")})
    st.caption("MACs and parameters: the structurally compressed net, written when a run finishes. "
               "Per-class accuracy and recovery below.")
    cols = st.columns(2)
    with cols[0]:
        if len(curves):
            st.altair_chart(acharts.recovery_chart(curves, base_top1), width="stretch", height=330)
            st.caption(f"Runs named without the `{base}_` prefix. Epoch 0: clustered, before fine-tuning. Grey "
                       f"dashed rule: the unclustered checkpoint"
                       + (f" ({charts.pct(base_top1)})." if base_top1 is not None else "."))
    per_class_block(metas, cols[1])


def per_class_block(metas: list[dict], chart_col) -> None:
    """Per-class accuracy of one fine-tuned run (picked): change vs baseline (chart, in ``chart_col``)
    and below, full width, the table: baseline, clustered (pruned, for a pruning run), fine-tuned and
    the change, per class."""
    names = [m["name"] for m in metas if m.get("baseline") and m.get("before")]
    if not names:
        return
    default = next((m["name"] for m in metas if m.get("after")), names[0])
    if st.session_state.get("analysis.ft_run") not in names:
        st.session_state["analysis.ft_run"] = default
    with chart_col:
        run = st.selectbox("Per-class accuracy of", names, key="analysis.ft_run")
    m = next(m for m in metas if m["name"] == run)
    reduced = "pruned" if is_pruned(m) else "clustered"  # what the run's "before" net is
    try:
        base, before = m["baseline"]["per_class"], m["before"]["per_class"]
        after = (m.get("after") or {}).get("per_class")
        pc = per_class_table({"baseline": base, reduced: before, "fine-tuned": after}).set_index("class")
        rows = {"baseline %": 100 * pc["baseline"], f"{reduced} %": 100 * pc[reduced]}
        if after is not None:
            rows["fine-tuned %"] = 100 * pc["fine-tuned"]
            rows["fine-tuned - baseline pp"] = 100 * (pc["fine-tuned"] - pc["baseline"])
        table = pd.DataFrame(rows).T.rename_axis(None, axis=1).reset_index(names="")
        deltas = pd.DataFrame([{"class": c, "variant": v, "delta": pc.loc[c, v] - pc.loc[c, "baseline"]}
                               for v in (reduced, "fine-tuned") if v in pc for c in pc.index])
    except READ_ERRORS as e:
        with chart_col:
            st.warning(f"{run}: per-class accuracy could not be read: {e}", icon=":material/warning:")
        return
    with chart_col:
        st.altair_chart(acharts.per_class_chart(deltas, title="Per-class change vs baseline"),
                        width="stretch", height=260)
    st.dataframe(table, hide_index=True, width="stretch",
                 column_config={c: st.column_config.NumberColumn(format="%.1f") for c in pc.index})
    st.caption(f"Per-class test accuracy of {run}: the base checkpoint, {reduced} (before fine-tuning) and "
               f"fine-tuned; the last row in percentage points." if after is not None else
               f"{run} is still training: its fine-tuned per-class accuracy appears when it finishes.")


# ---------------------------------------------------------------- the page

def render(ctx) -> None:
    """The Analysis page for the checkpoint picked in the shared sidebar (:class:`.sidebar.Context`;
    an uploaded checkpoint has no result files). The explorer's view from the URL is kept for when a
    configuration is applied."""
    ckpt_dir, info, view = ctx.ckpt_dir, ctx.by_name.get(ctx.selected), ctx.view
    if info is None:
        st.info("The analysis results are computed by command-line tools for checkpoint files in "
                f"`{_shown(ckpt_dir)}`; an uploaded checkpoint has none. Pick a checkpoint from that directory, or "
                "save yours there and run `python -m explorer.sensitivity --checkpoint FILE.pt`.",
                icon=":material/info:")
        return
    name = info.name
    if st.query_params.get("ckpt") != name:  # the picker changed it here: keep the shared URL in step
        st.query_params["ckpt"] = name
    sens_path = ckpt_dir / f"{name}{SENS_SUFFIX}"
    search_path = ckpt_dir / f"{name}{SEARCH_SUFFIX}"
    st.caption(f"Results for **{name}**, read from `{_shown(ckpt_dir)}` (`{sens_path.name}`, `{search_path.name}` "
               f"and fine-tuned checkpoints `*_ft.json` of it); reload the page to pick up new results. "
               f"Accuracy changes are percentage points (pp); MACs per 32×32 image of the compressed net.")
    try:
        ft_metas = finetuned_for(ckpt_dir, name)
    except READ_ERRORS as e:
        st.warning(f"Fine-tuning results could not be listed: {e}", icon=":material/warning:")
        ft_metas = []
    sensitivity_section(sens_path, info.path)
    st.divider()
    recovery_section(sens_path, info.path)
    st.divider()
    baselines_section(ckpt_dir / f"{name}{BASELINES_SUFFIX}", info.path)
    finetuned_comparison_section(ft_metas, info.path)
    st.divider()
    search_section(search_path, name, info.path, ft_metas, view)
    st.divider()
    widths_section(ckpt_dir / f"{name}{WIDTHS_SUFFIX}", name, info.path, view)
    st.divider()
    finetune_section(ft_metas, ckpt_dir, info.path, name)
