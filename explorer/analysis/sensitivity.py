"""Per-layer sensitivity to clustering (:func:`sweep`; command line: ``python -m explorer.sensitivity``).

For each conv layer L (19 in ResNet20, or a subset) and each k of the grid 1, 2, 4, 8, 16, 32, 64
up to L's filter count, cluster *only* L to k and evaluate the net on the test split (fp32, exact,
through :meth:`explorer.pipeline.Explorer.run`): top-1 and per-class accuracy, their deltas against
the unclustered checkpoint, and the compressed net's MACs and parameters. k = filter count is the
reference point (delta exactly 0). Changing only layer L reuses the engine's cached activations up
to L's unit, so a sweep costs far fewer than one full pass per point (docs/engine.md, "Analyses").

Resumable: every point is stored under a key (layer, k and the clustering options) in
``checkpoints/<name>.sensitivity.json``, rewritten atomically after each point; a rerun skips the
points already there, and sweeps with other options add to the same file. The header pins the
checkpoint's weights and the test set (:mod:`.results`). :func:`load_sensitivity` returns the
results as a tidy pandas DataFrame for the app and the report.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from .. import checkpoints as ckpt
from .. import limits
from ..clustering import ClusteringConfig, ClusteringError
from ..data import CLASSES
from ..model import CONV_LAYER_NAMES, conv_layer
from .results import header, open_results, save_results

K_GRID = (1, 2, 4, 8, 16, 32, 64)
SUFFIX = ".sensitivity.json"


def k_grid(filters: int, grid: tuple[int, ...] = K_GRID) -> list[int]:
    """Grid values below ``filters`` plus ``filters`` itself (the unclustered reference), ascending."""
    return sorted({k for k in grid if k < filters} | {filters})


def options_key(config: ClusteringConfig) -> str:
    """The clustering options of ``config`` without its ks, as a canonical JSON string."""
    d = config.to_dict()
    d.pop("ks")
    return json.dumps(d, sort_keys=True, separators=(",", ":"))


def point_key(layer: str, k: int, options: ClusteringConfig) -> str:
    """Key of one sensitivity point: ``"<layer>|<k>|<options JSON>"``."""
    return f"{layer}|{k}|{options_key(options)}"


def plan(layers: list[str], options: list[ClusteringConfig], grid: tuple[int, ...] = K_GRID
         ) -> list[tuple[str, int, ClusteringConfig]]:
    """All (layer, k, options) points, options outermost, then layers in forward order, then k
    descending (so the cheap reference point comes first). Raises ClusteringError for an unknown
    layer."""
    for name in layers:
        if name not in CONV_LAYER_NAMES:
            raise ClusteringError(f"unknown conv layer {name!r}; valid names: {', '.join(CONV_LAYER_NAMES)}")
    ordered = [n for n in CONV_LAYER_NAMES if n in set(layers)]
    return [(n, k, o) for o in options for n in ordered for k in reversed(k_grid(conv_layer(n).filters, grid))]


def measure_point(explorer, layer: str, k: int, options: ClusteringConfig) -> dict:
    """Cluster only ``layer`` to ``k`` (with ``options``' metric, granularity, BN options) and
    evaluate on the explorer's test split. Returns a JSON-ready record; accuracies are fractions in
    [0, 1], deltas are (clustered - baseline) fractions, MACs per image."""
    t = time.perf_counter()
    cfg = replace(options, ks={}).with_k(layer, k).validate()
    res = explorer.run(cfg)
    sel, sel_base = explorer.select_top1(cfg)
    c = res.compression
    info = conv_layer(layer)
    return {
        "layer": layer, "layer_index": CONV_LAYER_NAMES.index(layer), "stage": info.stage,
        "filters": info.filters, "k": int(k),
        "metric": options.metric, "granularity": options.granularity, "fold_bn": options.fold_bn,
        "recalibrate_bn": options.recalibrate_bn, "seed": options.seed, "n_init": options.n_init,
        "space": options.space, "recovery": options.recovery, "seeds": options.seeds,
        "top1": res.evaluation.top1, "top1_delta": res.comparison.top1_delta,
        # held-out *training* images: what the search ranks and budgets with (test only measures)
        "select_top1": sel, "select_drop_pts": 100.0 * (sel_base - sel) + 0.0,
        "per_class": res.evaluation.per_class_dict(),
        "per_class_delta": {cl: float(d) for cl, d in zip(CLASSES, res.comparison.per_class_delta)},
        "macs": c.macs, "params": c.params, "baseline_macs": c.baseline_macs, "baseline_params": c.baseline_params,
        "seconds": round(time.perf_counter() - t, 3),
    }


def sweep(explorer, path: str | Path, layers: list[str] | None = None,
          options: list[ClusteringConfig] | None = None, grid: tuple[int, ...] = K_GRID, restart: bool = False,
          progress: bool = True, max_points: int | None = None) -> dict:
    """Run (or resume) the sweep; returns the result document ``{"header", "points": {key: record}}``.

    Points already in the file at ``path`` are skipped; each new point is written atomically as
    soon as it is measured. ``max_points`` stops after that many new points (tests, trial runs).
    Raises ResultsMismatch when the file belongs to other weights or data, ClusteringError for a
    bad layer or option.
    """
    from tqdm import tqdm

    layers = list(layers or CONV_LAYER_NAMES)
    options = options or [ClusteringConfig()]
    for o in options:
        o.validate()
        if o.active_stream:
            raise ClusteringError("the sensitivity sweep clusters one layer at a time; it does not take a stream k "
                                  "(--stream-k) yet")
    todo = plan(layers, options, grid)
    # A fine-tuned checkpoint holds fewer distinct filters than its filter count in the layers it
    # was clustered in: a k between the two cannot be clustered, so such points are left out.
    skipped = [p for p in todo if limits.problems(explorer.model, replace(p[2], ks={}).with_k(p[0], p[1]))]
    todo = [p for p in todo if p not in skipped]
    if skipped and progress:
        print(f"sensitivity: {len(skipped)} points left out, above their layer's distinct filters "
              f"(e.g. {skipped[0][0]} k = {skipped[0][1]})", file=sys.stderr)
    doc = open_results(path, header(explorer), restart=restart)
    points = doc.setdefault("points", {})
    missing = [p for p in todo if point_key(*p) not in points or "select_top1" not in points[point_key(*p)]]
    if max_points is not None:
        missing = missing[:max_points]
    done = sum(point_key(*p) in points for p in todo)
    bar = tqdm(total=len(todo), initial=done,
               desc="sensitivity", unit="pt", disable=not progress, mininterval=1.0)
    for layer, k, o in missing:
        bar.set_postfix_str(f"{layer} k={k} {o.metric}", refresh=False)
        rec = measure_point(explorer, layer, k, o)
        points[point_key(layer, k, o)] = rec
        save_results(doc, path)
        bar.update(1)
    bar.close()
    if not missing and not Path(path).is_file():
        save_results(doc, path)
    return doc


def load_sensitivity(path: str | Path, per_class: bool = False):
    """The sweep at ``path`` as a tidy pandas DataFrame, one row per point, sorted by options,
    layer (forward order) and k. Columns: layer, layer_index, stage, filters, k, metric,
    granularity, fold_bn, recalibrate_bn, seed, n_init, top1, top1_delta (fractions), drop_pts
    (= -100 * top1_delta, accuracy points lost), macs, params, mac_reduction, baseline_top1,
    seconds, and per class ``delta_<class>`` (fractions).

    ``per_class=True`` returns the long form instead: one row per point and class with columns
    layer, layer_index, k, metric, granularity, fold_bn, recalibrate_bn, class, accuracy, delta.

    Raises CheckpointError when the file is missing or unreadable.
    """
    import pandas as pd

    doc = ckpt.read_json(path)
    base = doc.get("header", {}).get("baseline_top1")
    rows = []
    for rec in doc.get("points", {}).values():
        r = {k: v for k, v in rec.items() if k not in ("per_class", "per_class_delta")}
        r.setdefault("space", "weight")
        r.setdefault("recovery", "bn" if rec.get("recalibrate_bn") else "none")
        r.setdefault("seeds", 1)
        r.setdefault("select_drop_pts", float("nan"))
        r["drop_pts"] = -100.0 * rec["top1_delta"] + 0.0
        r["mac_reduction"] = 1.0 - rec["macs"] / rec["baseline_macs"]
        r["baseline_top1"] = base
        if per_class:
            for cl in CLASSES:
                rows.append({**{k: r[k] for k in ("layer", "layer_index", "k", "metric", "granularity", "fold_bn",
                                                   "recalibrate_bn", "space", "recovery")},
                             "class": cl, "accuracy": rec["per_class"][cl], "delta": rec["per_class_delta"][cl]})
        else:
            for cl in CLASSES:
                r[f"delta_{cl}"] = rec["per_class_delta"][cl]
            rows.append(r)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    return df.sort_values(["space", "recovery", "metric", "granularity", "fold_bn", "recalibrate_bn", "layer_index", "k"]
                          + (["class"] if per_class else [])).reset_index(drop=True)


def drop_table(df, options: ClusteringConfig, column: str = "drop_pts") -> dict[str, dict[int, float]]:
    """{layer: {k: accuracy points lost}} for the rows of ``df`` (from :func:`load_sensitivity`)
    measured with ``options``' metric, granularity, fold_bn, recalibrate_bn, seed, n_init, space,
    recovery and seeds. ``column``: ``"drop_pts"`` (test split, for reports) or
    ``"select_drop_pts"`` (held-out training images, for choices; points without it are left out)."""
    if df.empty:
        return {}
    m = ((df.metric == options.metric) & (df.granularity == options.granularity) & (df.fold_bn == options.fold_bn)
         & (df.recalibrate_bn == options.recalibrate_bn) & (df.seed == options.seed) & (df.n_init == options.n_init)
         & (df.space == options.space) & (df.recovery == options.recovery) & (df.seeds == options.seeds))
    out: dict[str, dict[int, float]] = {}
    for r in df[m].itertuples():
        v = float(getattr(r, column))
        if v == v:  # not NaN
            out.setdefault(r.layer, {})[int(r.k)] = v
    return out
