"""Clustering against plain pruning at the same MACs, before any fine-tuning
(``python -m explorer.baselines``): the same layers (the blocks' first convs) reduced to the same
k, the same recoveries (none, BN re-estimation, least squares), evaluated by the same engine on
the same test split. Resumable: every measured row lands in ``checkpoints/<name>.baselines.json``.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import pruning
from ..clustering import ClusteringConfig
from ..compress import compress, count_macs
from ..training.finetune import is_pruned
from .results import header, open_results, save_results

SUFFIX = ".baselines.json"
RECOVERIES = ("none", "bn", "lsq")
CLUSTERING = {"clustering (weight space)": "weight", "clustering (data-aware)": "data"}


def _row(method, recovery, ks, ev, macs, baseline_top1, baseline_macs, seconds) -> dict:
    return {"method": method, "recovery": recovery, "ks": dict(ks), "top1": ev.top1,
            "drop_pts": 100.0 * (baseline_top1 - ev.top1) + 0.0, "macs": int(macs),
            "mac_reduction": 1 - macs / baseline_macs, "per_class": ev.per_class_dict(), "seconds": round(seconds, 2)}


def recovered(explorer, masked: torch.nn.Module, ks: dict[str, int], recovery: str) -> torch.nn.Module:
    """A copy of the masked pruned net after ``recovery`` ("none", "bn", "lsq"):
    :func:`explorer.pruning.recover` against the explorer's base model, on its training images."""
    return pruning.recover(explorer.model, masked, ks, recovery, explorer.data.train_images)


def compare(explorer, path: str | Path, ks: dict[str, int], label: str, criteria=pruning.CRITERIA,
            recoveries=RECOVERIES, progress: bool = True) -> dict:
    """Measure (or resume) every method x recovery for the per-layer ``ks`` (blocks' first convs),
    under ``label`` in the result file at ``path``; returns the document
    ``{"header", "points": {label: {"ks", "rows": {method|recovery: row}}}}``. Clustering uses
    ``fold_bn`` (so its clusters merge into the same smaller structure as pruning). Raises
    ResultsMismatch for a file of other weights or data, PruningError for a bad layer."""
    doc = open_results(path, header(explorer), restart=False)
    point = doc.setdefault("points", {}).setdefault(label, {"ks": dict(ks), "rows": {}})
    rows = point["rows"]
    base, base_macs = explorer.baseline.top1, explorer.run(ClusteringConfig()).compression.baseline_macs
    todo = [(m, r) for m in CLUSTERING for r in RECOVERIES if r in recoveries]
    todo += [(f"pruning ({c})", r) for c in criteria for r in recoveries]
    masked: dict[str, tuple] = {}
    for method, rec in todo:
        key = f"{method}|{rec}"
        if key in rows:
            continue
        t = time.perf_counter()
        if method in CLUSTERING:
            cfg = ClusteringConfig(ks=ks, fold_bn=True, space=CLUSTERING[method], recovery=rec)
            res = explorer.run(cfg)
            ev, macs = res.evaluation, res.compression.macs
        else:
            criterion = method[len("pruning ("):-1]
            if criterion not in masked:  # scored and masked once per criterion, for all recoveries
                m, kept = pruning.prune(explorer.model, ks, criterion, explorer.data.train_images,
                                        explorer.data.train_labels)
                masked[criterion] = (m, count_macs(pruning.pruned_structure(m, kept)))
            m, macs = masked[criterion]
            ev = explorer.engine.evaluate(compress(recovered(explorer, m, ks, rec)))
        rows[key] = _row(method, rec, ks, ev, macs, base, base_macs, time.perf_counter() - t)
        save_results(doc, path)
        if progress:
            r = rows[key]
            print(f"{label}: {method:28s} {rec:5s} top-1 {100 * r['top1']:6.2f}%  MACs -{100 * r['mac_reduction']:.1f}%",
                  flush=True)
    return doc


def table(doc: dict):
    """All rows as a pandas DataFrame: label, method, recovery, top1, drop_pts, macs, mac_reduction."""
    import pandas as pd

    out = []
    for label, p in doc.get("points", {}).items():
        for r in p["rows"].values():
            out.append({"label": label, **{k: r[k] for k in ("method", "recovery", "top1", "drop_pts", "macs",
                                                              "mac_reduction")}})
    return pd.DataFrame(out)


def method_label(meta: dict) -> str:
    """How a fine-tuned run reduced the net, from its metadata: "pruning (fpgm)", "clustering
    (data-aware, merged)", "clustering (weight space, centripetal)", "clustering (data-aware,
    merged, residual streams)" (a clustered residual stream, ``ClusteringConfig.stream``)..."""
    ft = meta.get("finetune", {})
    name = ft.get("method_name", "tied")
    if is_pruned(meta):
        return f"pruning ({ft.get('pruning')})"
    clustering = meta.get("clustering") or {}
    space = "data-aware" if clustering.get("space") == "data" else "weight space"
    # Parsed like _started_from parses the same metadata: the configuration's own active_stream.
    streams = ", residual streams" if ClusteringConfig.from_dict(clustering).active_stream else ""
    return f"clustering ({space}, {name}{streams})"


def _started_from(meta: dict) -> str:
    """The recovery a run's reduced net had when training started: the pruning path records it
    itself; a clustering's comes from its configuration (where a legacy ``recalibrate_bn`` means
    BN re-estimation)."""
    recorded = meta.get("finetune", {}).get("recovery")
    return recorded or ClusteringConfig.from_dict(meta.get("clustering") or {}).recovery


def finetuned_table(metas: list[dict]):
    """Finished fine-tuning runs (metadata of :func:`explorer.training.finetune.list_finetuned`) as
    a DataFrame, one row per run: name, method (:func:`method_label`), recovery it started from,
    epochs, distill, mac_reduction, before and after top-1 (fractions), drop_pts (after, vs the
    baseline). ``recovery`` is what training started from: the reduced net after that recovery, or
    "base weights" for centripetal runs (which start unclustered; their "before" is the hard
    clustering with the recovery, for comparison). Runs still training are left out; their numbers are not comparable yet."""
    import pandas as pd

    rows = []
    for m in metas:
        if m.get("status") != "complete" or not m.get("after") or not m.get("compression"):
            continue
        hp = m["finetune"].get("hyperparameters", {})
        base = float(m["baseline"]["top1"])
        centripetal = m["finetune"].get("method_name") == "centripetal"  # trains from the base weights
        rows.append({"name": m["name"], "method": method_label(m),
                     "recovery": "base weights" if centripetal else _started_from(m),
                     "epochs": int(m.get("epochs_done", hp.get("epochs", 0))), "distill": float(hp.get("distill", 0)),
                     "mac_reduction": float(m["compression"]["mac_reduction"]),
                     "before": float(m["before"]["top1"]), "after": float(m["after"]["top1"]),
                     "drop_pts": 100.0 * (base - float(m["after"]["top1"])) + 0.0})
    return pd.DataFrame(rows, columns=["name", "method", "recovery", "epochs", "distill", "mac_reduction", "before",
                                       "after", "drop_pts"])
