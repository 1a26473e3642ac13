"""``python -m explorer.bench``: the live path against the naive one (:mod:`explorer.analysis.benchmark`)."""
from __future__ import annotations

import json
import sys

from ..analysis.benchmark import exactness, format_recovery_cost, format_table, recovery_cost, run as run_benchmark
from ..analysis.results import default_checkpoint
from .common import DATA_HELP, parser

EXAMPLES = """
python -m explorer.bench              # table; --json for scripts
python -m explorer.bench --exactness  # 45 configurations against fp32 (docs/exactness.json)
"""


def main(argv: list[str] | None = None) -> int:
    p = parser("bench", "Time slider moves through the fast path against a naive eager fp32 pass, with memory "
                        "and concurrent sessions; or count predictions that differ from fp32.", EXAMPLES)
    p.add_argument("--checkpoint", default=default_checkpoint(), help="ResNet20 state dict (.pt)")
    p.add_argument("--data", default=None, help=DATA_HELP)
    p.add_argument("--changes", type=int, default=30, help="random single-layer changes to time")
    p.add_argument("--naive-repeats", type=int, default=3, help="naive full evaluations to time")
    p.add_argument("--sessions", type=int, default=3, help="concurrent sessions in the memory phase")
    p.add_argument("--seed", type=int, default=0, help="seed of the random slider sequence")
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.add_argument("--exactness", action="store_true",
                   help="instead: count predictions of the reported path that differ from fp32 on 3 random "
                        "sequences of 15 changes (JSON)")
    p.add_argument("--recovery", action="store_true",
                   help="instead: time what least-squares recovery adds to a slider move (--changes changes, "
                        "none vs lsq vs data+lsq in the same run)")
    args = p.parse_args(argv)
    try:
        if args.recovery:
            r = recovery_cost(args.checkpoint, args.data, args.changes, args.seed)
            print(json.dumps(r, indent=2) if args.json else format_recovery_cost(r))
            return 0
        if args.exactness:
            print(json.dumps(exactness(args.checkpoint, args.data), indent=2))
            return 0
        r = run_benchmark(args.checkpoint, args.data, args.changes, args.seed, args.naive_repeats, args.sessions)
    except Exception as e:  # a benchmark should say what failed in one line
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r, indent=2) if args.json else format_table(r))
    return 0
