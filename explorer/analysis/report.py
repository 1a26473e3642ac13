"""The results report (:func:`build_report`; command line: ``python -m explorer.report``).

Writes, from the checkpoint and the analysis files beside it, into one directory: ``report.md`` +
``*.png`` (PNG charts rendered offline by ``vl-convert-python``; without it the Markdown has the
tables only), ``report.html`` (tables and the interactive Altair charts as embedded Vega-Lite specs;
viewing it loads the Vega JavaScript from a CDN, as Altair's own HTML export does), ``headline.md``
(the README's headline table) and ``report.json`` (every number, and the cache that makes reruns
cheap). Tables are pandas DataFrames written with ``to_markdown`` / ``to_html``.

Sections: baseline per-class accuracy; k = 3 in every layer (the first write-up's experiment) with
per-class deltas without and with BatchNorm re-estimation; the sensitivity heatmaps
(:mod:`.sensitivity`); accuracy vs MACs and the best configurations per budget with their CPU
latency (:mod:`.search`); fine-tuning recovery (:mod:`explorer.training.finetune`); euclidean vs
cosine and filter vs kernel granularity at the same k in every layer.

Every evaluation is exact fp32 through :meth:`explorer.pipeline.Explorer.run` and is stored in
``report.json`` as soon as it is measured, so an interrupted report resumes; a report for other
weights or data refuses to reuse it (``restart``).
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd

from .. import checkpoints as ckpt
from ..clustering import ClusteringConfig
from ..evaluate import per_class_table
from ..training.finetune import finetuned_for, is_pruned
from . import baselines, charts, comparison
from .results import Evaluations, header, open_results, save_results
from .search import load_search, pareto_table
from .sensitivity import load_sensitivity

COMPARE_KS = (2, 4, 8, 16)


# ---------------------------------------------------------------- formatting

def frame(rows: list[dict], columns: list[str] | None = None) -> pd.DataFrame:
    """``rows`` (dicts of already formatted values) as a DataFrame with ``columns`` (default: every
    key, in first-seen order); missing cells are empty strings."""
    cols = columns or list(dict.fromkeys(k for r in rows for k in r))
    return pd.DataFrame(rows, columns=cols).fillna("")


def md_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A GitHub-Markdown table of ``rows`` (pandas ``to_markdown``; cells kept as written)."""
    if not rows:
        return "_(none)_"
    return frame(rows, columns).to_markdown(index=False, disable_numparse=True)


def html_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """An HTML table of ``rows`` (pandas ``to_html``, cells escaped)."""
    if not rows:
        return "<p><em>(none)</em></p>"
    return frame(rows, columns).to_html(index=False, escape=True, border=0)


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def pp(x: float) -> str:
    v = 100 * x
    return f"{0.0 if abs(v) < 0.005 else v:+.2f}"


def drop(delta: float) -> str:
    """Points lost for a (pruned - baseline) fraction: -0.0123 -> '1.23' (never '-0.00')."""
    v = -100 * delta
    return f"{0.0 if abs(v) < 0.005 else v:.2f}"


def ks_text(ks: dict) -> str:
    if not ks:
        return "-"
    return ", ".join(f"{n}={k}" for n, k in ks.items())


class Doc:
    """Collects sections as Markdown and HTML in parallel, plus charts to render."""

    def __init__(self, out: Path, png: bool):
        self.out, self.png = out, png
        self.md: list[str] = []
        self.html: list[str] = []
        self.charts: list[tuple[str, object]] = []
        self.png_error: str | None = None

    def heading(self, text: str, level: int = 2):
        self.md.append(f"{'#' * level} {text}\n")
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def para(self, text: str):
        self.md.append(text + "\n")
        self.html.append(f"<p>{html.escape(text)}</p>")

    def table(self, rows: list[dict], columns: list[str] | None = None):
        self.md.append(md_table(rows, columns) + "\n")
        self.html.append(html_table(rows, columns))

    def chart(self, name: str, chart) -> None:
        self.charts.append((name, chart))
        i = len(self.charts)
        spec = chart.to_json(indent=None)
        self.html.append(f'<div id="chart{i}"></div><script>vegaEmbed("#chart{i}", {spec}, '
                         f'{{"actions": false}}).catch(console.error);</script>')
        if self.png:
            path = self.out / f"{name}.png"
            try:
                import vl_convert as vlc

                path.write_bytes(vlc.vegalite_to_png(chart.to_json(), scale=2))
                self.md.append(f"![{name}]({name}.png)\n")
            except Exception as e:  # ImportError, or a rendering failure: keep the report going
                self.png = False
                self.png_error = f"{type(e).__name__}: {e}"
        if not self.png:
            self.md.append(f"_(chart `{name}`: see report.html)_\n")

    def write(self, title: str) -> tuple[Path, Path]:
        import altair as alt

        md = self.out / "report.md"
        md.write_text(f"# {title}\n\n" + "\n".join(self.md))
        page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<!-- Vega, Vega-Lite and vega-embed are loaded from a CDN when the page is viewed. -->
<script src="https://cdn.jsdelivr.net/npm/vega@{alt.VEGA_VERSION}"></script>
<script src="https://cdn.jsdelivr.net/npm/vega-lite@{alt.VEGALITE_VERSION}"></script>
<script src="https://cdn.jsdelivr.net/npm/vega-embed@{alt.VEGAEMBED_VERSION}"></script>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:1em 0;font-size:0.9em}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
th{{background:#f3f3f3}}td:first-child,th:first-child{{text-align:left}}</style></head>
<body><h1>{html.escape(title)}</h1>
{chr(10).join(self.html)}
</body></html>
"""
        page_path = self.out / "report.html"
        page_path.write_text(page)
        return md, page_path


# ---------------------------------------------------------------- sections

def per_class_rows(summaries: dict[str, dict], baseline: dict) -> list[dict]:
    """One row per class: the baseline accuracy, then for each summary (``PruneResult.summary``) its
    accuracy and change, e.g. "71.00% (-3.00)"."""
    table = per_class_table({"baseline": baseline, **{label: {r["class"]: r["pruned"] for r in s["per_class"]}
                                                      for label, s in summaries.items()}}, "baseline")
    rows = []
    for _, r in table.iterrows():
        row = {"class": r["class"], "baseline": pct(r["baseline"])}
        for label in summaries:
            delta = r["delta"] if len(summaries) == 1 else r[f"delta {label}"]
            row[label] = f"{pct(r[label])} ({pp(delta)})"
        rows.append(row)
    return rows


def build_report(explorer, out: Path, sensitivity_path: Path | None, search_path: Path | None,
                 finetune_dir: Path | None, recalibrate: int = 2000, compare_ks=COMPARE_KS,
                 latency: bool = True, png: bool = True, restart: bool = False, progress: bool = True) -> dict:
    """Build the report into ``out``; returns the ``report.json`` document. Missing analysis files
    give a section that says which command produces them. Raises ResultsMismatch, CheckpointError."""
    out.mkdir(parents=True, exist_ok=True)
    cache_path = out / "report.json"
    doc = open_results(cache_path, header(explorer), restart=restart)
    save = lambda: save_results(doc, cache_path)  # noqa: E731
    evaluate = Evaluations(explorer, doc, save, progress=progress)

    def run(config, latency=()):
        return evaluate(config, latency=latency)

    d = Doc(out, png)
    h = doc["header"]
    data_name = h["dataset"]["name"]
    base_top1 = h["baseline_top1"]
    headline: list[dict] = [{"configuration": "baseline (no clustering)", "top-1": pct(base_top1), "drop (pp)": "0.00",
                             "MACs saved": "0.0%", "parameters": ""}]
    numbers: dict = {}

    d.para(f"Checkpoint `{h['checkpoint']}` (weights sha1 {h['weights_sha1']}), evaluated in fp32 on "
           f"{h['test_images']:,} test images of {data_name}. Baseline top-1 {pct(base_top1)}. Accuracy changes are "
           f"percentage points (pp). MACs are multiply-accumulates per 32x32 image of the structurally compressed "
           f"net (explorer.compress); latency is CPU wall time, median of 10 runs, on the machine that built the report.")

    # 1. baseline
    d.heading("Baseline per-class accuracy")
    d.table([{"class": c, "accuracy": pct(a)} for c, a in h["baseline_per_class"].items()])
    d.chart("baseline_per_class", charts.baseline_per_class_chart(h["baseline_per_class"], subtitle=data_name))

    # 2. k = 3 everywhere
    d.heading("k = 3 in every layer (the first write-up's experiment)")
    k3 = run(ClusteringConfig.uniform(3))
    k3r = run(ClusteringConfig.uniform(3, recalibrate_bn=recalibrate)) if recalibrate else None
    summaries = {"k=3": k3}
    if k3r:
        summaries[f"k=3, BN re-estimated ({recalibrate} images)"] = k3r
    # The first write-up clustered 2D kernels (clustering.py: granularity "kernel"); show that too.
    summaries["k=3, kernels"] = run(ClusteringConfig.uniform(3, granularity="kernel"))
    if recalibrate:
        summaries[f"k=3, kernels, BN re-estimated ({recalibrate} images)"] = run(
            ClusteringConfig.uniform(3, granularity="kernel", recalibrate_bn=recalibrate))
    d.para(f"Every conv layer clustered to 3 filters (euclidean k-means, ClusteringConfig.uniform(3)): top-1 "
           f"{pct(k3['top1'])} "
           f"({pp(k3['top1_delta'])} pp)" + (f"; with BatchNorm statistics re-estimated on {recalibrate} training "
                                             f"images: {pct(k3r['top1'])} ({pp(k3r['top1_delta'])} pp)" if k3r else "")
           + f". The compressed net has {100 * k3['mac_reduction']:.1f}% fewer MACs and "
             f"{k3['compression_ratio']:.1f}x fewer parameters. The 'kernels' columns cluster the 3x3 kernels of "
             f"each layer into 3 shared kernels instead (the first write-up's granularity; no MAC savings): top-1 "
             f"{pct(summaries['k=3, kernels']['top1'])}.")
    d.table(per_class_rows(summaries, h["baseline_per_class"]))
    pc = pd.DataFrame([{"class": r["class"], "variant": label, "delta": r["delta"]}
                       for label, s in summaries.items() for r in s["per_class"]])
    d.chart("k3_per_class", charts.per_class_chart(pc, title="k = 3 everywhere: per-class change",
                                                   subtitle=data_name))
    for label, s in summaries.items():
        headline.append({"configuration": label + " (no fine-tuning)", "top-1": pct(s["top1"]),
                         "drop (pp)": drop(s['top1_delta']), "MACs saved": f"{100 * s['mac_reduction']:.1f}%",
                         "parameters": f"{s['params']:,}"})
    numbers["k3"] = summaries
    headline[0]["parameters"] = f"{k3['baseline_params']:,}"

    # 3. sensitivity
    d.heading("Layer sensitivity")
    sens = None
    if sensitivity_path is not None and sensitivity_path.is_file():
        sens = load_sensitivity(sensitivity_path)
        sdoc = ckpt.read_json(sensitivity_path)
        if sdoc["header"].get("weights_sha1") != h["weights_sha1"] or sdoc["header"].get("test_images") != h["test_images"]:
            d.para(f"Note: {sensitivity_path.name} was measured on other weights or another test set than this report.")
    if sens is None or sens.empty:
        d.para("No sensitivity sweep yet: run `python -m explorer.sensitivity` (see its --help).")
    else:
        d.para("Each cell: top-1 points lost when only that layer is clustered to k (all other layers untouched). "
               "k = filter count is the unclustered reference.")
        full = sens[(sens.space == "weight") & (sens.recovery != "lsq") & (sens.seed == 0)]  # the full-grid sweeps
        groups = full.groupby(["metric", "granularity", "fold_bn", "recalibrate_bn"], sort=True)
        for i, ((metric, gran, fold, recal), g) in enumerate(groups):
            sub = f"{metric}, {gran}" + (", BN folded" if fold else "") + (f", BN re-estimated ({recal})" if recal else "")
            d.chart(f"sensitivity_{i}", charts.sensitivity_heatmap(g, subtitle=f"{sub}; {data_name}", clip=20.0))
        first = next(iter(groups))[1]
        d.chart("sensitivity_lines", charts.sensitivity_lines(first))
        both = full[(full.granularity == "filter") & (~full.fold_bn) & (full.recalibrate_bn == 0)]
        if set(both.metric) >= {"euclidean", "cosine"}:
            d.chart("sensitivity_metrics", charts.metric_sensitivity_chart(both))
            piv = both[both.k < both.filters].pivot_table(index="k", columns="metric", values="drop_pts", aggfunc="mean")
            d.para("Mean points lost over layers, per k: " + "; ".join(
                f"k={k}: euclidean {r['euclidean']:.2f}, cosine {r['cosine']:.2f}" for k, r in piv.iterrows()))
        numbers["sensitivity_points"] = int(len(sens))
        half = comparison.half_points(sens)
        if not half.empty and half["variant"].nunique() > 1:
            d.heading("Without training: clustering space and recovery, side by side")
            d.para("Each layer alone clustered to half its filters (euclidean, no BN folding), all others untouched. "
                   "Weight space: k-means on the filters; data-aware: k-means in the metric of the layer's output "
                   "error on 512 training images. Recovery: none, BN re-estimation (2,000 training images), or "
                   "least squares (every layer from the clustered one on re-fitted in closed form to the original "
                   "net's outputs on 512 training images). Drops on the test split; the held-out drop on 2,000 "
                   "training images not used by any fit; seed spread = max - min top-1 over the k-means seeds "
                   "measured.")
            summ = comparison.summary(half)
            d.table([{k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in r.items()}
                     for r in summ.to_dict("records")])
            d.chart("recovery_comparison", charts.recovery_comparison_chart(half, subtitle=data_name))
            table = comparison.half_table(half).round(2).reset_index()
            d.table([{k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in r.items()}
                     for r in table.to_dict("records")])
            numbers["recovery_comparison"] = summ.to_dict("records")

    # 4. search: Pareto and best configurations
    d.heading("Best per-layer k under an accuracy budget")
    sdoc = load_search(search_path) if search_path is not None and search_path.is_file() else None
    ft_metas = finetuned_for(finetune_dir, h["checkpoint"])
    if sdoc is None:
        d.para("No search results yet: run `python -m explorer.search --budget 0.5 1 2` (see its --help).")
    else:
        table = pareto_table(sdoc)
        extra = finetuned_points(ft_metas, base_top1)
        full = pd.concat([table, extra], ignore_index=True) if len(extra) else table
        d.chart("pareto", charts.pareto_chart(full, base_top1))
        rows = []
        best_rows = []
        for rk, r in sorted(sdoc.get("runs", {}).items(), key=lambda kv: (kv[1]["objective"], kv[1]["budget"])):
            best = r["best"]
            if best is None:
                rows.append({"budget (pp)": f"{r['budget']:g}", "objective": r["objective"],
                             "top-1": "infeasible (the options alone exceed the budget)"})
                continue
            cfg = ClusteringConfig.from_dict(best["config"])
            s = run(cfg, (1, 256) if latency else ())
            lat = s.get("latency") or {}
            row = {"budget (pp)": f"{r['budget']:g}", "objective": r["objective"], "options": options_label(cfg),
                   "top-1": pct(s["top1"]), "drop (pp)": drop(s['top1_delta']),
                   "MACs": f"{s['macs'] / 1e6:.2f} M", "MACs saved": f"{100 * s['mac_reduction']:.1f}%",
                   "params": f"{s['params']:,}", "compression": f"{s['compression_ratio']:.2f}x"}
            for b in ("b1", "b256"):
                if b in lat:
                    row[f"latency {b[1:]}"] = (f"{1000 * lat[b]['compressed_s']:.1f} ms "
                                               f"({lat[b]['speedup']:.2f}x)")
            row["evaluations"] = r["evaluations"]
            rows.append(row)
            best_rows.append({"budget": r["budget"], "objective": r["objective"], **s})
            headline.append({"configuration": f"search, budget {r['budget']:g} pp ({r['objective']}, {options_label(cfg)})",
                             "top-1": pct(s["top1"]), "drop (pp)": drop(s['top1_delta']),
                             "MACs saved": f"{100 * s['mac_reduction']:.1f}%", "parameters": f"{s['params']:,}"})
        d.para("Greedy per-layer k (explorer.search: ranked by MACs saved per estimated point lost, every step "
               "verified on the full test split, backing off when the budget is exceeded). Latency: compressed net, "
               "in parentheses the speed-up over the original ResNet20.")
        d.table(rows)
        for b in best_rows:
            d.para(f"Budget {b['budget']:g} pp ({b['objective']}, {options_label(ClusteringConfig.from_dict(b['config']))}): "
                   f"ks {ks_text(b['config']['ks'])}")
        for rk, r in sdoc.get("runs", {}).items():
            sp = r.get("seed_spread")
            if sp and r.get("best"):
                d.para(f"Budget {r['budget']:g} pp ({options_label(ClusteringConfig.from_dict(r['best']['config']))}): "
                       f"over {len(sp['seeds'])} k-means seeds the chosen ks give top-1 {pct(sp['min'])} to "
                       f"{pct(sp['max'])} (median {pct(sp['median'])}); chosen on held-out training images, "
                       f"measured on the test split.")
        uni = [sdoc["evaluations"][k] for k in sdoc.get("uniform", []) if k in sdoc["evaluations"]]
        d.para("Uniform k in every layer, same options, for comparison:")
        d.table([{"k": max(u["config"]["ks"].values()) if u["config"]["ks"] else "-", "options": options_label(
            ClusteringConfig.from_dict(u["config"])), "top-1": pct(u["top1"]), "drop (pp)": drop(-u['drop_pts'] / 100),
                  "MACs saved": f"{100 * u['mac_reduction']:.1f}%", "params": f"{u['params']:,}"} for u in uni])
        numbers["best"] = best_rows

    # 4b. clustering vs pruning at the same MACs
    base_dir = (sensitivity_path or search_path).parent if (sensitivity_path or search_path) else None
    bpath = base_dir / f"{h['checkpoint']}{baselines.SUFFIX}" if base_dir is not None else None
    if bpath is not None and bpath.is_file():
        d.heading("Clustering vs pruning at the same MACs, before fine-tuning")
        bt = baselines.table(ckpt.read_json(bpath))
        d.para("The blocks' first convs reduced to the same k by clustering (BN folded, clusters merged) or by "
               "pruning with Torch-Pruning's importance criteria (L1 norm, FPGM, first-order Taylor, random); "
               "the same MACs, the same recoveries on the same training images. Top-1 on the test split.")
        for label, g in bt.groupby("label", sort=False):
            piv = (g.pivot_table(index="method", columns="recovery", values="top1", sort=False) * 100).round(2)
            d.para(f"{label}: {100 * g['mac_reduction'].iloc[0]:.1f}% fewer MACs (top-1 %)")
            d.table([{"method": m, **{c: f"{v:.2f}" for c, v in r.items()}} for m, r in piv.iterrows()])
        d.chart("baselines", charts.baselines_chart(bt, subtitle=data_name))
        numbers["baselines"] = bt.to_dict("records")

    # 4c. clustering vs pruning after the same fine-tuning
    ftt = baselines.finetuned_table(ft_metas)
    if not ftt.empty and ftt["method"].str.startswith("pruning").any():
        d.heading("Clustering vs pruning after fine-tuning")
        d.para("Same loop, recipe and epochs for every run. merged and pruning runs train the smaller net itself "
               "(plain SGD), starting from the reduced net after its recovery (least squares on training images); "
               "tied runs train the full-width net with cluster-averaged gradients; centripetal runs start from the "
               "base weights and pull each cluster together. Top-1 on the test split, fp32.")
        d.table([{"run": r.name, "method": r.method, "epochs": r.epochs, "distill": f"{r.distill:g}",
                  "MACs saved": f"{100 * r.mac_reduction:.1f}%", "before": pct(r.before), "after": pct(r.after),
                  "drop (pp)": f"{r.drop_pts:.2f}"} for r in ftt.itertuples()])
        d.chart("finetuned_comparison", charts.finetuned_comparison_chart(ftt, subtitle=data_name))
        numbers["finetuned_comparison"] = ftt.to_dict("records")

    # 5. fine-tuning
    d.heading("Fine-tuning recovery")
    done = [m for m in ft_metas if m.get("recovery")]
    if not done:
        d.para("No fine-tuned checkpoint of this base yet: run `python -m explorer.finetune --config CFG.json` "
               "(see its --help).")
    else:
        curves = pd.DataFrame([{"run": m["name"], **p} for m in done for p in m["recovery"]])
        d.chart("recovery", charts.recovery_chart(curves, base_top1))
        rows = []
        for m in done:
            c = m.get("compression") or {}
            after = (m.get("after") or {}).get("top1")
            rows.append({"run": m["name"], "status": m.get("status"), "epochs": m.get("epochs_done"),
                         "options": (baselines.method_label(m) if is_pruned(m)
                                     else options_label(ClusteringConfig.from_dict(m["clustering"]))),
                         "before": pct(m["before"]["top1"]), "after": pct(after) if after is not None else "-",
                         "drop after (pp)": drop(after - base_top1) if after is not None else "-",
                         "MACs saved": f"{100 * c['mac_reduction']:.1f}%" if c else "-",
                         "params": f"{c['params']:,}" if c else "-"})
            if m.get("status") == "complete":
                headline.append({"configuration": f"{m['name']} (fine-tuned {m['epochs_done']} epochs)",
                                 "top-1": pct(after), "drop (pp)": drop(after - base_top1),
                                 "MACs saved": f"{100 * c['mac_reduction']:.1f}%", "parameters": f"{c['params']:,}"})
        d.table(rows)
        for m in done:
            if m.get("per_class_rows"):
                d.para(f"{m['name']}: per-class accuracy, baseline -> clustered -> fine-tuned")
                d.table([{"class": r["class"], "baseline": pct(r["baseline"]), "before": pct(r["before"]),
                          "after": pct(r["after"]), "after - baseline (pp)": pp(r["after"] - r["baseline"])}
                         for r in m["per_class_rows"]])
                pcd = pd.DataFrame([{"class": r["class"], "variant": v, "delta": r[v] - r["baseline"]}
                                    for r in m["per_class_rows"] for v in ("before", "after")])
                d.chart(f"finetune_per_class_{m['name']}", charts.per_class_chart(
                    pcd, title=f"{m['name']}: per-class change vs baseline, before and after fine-tuning"))
        numbers["finetune"] = [{k: m.get(k) for k in ("name", "status", "before", "after", "recovery", "clustering",
                                                       "compression")} for m in done]

    # 6. metric and granularity comparison
    d.heading("Euclidean vs cosine, filters vs kernels")
    comp = []
    for k in compare_ks:
        for metric in ("euclidean", "cosine"):
            for gran in ("filter", "kernel"):
                for recal in ((0, recalibrate) if recalibrate else (0,)):
                    s = run(ClusteringConfig.uniform(k, metric=metric, granularity=gran, recalibrate_bn=recal))
                    comp.append({"k": k, "metric": metric, "granularity": gran, "recalibrate": bool(recal),
                                 "top1": s["top1"], "mac_reduction": s["mac_reduction"], "params": s["params"]})
    cdf = pd.DataFrame(comp)
    d.para("Same k in every layer. Filter granularity clusters whole filters (structural savings); kernel "
           "granularity clusters the 3x3 kernels of each layer into k shared kernels (the first write-up's variant), "
           "which saves storage with a codebook but no MACs in this implementation.")
    d.chart("comparison", charts.comparison_chart(cdf))
    d.table([{"k": r["k"], "metric": r["metric"], "granularity": r["granularity"],
              "BN re-estimated": "yes" if r["recalibrate"] else "no", "top-1": pct(r["top1"]),
              "drop (pp)": drop(r['top1'] - base_top1), "MACs saved": f"{100 * r['mac_reduction']:.1f}%"}
             for r in comp])
    numbers["comparison"] = comp

    # headline + files
    d.heading("Headline")
    d.table(headline)
    (out / "headline.md").write_text(
        f"Results on {data_name} ({h['test_images']:,} test images, fp32), checkpoint `{h['checkpoint']}`:\n\n"
        + md_table(headline) + "\n")
    if d.png_error:
        d.para(f"PNG charts were not rendered ({d.png_error}); install vl-convert-python for them.")
    md, page = d.write(f"Filter clustering of ResNet20: analysis ({data_name})")
    doc["numbers"] = numbers
    doc["files"] = [md.name, page.name, "headline.md"] + [f"{n}.png" for n, _ in d.charts if d.png]
    save()
    return doc


def options_label(cfg: ClusteringConfig, long: bool = False) -> str:
    """The clustering options of ``cfg`` in words ("euclidean, BN folded, BN re-est. 2000", with
    clustered residual streams "streams 14/28/56" or "streams s2 28"); ``long`` spells the
    re-estimation and the streams out (the app's wording)."""
    parts = [cfg.metric]
    if cfg.fold_bn:
        parts.append("BN folded")
    if cfg.space == "data":
        parts.append("data-aware space")
    if cfg.recovery == "lsq":
        parts.append(f"least squares ({cfg.recalibrate_bn:,} images)" if long else f"lsq {cfg.recalibrate_bn}")
    elif cfg.recalibrate_bn:
        parts.append(f"BN re-estimated ({cfg.recalibrate_bn:,} images)" if long else f"BN re-est. {cfg.recalibrate_bn}")
    if cfg.seeds > 1:
        parts.append(f"best of {cfg.seeds} seeds")
    if cfg.active_stream:
        st = sorted(cfg.active_stream.items())
        # all three stages: "14/28/56"; else the stages named ("s2 28")
        ks = "/".join(str(k) for _, k in st) if len(st) == 3 else ", ".join(f"s{s} {k}" for s, k in st)
        parts.append(f"residual streams k {ks}" if long else f"streams {ks}")
    return ", ".join(parts)


def finetuned_points(metas: list[dict], baseline_top1: float) -> pd.DataFrame:
    """The finished fine-tuning results among ``metas`` as extra rows (source "fine-tuned") for
    :func:`explorer.analysis.charts.pareto_chart`, in the columns of
    :func:`explorer.analysis.search.pareto_table`. Empty when none is finished.

    A pruning baseline's run (:func:`explorer.training.finetune.is_pruned`: metadata ``pruning``,
    no ``clustering``) is a row of its own source, "fine-tuned, pruned"."""
    rows = []
    for m in metas:
        if m.get("status") != "complete":
            continue
        c, pruned = m["compression"], is_pruned(m)
        rows.append({"source": "fine-tuned, pruned" if pruned else "fine-tuned", "top1": m["after"]["top1"],
                     "drop_pts": 100 * (baseline_top1 - m["after"]["top1"]),
                     "macs": c["macs"], "params": c["params"], "mac_reduction": c["mac_reduction"],
                     "compression_ratio": c["compression_ratio"],
                     "config": json.dumps(m["pruning" if pruned else "clustering"]["ks"]), "pareto_macs": False,
                     "pareto_params": False})
    return pd.DataFrame(rows)
