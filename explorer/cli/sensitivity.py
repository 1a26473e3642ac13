"""``python -m explorer.sensitivity``: each layer alone at k = 1, 2, 4, ... (:func:`explorer.analysis.sensitivity.sweep`)."""
from __future__ import annotations

import time
from pathlib import Path

from ..analysis.results import beside
from ..analysis.sensitivity import K_GRID, SUFFIX, plan, sweep
from ..clustering import METRICS, ClusteringError
from .common import add_analysis_args, add_clustering_args, clustering_options, explorer_from_args, parser, run

EXAMPLES = """
python -m explorer.sensitivity                                  # euclidean, all 19 layers
python -m explorer.sensitivity --metric both --recalibrate-bn 2000
python -m explorer.sensitivity --layers conv1 layer3.2.conv2 --test-per-class 100   # quick trial
"""


def build_parser():
    p = parser("sensitivity", "Cluster one layer at a time to each k of a grid and evaluate (resumable: "
                              "checkpoints/<name>.sensitivity.json).", EXAMPLES)
    add_analysis_args(p)
    add_clustering_args(p, metrics=(*METRICS, "both"))
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

    def body() -> int:
        if any(k < 1 for k in args.ks):
            raise ClusteringError("--ks must be >= 1")
        metrics = list(METRICS) if args.metric == "both" else [args.metric]
        options = [clustering_options(args, metric=m) for m in metrics]
        if args.layers:
            plan(args.layers, options, tuple(args.ks))  # validate names before loading anything
        explorer = explorer_from_args(args)
        t = time.perf_counter()
        doc = sweep(explorer, out, args.layers, options, tuple(args.ks), restart=args.restart,
                    progress=not args.quiet, max_points=args.max_points)
        print(f"{len(doc.get('points', {}))} points in {out} ({time.perf_counter() - t:.0f} s this run); "
              f"baseline top-1 {100 * doc['header']['baseline_top1']:.2f}% on {doc['header']['dataset']['name']}")
        return 0

    return run(body, f"interrupted; rerun the same command to continue ({out} holds the finished points)")
