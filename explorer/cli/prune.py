"""``python -m explorer.prune``: cluster a checkpoint's filters, evaluate and report
(:meth:`explorer.pipeline.Explorer.run`)."""
from __future__ import annotations

import json

from ..analysis.results import default_checkpoint
from ..clustering import ClusteringConfig, ClusteringError
from ..compress import export_onnx, save_compressed
from ..pipeline import Explorer
from .common import DATA_HELP, add_clustering_args, clustering_options, parser, run, set_threads

EXAMPLES = """
python -m explorer.prune --k 3                       # every conv layer to k = 3 (the first write-up)
python -m explorer.prune --layer layer3.2.conv2=16 --layer layer3.1.conv1=32 --fold-bn --latency
python -m explorer.prune --k 8 --recalibrate-bn 2000 --json
python -m explorer.prune --config config.json --save out/   # compressed .pt + .json + .onnx
"""


def build_parser():
    p = parser("prune", "Cluster each conv layer's filters (k-means), build the structurally smaller net, and "
                        "report per-class accuracy, parameters, MACs and latency.", EXAMPLES)
    p.add_argument("--checkpoint", default=default_checkpoint(), help="ResNet20 state dict (.pt) to prune")
    p.add_argument("--data", default=None, help=DATA_HELP)
    p.add_argument("--k", type=int, default=None, help="cluster count for every conv layer (capped at its filters)")
    p.add_argument("--layer", action="append", default=[], metavar="NAME=K",
                   help="cluster count for one layer, e.g. layer3.2.conv2=16 (repeatable; overrides --k)")
    add_clustering_args(p)
    p.add_argument("--config", default=None, help="a configuration JSON file (as downloaded from the app)")
    p.add_argument("--latency", action="store_true", help="also time compressed vs original at batch 1 and 256")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--save", default=None, metavar="DIR", help="write the compressed model (.pt, .json, .onnx) to DIR")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    return p


def config_from_args(args) -> ClusteringConfig:
    """Build and validate the configuration. Raises ClusteringError."""
    if args.config:
        try:
            with open(args.config) as f:
                return ClusteringConfig.from_json(f.read())
        except (OSError, UnicodeDecodeError) as e:
            raise ClusteringError(f"cannot read --config: {e}") from None
    if args.k is not None and args.k < 1:
        raise ClusteringError(f"--k must be >= 1, got {args.k}")
    ks = dict(ClusteringConfig.uniform(args.k).ks) if args.k is not None else {}
    for item in args.layer:
        name, sep, k = item.partition("=")
        if not sep:
            raise ClusteringError(f"--layer expects NAME=K, got {item!r}")
        try:
            ks[name.strip()] = int(k)
        except ValueError:
            raise ClusteringError(f"--layer {item!r}: K must be an integer") from None
    return clustering_options(args, ks=ks)


def format_table(summary: dict) -> str:
    """Plain-text report: per-class baseline / pruned / delta, then top-1, params, MACs, ratios."""
    lines = [f"{'class':>10}  {'baseline':>8}  {'pruned':>8}  {'delta':>7}"]
    for r in summary["per_class"]:
        lines.append(f"{r['class']:>10}  {100 * r['baseline']:7.2f}%  {100 * r['pruned']:7.2f}%  {100 * r['delta']:+7.2f}")
    lines.append(f"{'top-1':>10}  {100 * summary['baseline_top1']:7.2f}%  {100 * summary['top1']:7.2f}%  "
                 f"{100 * summary['top1_delta']:+7.2f}")
    lines.append("")
    lines.append(f"unique parameters: {summary['params']:,} (baseline {summary['baseline_params']:,}), "
                 f"compression ratio {summary['compression_ratio']:.2f}x")
    lines.append(f"MACs per image:    {summary['macs']:,} (baseline {summary['baseline_macs']:,}), "
                 f"{100 * summary['mac_reduction']:.1f}% fewer")
    for b, v in (summary.get("latency") or {}).items():
        lines.append(f"latency batch {b[1:]:>3}: {1000 * v['compressed_s']:.2f} ms vs {1000 * v['baseline_s']:.2f} ms "
                     f"(speed-up {v['speedup']:.2f}x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_threads(args.threads)

    def body() -> int:
        config = config_from_args(args)
        explorer = Explorer.from_checkpoint(args.checkpoint, args.data)
        result = explorer.run(config, latency_batches=(1, 256) if args.latency else ())
        summary = result.summary()
        summary["checkpoint"] = args.checkpoint
        summary["dataset"] = explorer.data.identity.to_dict()
        if args.save:
            pt, js = save_compressed(result.compressed, args.save, f"{explorer.name}_clustered",
                                     extra={"clustering": config.to_dict(), "source": explorer.name,
                                            "top1": result.evaluation.top1, "dataset": explorer.data.identity.to_dict()})
            onnx = export_onnx(result.compressed, pt.with_suffix(".onnx"))
            summary["saved"] = [str(pt), str(js), str(onnx)]
        if args.json:
            print(json.dumps(summary, indent=2))
            return 0
        stream = "".join(f", stage-{s} stream k = {k}" for s, k in config.active_stream.items())
        print(f"{explorer.name} on {explorer.data.identity.name}; {len(config.active)} layers clustered{stream} "
              f"({config.metric}, {config.granularity}{', BN folded' if config.fold_bn else ''}"
              f"{f', BN re-estimated on {config.recalibrate_bn} images' if config.recalibrate_bn else ''})")
        print(format_table(summary))
        for path in summary.get("saved", []):
            print(f"wrote {path}")
        return 0

    return run(body)
