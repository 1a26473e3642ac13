"""``python -m explorer.bench``: the live path against the naive one (:mod:`explorer.analysis.benchmark`);
with ``--browser``, what the page adds in a real browser (:mod:`explorer.analysis.browser_bench`)."""
from __future__ import annotations

import json
import sys

from ..analysis.benchmark import exactness, format_recovery_cost, format_table, recovery_cost, run as run_benchmark
from ..analysis.browser_bench import MOVES, format_load, format_moves, run_load, run_moves
from ..analysis.latency import conv_width_table, format_conv_widths, format_latency, latency_table
from ..analysis.results import default_checkpoint
from .common import DATA_HELP, parser

EXAMPLES = """
python -m explorer.bench              # table; --json for scripts
python -m explorer.bench --exactness  # 45 configurations against fp32 (docs/exactness.json)
python -m explorer.bench --latency checkpoints/compressed/NAME.pt   # smaller net vs original, torch + ORT
python -m explorer.bench --conv-widths  # is a width that is not a multiple of 8 slower than its MACs say?
python -m explorer.bench --browser    # per slider move: browser vs engine time (Chromium + streamlit run)
python -m explorer.bench --browser --load --browser-sessions 8 --minutes 3   # 8 sessions at once
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
    p.add_argument("--latency", nargs="+", metavar="EXPORT.pt", default=None,
                   help="instead: CPU latency of exported smaller nets (fine-tuning's compressed/ exports) against "
                        "the original at batch 1 and 256, PyTorch and ONNX Runtime")
    p.add_argument("--conv-widths", action="store_true",
                   help="instead: time single 3x3 convs at the residual-stream net's odd widths against the next "
                        "multiple of 8 (batch 256, fp32, channels_last)")
    b = p.add_argument_group("browser (--browser): streamlit run + headless Chromium via Playwright")
    b.add_argument("--browser", action="store_true",
                   help="instead: time slider moves in a real browser against the engine (see docs/app.md)")
    b.add_argument("--load", action="store_true", help="with --browser: N sessions at once for D minutes")
    b.add_argument("--layers", default=",".join(MOVES), help="layers moved to k = 1 and back, comma-separated")
    b.add_argument("--pause", type=float, default=None,
                   help="seconds after each answer before the next key (default 2; 1 with --load)")
    b.add_argument("--browser-sessions", type=int, default=8, help="--load: browser sessions at once")
    b.add_argument("--minutes", type=float, default=3.0, help="--load: minutes each session moves sliders")
    b.add_argument("--threads", type=int, default=None, help="EXPLORER_THREADS of the server (default torch's)")
    b.add_argument("--timeout", type=float, default=900, help="seconds one answer may take before it is an error")
    args = p.parse_args(argv)
    modes = [flag for flag, on in (("--exactness", args.exactness), ("--recovery", args.recovery),
                                   ("--latency", args.latency), ("--conv-widths", args.conv_widths),
                                   ("--browser" if args.browser else "--load", args.browser or args.load)) if on]
    if len(modes) > 1:  # each is "instead" of the others: running one silently would hide the rest
        p.error(f"{' and '.join(modes)} are different benchmarks; run them one at a time")
    try:
        if args.browser or args.load:
            if args.load:
                r = run_load(args.checkpoint, args.data, args.browser_sessions, args.minutes, args.seed,
                             1.0 if args.pause is None else args.pause, args.timeout, args.threads)
                print(json.dumps(r, indent=2) if args.json else format_load(r))
                return 0 if r["exceptions"] == 0 and r["all_sessions_own_results"] and r["rss_under_limit"] else 1
            r = run_moves(args.checkpoint, args.data, [x for x in args.layers.split(",") if x],
                          2.0 if args.pause is None else args.pause, args.timeout, args.threads)
            print(json.dumps(r, indent=2) if args.json else format_moves(r))
            return 0
        if args.conv_widths:
            rows = conv_width_table()
            print(json.dumps(rows, indent=2) if args.json else format_conv_widths(rows))
            return 0
        if args.latency:
            rows = latency_table(args.latency, args.checkpoint)
            print(json.dumps(rows, indent=2) if args.json else format_latency(rows))
            return 0
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
