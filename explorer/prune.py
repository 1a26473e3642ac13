"""Prune a checkpoint by filter clustering and report: ``python -m explorer.prune``.

Examples::

    python -m explorer.prune --k 3                       # every conv layer to k = 3 (the first write-up)
    python -m explorer.prune --layer layer3.2.conv2=16 --layer layer3.1.conv1=32 --fold-bn
    python -m explorer.prune --k 8 --recalibrate-bn 2000 --json
    python -m explorer.prune --k 8 --fold-bn --save out/   # writes the compressed model + ONNX
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from . import checkpoints as ckpt
from .clustering import GRANULARITIES, METRICS, ClusteringConfig, ClusteringError
from .compress import export_onnx, save_compressed
from .data import DataNotFoundError
from .pipeline import Explorer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m explorer.prune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(ckpt.DEFAULT_DIR / f"{ckpt.DEFAULT_NAME}.pt"),
                   help="ResNet20 state dict (.pt) to prune (default: the shipped checkpoint)")
    p.add_argument("--data", default=None, help="local CIFAR-10 directory (default $EXPLORER_DATA, else download)")
    p.add_argument("--k", type=int, default=None, help="cluster count for every conv layer (capped at its filters)")
    p.add_argument("--layer", action="append", default=[], metavar="NAME=K",
                   help="cluster count for one layer, e.g. layer3.2.conv2=16 (repeatable; overrides --k)")
    p.add_argument("--metric", choices=METRICS, default="euclidean", help="k-means metric")
    p.add_argument("--granularity", choices=GRANULARITIES, default="filter", help="cluster filters or 2D kernels")
    p.add_argument("--fold-bn", action="store_true", help="cluster BN-folded filters (lets both convs of a block shrink)")
    p.add_argument("--recalibrate-bn", type=int, default=0, metavar="N",
                   help="re-estimate BatchNorm statistics on N training images after clustering (0 = off)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed")
    p.add_argument("--n-init", type=int, default=3, help="k-means restarts")
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
    base = ClusteringConfig.uniform(args.k) if args.k is not None else ClusteringConfig()
    if args.k is not None and args.k < 1:
        raise ClusteringError(f"--k must be >= 1, got {args.k}")
    ks = dict(base.ks)
    for item in args.layer:
        name, sep, k = item.partition("=")
        if not sep:
            raise ClusteringError(f"--layer expects NAME=K, got {item!r}")
        try:
            ks[name.strip()] = int(k)
        except ValueError:
            raise ClusteringError(f"--layer {item!r}: K must be an integer") from None
    return ClusteringConfig(ks=ks, metric=args.metric, granularity=args.granularity, fold_bn=args.fold_bn,
                            recalibrate_bn=args.recalibrate_bn, seed=args.seed, n_init=args.n_init).validate()


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
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config = config_from_args(args)
        explorer = Explorer.from_checkpoint(args.checkpoint, args.data)
        result = explorer.run(config, latency_batches=(1, 256) if args.latency else ())
        summary = result.summary()
        summary["checkpoint"] = args.checkpoint
        summary["dataset"] = explorer.data.identity.to_dict()
        if args.save:
            name = f"{explorer.name}_clustered"
            pt, js = save_compressed(result.compressed, args.save, name,
                                     extra={"clustering": config.to_dict(), "source": explorer.name,
                                            "top1": result.evaluation.top1, "dataset": explorer.data.identity.to_dict()})
            onnx = export_onnx(result.compressed, pt.with_suffix(".onnx"))
            summary["saved"] = [str(pt), str(js), str(onnx)]
    except (ClusteringError, ckpt.CheckpointError, DataNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{explorer.name} on {explorer.data.identity.name}; {len(config.active)} layers clustered "
              f"({config.metric}, {config.granularity}{', BN folded' if config.fold_bn else ''}"
              f"{f', BN re-estimated on {config.recalibrate_bn} images' if config.recalibrate_bn else ''})")
        print(format_table(summary))
        for path in summary.get("saved", []):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
