"""``python -m explorer.search``: per-layer k (and, with ``--stream``, residual-stream ks) minimising MACs
under a top-1 budget (:func:`explorer.analysis.search.run_search`)."""
from __future__ import annotations

from pathlib import Path

from .. import checkpoints as ckpt
from ..analysis.results import beside
from ..analysis.search import (DEFAULT_TAU, OBJECTIVES, STREAM_FRACTIONS, SUFFIX, UNIFORM_KS, most_accurate_record,
                               run_key, run_search, search_stream_setting)
from ..analysis.sensitivity import K_GRID, SUFFIX as SENS_SUFFIX
from ..analysis.widths import SUFFIX as WIDTHS_SUFFIX, rank_widths, width_grid
from ..clustering import ClusteringConfig, ClusteringError
from ..model import CONV_LAYER_NAMES
from .common import add_analysis_args, add_clustering_args, clustering_options, explorer_from_args, parser, run

EXAMPLES = """
python -m explorer.search --budget 0.5 1 2        # one greedy run per budget (accuracy points)
python -m explorer.search --fold-bn --budget 5 10 20 40 --target-reduction 0.42 --write-config cfg.json
python -m explorer.search --fold-bn --stream --budget 1 --out checkpoints/x_stream.search.json   # + stream moves
python -m explorer.search --widths --target-reduction 0.65 --fold-bn --space data --recovery lsq --write-config cfg.json
"""


def build_parser():
    p = parser("search", "Choose k per layer (--stream: and per residual stream) to minimise MACs (or parameters) "
                         "within a top-1 budget: greedy, "
                         "every step verified on held-out training images and measured on the test split "
                         "(resumable: checkpoints/<name>.search.json).",
               EXAMPLES)
    add_analysis_args(p)
    p.add_argument("--budget", type=float, nargs="+", default=[1.0], metavar="PTS",
                   help="allowed top-1 drop in accuracy points (several: one greedy run each)")
    p.add_argument("--objective", choices=OBJECTIVES, default="macs", help="what to minimise")
    add_clustering_args(p, granularity=False)
    p.add_argument("--tau", type=float, default=DEFAULT_TAU, help="points added to every estimated cost when ranking moves")
    p.add_argument("--max-evals", type=int, default=200, help="verifications per budget at most")
    p.add_argument("--uniform-ks", type=int, nargs="*", default=list(UNIFORM_KS), metavar="K",
                   help="uniform configurations to evaluate for comparison")
    p.add_argument("--layers", nargs="+", default=None, metavar="NAME", help="only cluster these layers")
    p.add_argument("--stream", dest="stream_stages", type=int, nargs="*", default=None, metavar="STAGE",
                   help="also lower residual-stream ks (moves one step down a grid, probed on held-out training "
                        "images; needs --fold-bn): --stream alone for stages 1 2 3, or name stages. A stream's writers "
                        "(conv1, layer<s>.*.conv2) then get no per-layer k, and vice versa. Pinned in the result "
                        "file: a resume with another setting is refused (use --out or --restart)")
    p.add_argument("--stream-fractions", type=float, nargs="+", default=list(STREAM_FRACTIONS), metavar="F",
                   help="with --stream: a stage's stream k grid, round(width x F)")
    p.add_argument("--grid", type=int, nargs="+", default=list(K_GRID), metavar="K",
                   help="the ks a layer may take (those below its filter count)")
    p.add_argument("--sensitivity", default=None, help="sensitivity file (default: checkpoints/<name>.sensitivity.json)")
    p.add_argument("--out", default=None, help="result file (default: checkpoints/<name>.search.json)")
    p.add_argument("--write-config", default=None, metavar="FILE",
                   help="write the best configuration for the first budget as JSON (for explorer.finetune / prune)")
    p.add_argument("--target-reduction", type=float, default=None, metavar="FRACTION",
                   help="with --write-config: write instead the most accurate verified configuration that saves at "
                        "least this fraction of MACs (or params), e.g. 0.45 - a start for fine-tuning; with --widths "
                        "(required there): the fraction of MACs the ranked shapes save")
    p.add_argument("--widths", action="store_true",
                   help="instead: rank whole stage-width shapes (stream k and block-first-conv k per stage) that "
                        "save --target-reduction of MACs (to + --band), by top-1 on held-out training images "
                        "(explorer.analysis.widths; result: checkpoints/<name>.widths.json; needs --fold-bn)")
    p.add_argument("--band", type=float, default=0.005, metavar="FRACTION",
                   help="with --widths: shapes saving up to this much more than --target-reduction")
    p.add_argument("--step", type=int, default=8, metavar="K",
                   help="with --widths: every k a multiple of this (8: widths oneDNN runs at full speed)")
    p.add_argument("--restart", action="store_true", help="discard an existing result file")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def print_table(doc: dict, budgets: list[float], objective: str, options: ClusteringConfig) -> None:
    print(f"{'budget':>8}  {'top-1':>7}  {'drop':>6}  {'MACs':>12}  {'fewer':>6}  {'params':>8}  ks")
    for b in budgets:
        r = doc["runs"][run_key(b, objective, options)]["best"]
        if r is None:
            print(f"{b:8g}  infeasible: the options alone cost more than the budget")
            continue
        print(f"{b:8g}  {100 * r['top1']:6.2f}%  {r['drop_pts']:6.2f}  {r['macs']:12,}  "
              f"{100 * r['mac_reduction']:5.1f}%  {r['params']:8,}  {r['config']['ks']}"
              + (f"  stream {r['config']['stream']}" if r["config"].get("stream") else ""))
        sp = doc["runs"][run_key(b, objective, options)].get("seed_spread")
        if sp:
            print(f"{'':8}  seed spread over {len(sp['seeds'])} k-means seeds: top-1 {100 * sp['min']:.2f}% .. "
                  f"{100 * sp['max']:.2f}% (median {100 * sp['median']:.2f}%)")
    for key in doc.get("uniform", []):
        r = doc["evaluations"][key]
        ks = sorted(set(r["config"]["ks"].values())) or ["-"]
        print(f"{'uniform':>8}  {100 * r['top1']:6.2f}%  {r['drop_pts']:6.2f}  {r['macs']:12,}  "
              f"{100 * r['mac_reduction']:5.1f}%  {r['params']:8,}  k = {ks[-1]}")


def widths_main(args, out: Path) -> int:
    """``--widths``: rank the shapes of :func:`explorer.analysis.widths.width_grid` and print them."""
    if args.target_reduction is None:
        raise ClusteringError("--widths needs --target-reduction, e.g. 0.65 for 65% fewer MACs")
    options = clustering_options(args)
    shapes = width_grid(args.target_reduction, args.band, args.step)
    if not shapes:
        raise ClusteringError(f"no shape with every k a multiple of {args.step} saves "
                              f"{100 * args.target_reduction:g}-{100 * (args.target_reduction + args.band):g}% of MACs; "
                              "widen --band or lower --step")
    shapes[0].config(options)  # options that cannot cluster a stream: before loading anything
    if args.restart:
        out.unlink(missing_ok=True)
    doc = rank_widths(explorer_from_args(args), shapes, options, out, not args.quiet)
    wanted = {(s.stream, s.conv1) for s in shapes}  # the file may also hold other targets' shapes
    records = [r for r in doc["records"] if (tuple(r["stream"]), tuple(r["conv1"])) in wanted]
    print(f"{'held-out':>8}  {'fewer':>6}  {'MACs':>12}  shape")
    for r in records:
        print(f"{100 * r['select_top1']:7.2f}%  {100 * r['mac_reduction']:5.1f}%  {r['macs']:12,}  {r['label']}")
    if args.write_config:
        ckpt.save_json(ClusteringConfig.from_dict(records[0]["config"]).to_dict(), args.write_config)
        print(f"wrote {args.write_config} ({records[0]['label']})")
    print(f"results: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    # Each mode's own flags; the other mode's, given with it, would be silently ignored.
    greedy_only = ("budget", "objective", "tau", "max_evals", "uniform_ks", "layers", "stream_stages",
                   "stream_fractions", "grid", "sensitivity", "stream")
    given = [d for d in (greedy_only if args.widths else ("band", "step")) if getattr(args, d) != p.get_default(d)]
    if given:
        flags = ", ".join("--" + ("stream-k" if d == "stream" else "stream" if d == "stream_stages" else
                                  d.replace("_", "-")) for d in given)
        p.error(f"{flags} {'do' if len(given) > 1 else 'does'} not apply "
                f"{'to --widths (it ranks whole shapes by MACs)' if args.widths else 'without --widths'}")
    if args.widths and args.seeds > 1:
        p.error("--seeds picks a k-means seed on the held-out images that --widths ranks the shapes on, which "
                "would flatter every shape; rank with one seed and try seeds on the chosen configuration")
    out = Path(args.out) if args.out else beside(args.checkpoint, WIDTHS_SUFFIX if args.widths else SUFFIX)
    sens = Path(args.sensitivity) if args.sensitivity else beside(args.checkpoint, SENS_SUFFIX)

    def body() -> int:
        if args.widths:
            return widths_main(args, out)
        if any(b < 0 for b in args.budget):
            raise ClusteringError("--budget must be >= 0 points")
        options = clustering_options(args)
        for name in args.layers or []:
            if name not in CONV_LAYER_NAMES:
                raise ClusteringError(f"unknown conv layer {name!r}; valid names: {', '.join(CONV_LAYER_NAMES)}")
        stream = (1, 2, 3) if args.stream_stages == [] else tuple(args.stream_stages or ())
        search_stream_setting(stream, args.stream_fractions)  # bad stages or fractions: before loading anything
        explorer = explorer_from_args(args)
        doc = run_search(explorer, out, args.budget, options, args.objective, sens, args.uniform_ks, args.tau,
                         args.max_evals, args.restart, not args.quiet, args.layers, tuple(args.grid),
                         stream=stream,
                         stream_fractions=tuple(args.stream_fractions))
        print_table(doc, args.budget, args.objective, options)
        if args.write_config:
            r = doc["runs"][run_key(args.budget[0], args.objective, options)]["best"]
            if r is None and args.target_reduction is None:
                raise ClusteringError(f"budget {args.budget[0]:g} is infeasible; nothing to write")
            if args.target_reduction is not None:
                r = most_accurate_record(doc, args.target_reduction, args.objective)
                if r is None:
                    raise ClusteringError(f"no verified configuration saves {100 * args.target_reduction:.0f}% of "
                                          f"{args.objective}; rerun with a larger --budget")
                print(f"target {100 * args.target_reduction:.0f}%: {100 * r['mac_reduction']:.1f}% fewer MACs at "
                      f"{r['drop_pts']:.2f} pts lost before fine-tuning")
            ckpt.save_json(ClusteringConfig.from_dict(r["config"]).to_dict(), args.write_config)
            print(f"wrote {args.write_config}")
        print(f"results: {out}")
        return 0

    return run(body, f"interrupted; rerun the same command to continue ({out} holds the finished evaluations)")


