"""``python -m explorer.baselines``: clustering vs Torch-Pruning criteria at the same MACs, before
fine-tuning (:func:`explorer.analysis.baselines.compare`)."""
from __future__ import annotations

from pathlib import Path

from .. import pruning
from ..analysis.baselines import RECOVERIES, SUFFIX, compare, table
from ..analysis.results import beside
from ..clustering import ClusteringConfig, ClusteringError
from .common import add_analysis_args, explorer_from_args, parser, run

EXAMPLES = """
python -m explorer.baselines --config checkpoints/resnet20_cifar10_p58.config.json --label p58
python -m explorer.baselines --config checkpoints/resnet20_cifar10_half.config.json --label half --criteria l1 fpgm
"""


def build_parser():
    p = parser("baselines", "Prune the same layers to the same k with L1, FPGM, Taylor and random importance "
                            "(Torch-Pruning) and compare with clustering at equal MACs, for each recovery "
                            "(resumable: checkpoints/<name>.baselines.json).", EXAMPLES)
    add_analysis_args(p)
    p.add_argument("--config", required=True, help="configuration JSON whose ks (blocks' first convs) set the MACs point")
    p.add_argument("--label", default=None, help="name of this MACs point in the result file (default: the file's stem)")
    p.add_argument("--criteria", nargs="+", choices=pruning.CRITERIA, default=list(pruning.CRITERIA))
    p.add_argument("--recoveries", nargs="+", choices=RECOVERIES, default=list(RECOVERIES))
    p.add_argument("--out", default=None, help="result file (default: checkpoints/<name>.baselines.json)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out) if args.out else beside(args.checkpoint, SUFFIX)

    def body() -> int:
        try:
            ks = ClusteringConfig.from_json(Path(args.config).read_text()).active
        except OSError as e:
            raise ClusteringError(f"cannot read {args.config}: {e.strerror}") from None
        try:
            pruning.check(ks, args.criteria[0])
        except pruning.PruningError as e:
            raise ClusteringError(str(e)) from None
        label = args.label or Path(args.config).name.split(".")[0]
        doc = compare(explorer_from_args(args), out, ks, label, tuple(args.criteria), tuple(args.recoveries),
                      progress=not args.quiet)
        t = table(doc)
        t = t[t["label"] == label].assign(top1=lambda d: (100 * d["top1"]).round(2),
                                          mac_reduction=lambda d: (100 * d["mac_reduction"]).round(1))
        print(t.pivot_table(index="method", columns="recovery", values="top1", sort=False).to_string())
        return 0

    return run(body, f"interrupted; rerun the same command to continue ({out} holds the finished rows)")
