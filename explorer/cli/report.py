"""``python -m explorer.report``: the results report (:func:`explorer.analysis.report.build_report`)."""
from __future__ import annotations

import time
from pathlib import Path

from ..analysis.report import COMPARE_KS, build_report
from ..analysis.results import beside
from ..analysis.search import SUFFIX as SEARCH_SUFFIX
from ..analysis.sensitivity import SUFFIX as SENS_SUFFIX
from .common import add_analysis_args, explorer_from_args, parser, run

EXAMPLES = """
python -m explorer.report --out report/           # report/report.html + report.md + PNG charts
python -m explorer.report --no-latency --no-png   # quicker: no timings, tables only in the Markdown
"""


def build_parser():
    p = parser("report", "Write the analysis report (Markdown + PNG, HTML, headline table) from the checkpoint "
                         "and the result files beside it; evaluations are cached in <out>/report.json.", EXAMPLES)
    add_analysis_args(p)
    p.add_argument("--out", default="report", help="output directory")
    p.add_argument("--sensitivity", default=None, help="sensitivity file (default: checkpoints/<name>.sensitivity.json)")
    p.add_argument("--search", default=None, help="search file (default: checkpoints/<name>.search.json)")
    p.add_argument("--finetuned", default=None,
                   help="directory with fine-tuned checkpoints (default: the checkpoint's directory)")
    p.add_argument("--recalibrate-bn", type=int, default=2000, metavar="N",
                   help="training images for the BN re-estimation variants (0 = leave them out)")
    p.add_argument("--compare-ks", type=int, nargs="+", default=list(COMPARE_KS), metavar="K",
                   help="uniform ks for the metric / granularity comparison")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurements")
    p.add_argument("--no-png", action="store_true", help="skip PNG rendering (Markdown then has tables only)")
    p.add_argument("--restart", action="store_true", help="discard the cached evaluations in <out>/report.json")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    sens = Path(args.sensitivity) if args.sensitivity else beside(args.checkpoint, SENS_SUFFIX)
    search = Path(args.search) if args.search else beside(args.checkpoint, SEARCH_SUFFIX)
    ftdir = Path(args.finetuned) if args.finetuned else Path(args.checkpoint).parent

    def body() -> int:
        explorer = explorer_from_args(args)
        t = time.perf_counter()
        doc = build_report(explorer, out, sens, search, ftdir, args.recalibrate_bn, tuple(args.compare_ks),
                           latency=not args.no_latency, png=not args.no_png, restart=args.restart,
                           progress=not args.quiet)
        print(f"wrote {', '.join(str(out / f) for f in doc['files'][:3])} and {len(doc['files']) - 3} PNG charts "
              f"({time.perf_counter() - t:.0f} s)")
        return 0

    return run(body, f"interrupted; rerun the same command to continue ({out}/report.json keeps the evaluations)")
