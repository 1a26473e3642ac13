"""Per-layer sensitivity to clustering: ``python -m explorer.sensitivity``.

For each conv layer L (19 in ResNet20, or a ``--layers`` subset) and each k of the grid
1, 2, 4, 8, 16, 32, 64 up to L's filter count, cluster *only* L to k and evaluate the net on the
test split (fp32, exact, through :meth:`explorer.pipeline.Explorer.run`): top-1 and per-class
accuracy, their deltas against the unclustered checkpoint, and the compressed net's MACs and
parameters. k = filter count is included as the reference point (delta exactly 0).

Why it is fast: the evaluation engine caches each residual unit's output for all test images
under a chained digest of the weights up to that unit (:mod:`explorer.engine`). Changing only
layer L reuses the checkpoint's activations up to L's unit and recomputes only the units after it,
so a sweep costs about 60 full test passes per metric instead of 113. With ``--recalibrate-bn N``
every BatchNorm is re-estimated after clustering (Li et al. 2017), so every point is a full pass
plus the re-estimation.

Resumable: every point is stored under a key (layer, k and the clustering options) in
``checkpoints/<name>.sensitivity.json`` (``--out``), rewritten atomically after each point. A rerun
skips points that are already there, so an interrupted sweep continues where it stopped and sweeps
with other options (``--metric cosine``, ``--fold-bn``...) add to the same file. The file header
pins the checkpoint's weights and the test set; a rerun against different weights stops with an
error (``--restart`` discards the old file).

Examples::

    python -m explorer.sensitivity                                  # euclidean, all 19 layers
    python -m explorer.sensitivity --metric both --recalibrate-bn 2000
    python -m explorer.sensitivity --layers conv1 layer3.2.conv2 --test-per-class 100   # quick trial

:func:`load_sensitivity` returns the results as a tidy pandas DataFrame for the app and the report.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from . import checkpoints as ckpt
from .analysis_io import (ResultsMismatch, add_common_args, beside, explorer_from_args, header, open_results,
                          save_results)
from .clustering import GRANULARITIES, METRICS, ClusteringConfig, ClusteringError
from .data import CLASSES, DataNotFoundError
from .model import CONV_LAYER_NAMES, conv_layer

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
    c = res.compression
    info = conv_layer(layer)
    return {
        "layer": layer, "layer_index": CONV_LAYER_NAMES.index(layer), "stage": info.stage,
        "filters": info.filters, "k": int(k),
        "metric": options.metric, "granularity": options.granularity, "fold_bn": options.fold_bn,
        "recalibrate_bn": options.recalibrate_bn, "seed": options.seed, "n_init": options.n_init,
        "top1": res.evaluation.top1, "top1_delta": res.comparison.top1_delta,
        "per_class": {cl: float(a) for cl, a in zip(CLASSES, res.evaluation.per_class)},
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
    todo = plan(layers, options, grid)
    doc = open_results(path, header(explorer), restart=restart)
    points = doc.setdefault("points", {})
    missing = [p for p in todo if point_key(*p) not in points]
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
        r["drop_pts"] = -100.0 * rec["top1_delta"] + 0.0
        r["mac_reduction"] = 1.0 - rec["macs"] / rec["baseline_macs"]
        r["baseline_top1"] = base
        if per_class:
            for cl in CLASSES:
                rows.append({**{k: r[k] for k in ("layer", "layer_index", "k", "metric", "granularity", "fold_bn",
                                                   "recalibrate_bn")},
                             "class": cl, "accuracy": rec["per_class"][cl], "delta": rec["per_class_delta"][cl]})
        else:
            for cl in CLASSES:
                r[f"delta_{cl}"] = rec["per_class_delta"][cl]
            rows.append(r)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    return df.sort_values(["metric", "granularity", "fold_bn", "recalibrate_bn", "layer_index", "k"]
                          + (["class"] if per_class else [])).reset_index(drop=True)


def drop_table(df, options: ClusteringConfig) -> dict[str, dict[int, float]]:
    """{layer: {k: accuracy points lost}} for the rows of ``df`` (from :func:`load_sensitivity`)
    measured with ``options``' metric, granularity, fold_bn, recalibrate_bn, seed and n_init."""
    if df.empty:
        return {}
    m = ((df.metric == options.metric) & (df.granularity == options.granularity) & (df.fold_bn == options.fold_bn)
         & (df.recalibrate_bn == options.recalibrate_bn) & (df.seed == options.seed) & (df.n_init == options.n_init))
    out: dict[str, dict[int, float]] = {}
    for r in df[m].itertuples():
        out.setdefault(r.layer, {})[int(r.k)] = float(r.drop_pts)
    return out


def options_from_args(args) -> list[ClusteringConfig]:
    metrics = list(METRICS) if args.metric == "both" else [args.metric]
    return [ClusteringConfig(metric=m, granularity=args.granularity, fold_bn=args.fold_bn,
                             recalibrate_bn=args.recalibrate_bn, seed=args.seed, n_init=args.n_init).validate()
            for m in metrics]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m explorer.sensitivity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--metric", choices=(*METRICS, "both"), default="euclidean", help="k-means metric(s) to sweep")
    p.add_argument("--granularity", choices=GRANULARITIES, default="filter", help="cluster filters or 2D kernels")
    p.add_argument("--fold-bn", action="store_true", help="cluster BN-folded filters")
    p.add_argument("--recalibrate-bn", type=int, default=0, metavar="N",
                   help="re-estimate BatchNorm statistics on N training images after clustering (0 = off)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed")
    p.add_argument("--n-init", type=int, default=3, help="k-means restarts")
    p.add_argument("--layers", nargs="+", default=None, metavar="NAME",
                   help="layers to sweep (default: all 19, e.g. --layers conv1 layer3.2.conv2)")
    p.add_argument("--ks", nargs="+", type=int, default=list(K_GRID), metavar="K",
                   help="k grid (each layer also gets k = its filter count, the reference)")
    p.add_argument("--out", default=None, help="result file (default: checkpoints/<name>.sensitivity.json)")
    p.add_argument("--restart", action="store_true", help="discard an existing result file")
    p.add_argument("--max-points", type=int, default=None, help="stop after this many new points")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out) if args.out else beside(args.checkpoint, SUFFIX)
    try:
        if any(k < 1 for k in args.ks):
            raise ClusteringError("--ks must be >= 1")
        options = options_from_args(args)
        if args.layers:
            plan(args.layers, options, tuple(args.ks))  # validate names before loading anything
        explorer = explorer_from_args(args)
        t = time.perf_counter()
        doc = sweep(explorer, out, args.layers, options, tuple(args.ks), restart=args.restart,
                    progress=not args.quiet, max_points=args.max_points)
    except (ClusteringError, ckpt.CheckpointError, DataNotFoundError, ResultsMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; rerun the same command to continue ({out} holds the finished points)", file=sys.stderr)
        return 130
    n = len(doc.get("points", {}))
    print(f"{n} points in {out} ({time.perf_counter() - t:.0f} s this run); "
          f"baseline top-1 {100 * doc['header']['baseline_top1']:.2f}% on {doc['header']['dataset']['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
