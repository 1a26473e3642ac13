"""Per-layer k under an accuracy budget: ``python -m explorer.search --budget 1.0``.

Goal: choose k for every conv layer so that the compressed net (:mod:`explorer.compress`) has as
few MACs per image as possible (``--objective params``: unique parameters) while its top-1 on the
test split is at most ``budget`` accuracy points below the unclustered checkpoint.

Method (greedy with verification, deterministic):

1. Sensitivity table. The single-layer sweep of :mod:`explorer.sensitivity` for the same options
   gives drop[L][k], the points lost when only layer L is clustered to k (missing points are swept
   first, into the same resumable file).
2. Start from the unclustered net (verified drop 0). A *move* lowers one layer L from its current
   k to a lower grid value k'. Its estimated accuracy cost is the change of L's single-layer drop,
   max(0, drop[L][k'] - drop[L][k]) (layers assumed additive), and its gain is the exact objective
   saved, computed by building the compressed net of the candidate configuration.
3. Among moves whose estimated total (verified drop so far + estimated cost) is within the budget,
   take the one with the largest gain / (estimated cost + tau) (tau = 0.05 points by default, so
   free moves are ranked by their gain), and verify it by a full evaluation
   (:meth:`explorer.pipeline.Explorer.run`, exact fp32 on the whole test split).
4. Accept the move if the verified drop is within the budget. Otherwise back off: the move is
   rejected and layer L may from then on only take ks above k' (a smaller step of the same layer
   stays possible). Repeat from 3 until no move is left or ``--max-evals`` evaluations were spent.

The best configuration is the accepted one with the lowest objective; every verified
configuration (accepted or not) is kept, so the result file also gives the accuracy-vs-MACs Pareto
front. For comparison the uniform configurations ``ClusteringConfig.uniform(k)`` for
k = 1, 2, 3, 4, 8, 16, 32 (capped at each layer's filters) are evaluated with the same options.

Resumable: every verified evaluation is stored in ``checkpoints/<name>.search.json`` (``--out``)
under its configuration key as soon as it is measured; the greedy is deterministic, so a rerun
replays the finished part from the file and continues. Several budgets (``--budget 0.5 1 2``)
share the evaluations.

:func:`best_config` answers "the best configuration for budget X" from that file (the app's
"apply best configuration for budget X"); :func:`pareto_table` returns the Pareto points.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import checkpoints as ckpt
from .analysis_io import ResultsMismatch, add_common_args, beside, explorer_from_args, header, open_results, save_results
from .clustering import METRICS, ClusteringConfig, ClusteringError, apply, cluster_model
from .compress import compress, count_params
from .data import CLASSES, DataNotFoundError
from .model import CONV_LAYER_NAMES, conv_layer
from .sensitivity import K_GRID, SUFFIX as SENS_SUFFIX, drop_table, load_sensitivity, options_key, sweep

SUFFIX = ".search.json"
OBJECTIVES = ("macs", "params")
UNIFORM_KS = (1, 2, 3, 4, 8, 16, 32)
DEFAULT_TAU = 0.05


# ---------------------------------------------------------------- costs and evaluations

class CostModel:
    """Exact MACs and parameters of the compressed net for a configuration, without evaluating it
    (k-means is cached by :func:`explorer.clustering.cluster_model`; BN re-estimation is skipped
    because it does not change the structure). Memoised per configuration key."""

    def __init__(self, model):
        self.model = model
        self._memo: dict[str, dict] = {}

    def __call__(self, config: ClusteringConfig) -> dict:
        key = replace(config, recalibrate_bn=0).key()
        hit = self._memo.get(key)
        if hit is None:
            cfg = replace(config, recalibrate_bn=0)
            clustering = cluster_model(self.model, cfg)
            small = compress(apply(self.model, clustering), clustering)
            hit = {"macs": spec_macs(small.specs), "params": count_params(small)}
            self._memo[key] = hit
        return hit


def spec_macs(specs) -> int:
    """MACs per 32x32 image of a compressed net from its conv specs: sum over convs of
    filters x in_channels x 9 x output pixels, plus the 64 x 10 classifier - the same count as
    :func:`explorer.compress.count_macs` (gathers and affines are not counted there either)."""
    total, h = 0, 32
    for s in specs:
        h //= s.stride
        total += s.filters * s.in_channels * 9 * h * h
    return total + 64 * 10


def evaluation_record(result, source: str) -> dict:
    """JSON-ready record of one verified configuration (a PruneResult)."""
    c = result.compression
    return {
        "config": result.config.to_dict(), "source": source,
        "top1": result.evaluation.top1, "top1_delta": result.comparison.top1_delta,
        "drop_pts": -100.0 * result.comparison.top1_delta + 0.0,
        "per_class": {cl: float(a) for cl, a in zip(CLASSES, result.evaluation.per_class)},
        "macs": c.macs, "params": c.params, "baseline_macs": c.baseline_macs, "baseline_params": c.baseline_params,
        "mac_reduction": c.mac_reduction, "compression_ratio": c.compression_ratio,
    }


class Evaluator:
    """Verified evaluations through ``explorer.run``, stored in (and replayed from) ``doc``;
    ``save`` is called after every new one. Counts new evaluations in ``new``."""

    def __init__(self, explorer, doc: dict, save):
        self.explorer, self.doc, self.save = explorer, doc, save
        self.store = doc.setdefault("evaluations", {})
        self.new = 0

    def __call__(self, config: ClusteringConfig, source: str) -> dict:
        key = config.key()
        rec = self.store.get(key)
        if rec is None:
            t = time.perf_counter()
            rec = evaluation_record(self.explorer.run(config), source)
            rec["seconds"] = round(time.perf_counter() - t, 3)
            self.store[key] = rec
            self.new += 1
            self.save()
        return rec


# ---------------------------------------------------------------- greedy

@dataclass
class GreedyResult:
    """Outcome of one greedy run: best (lowest objective) accepted configuration and the log."""

    budget: float
    objective: str
    best: dict | None
    accepted: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    evaluations: int = 0
    exhausted: bool = False
    feasible: bool = True

    def to_dict(self) -> dict:
        return {"budget": self.budget, "objective": self.objective, "best": self.best,
                "accepted": self.accepted, "rejected": self.rejected, "evaluations": self.evaluations,
                "stopped_by_max_evals": self.exhausted, "feasible": self.feasible}


def greedy(evaluate, cost, drops: dict[str, dict[int, float]], options: ClusteringConfig, budget: float,
           objective: str = "macs", tau: float = DEFAULT_TAU, max_evals: int = 200,
           layers: list[str] | None = None) -> GreedyResult:
    """The greedy of the module doc. ``evaluate(config, source) -> record`` verifies a
    configuration (record has ``drop_pts`` and the objective); ``cost(config) -> {"macs", "params"}``
    is exact structure cost; ``drops[layer][k]`` is the single-layer sensitivity (points lost).
    Layers without sensitivity data are left unclustered. ``max_evals`` bounds the number of
    verifications (replayed ones count too, so a resumed run takes the same path)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}")
    layers = [n for n in (layers or CONV_LAYER_NAMES) if n in drops]
    config = replace(options, ks={})
    current = evaluate(config, "greedy")
    res = GreedyResult(budget, objective, {**current, "step": 0})
    if current["drop_pts"] > budget:
        # The options alone (BN re-estimation of the unclustered net) already cost more than the
        # budget: nothing is feasible.
        res.best, res.feasible = None, False
        return res
    floor = {n: 0 for n in layers}  # a layer may only take ks above its floor (after a back-off)
    n_eval = 0
    while True:
        cur_cost = cost(config)[objective]
        best = None
        for name in layers:
            n = conv_layer(name).filters
            k_cur = config.ks.get(name, n)
            d_cur = drops[name].get(k_cur, 0.0)  # k = n is the measured reference point
            for k_new in sorted(drops[name]):
                if not floor[name] < k_new < k_cur:
                    continue
                est = max(0.0, drops[name][k_new] - d_cur)
                if current["drop_pts"] + est > budget:
                    continue
                cand = config.with_k(name, k_new)
                gain = cur_cost - cost(cand)[objective]
                if gain <= 0:
                    continue
                score = (gain / (est + tau), gain, -CONV_LAYER_NAMES.index(name), -k_new)
                if best is None or score > best[0]:
                    best = (score, name, k_new, est, gain, cand)
        if best is None:
            break
        if n_eval >= max_evals:
            res.exhausted = True
            break
        _, name, k_new, est, gain, cand = best
        rec = evaluate(cand, "greedy")
        n_eval += 1
        step = {"layer": name, "k": k_new, "estimated_cost_pts": est, "gain": gain, "drop_pts": rec["drop_pts"],
                objective: rec[objective], "config": rec["config"]}
        if rec["drop_pts"] <= budget:
            config, current = cand, rec
            res.accepted.append(step)
            if rec[objective] < res.best[objective] or (rec[objective] == res.best[objective]
                                                        and rec["drop_pts"] < res.best["drop_pts"]):
                res.best = {**rec, "step": len(res.accepted)}
        else:
            floor[name] = k_new
            res.rejected.append(step)
    res.evaluations = n_eval
    return res


def uniform_configs(options: ClusteringConfig, ks=UNIFORM_KS) -> list[ClusteringConfig]:
    """``ClusteringConfig.uniform(k)`` with ``options``' metric, granularity and BN options."""
    o = options.to_dict()
    o.pop("ks")
    return [ClusteringConfig.uniform(k, **o).validate() for k in ks]


def pareto_front(records: list[dict], x: str = "macs") -> list[dict]:
    """Non-dominated records: no other has lower-or-equal ``x`` and higher-or-equal top-1 with one
    strictly better. Sorted by ``x`` ascending."""
    pts = sorted(records, key=lambda r: (r[x], -r["top1"]))
    out, best_top1 = [], -1.0
    for r in pts:
        if r["top1"] > best_top1:
            out.append(r)
            best_top1 = r["top1"]
    return out


# ---------------------------------------------------------------- driver

def run_search(explorer, path: str | Path, budgets: list[float], options: ClusteringConfig,
               objective: str = "macs", sensitivity_path: str | Path | None = None,
               uniform_ks=UNIFORM_KS, tau: float = DEFAULT_TAU, max_evals: int = 200, restart: bool = False,
               progress: bool = True, layers: list[str] | None = None, grid=K_GRID) -> dict:
    """Sweep missing sensitivity points, run the greedy for each budget, evaluate the uniform
    configurations, and write everything to ``path``. Returns the result document:
    ``{"header", "evaluations": {config key: record}, "runs": {run key: GreedyResult dict},
    "uniform": [config keys], "pareto": {"macs": [...], "params": [...]}}``.

    Raises ResultsMismatch (file from other weights/data), ClusteringError (bad options).
    """
    options = replace(options, ks={}).validate()
    if options.granularity != "filter":
        raise ClusteringError("search needs granularity 'filter' (kernel clustering has no structural savings)")
    if objective not in OBJECTIVES:
        raise ClusteringError(f"objective must be one of {OBJECTIVES}")
    path = Path(path)
    sensitivity_path = Path(sensitivity_path) if sensitivity_path else path.with_name(
        path.name.replace(SUFFIX, SENS_SUFFIX) if path.name.endswith(SUFFIX) else path.stem + SENS_SUFFIX)
    sweep(explorer, sensitivity_path, layers, [options], grid, progress=progress)
    drops = drop_table(load_sensitivity(sensitivity_path), options)

    doc = open_results(path, header(explorer), restart=restart)
    doc["header"]["sensitivity_file"] = sensitivity_path.name
    ev = Evaluator(explorer, doc, lambda: save_results(doc, path))
    cost = CostModel(explorer.model)
    runs = doc.setdefault("runs", {})
    t0 = time.perf_counter()
    for b in budgets:
        rk = run_key(b, objective, options)
        r = greedy(ev, cost, drops, options, b, objective, tau, max_evals, layers)
        runs[rk] = {**r.to_dict(), "options": options_key(options), "tau": tau}
        save_results(doc, path)
        if progress and r.best is None:
            print(f"budget {b:g} pts: infeasible - these options alone cost more than the budget", file=sys.stderr)
        elif progress:
            best = r.best
            print(f"budget {b:g} pts: best {objective} {best[objective]:,} ({100 * best['mac_reduction']:.1f}% fewer "
                  f"MACs), verified drop {best['drop_pts']:.2f} pts; {r.evaluations} evaluations "
                  f"({ev.new} new, {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    uni = doc.setdefault("uniform", [])
    for cfg in uniform_configs(options, uniform_ks):
        ev(cfg, "uniform")
        if cfg.key() not in uni:
            uni.append(cfg.key())
    recs = list(doc["evaluations"].values())
    doc["pareto"] = {x: [{k: r[k] for k in ("config", "source", "top1", "drop_pts", "macs", "params", "mac_reduction")}
                         for r in pareto_front(recs, x)] for x in OBJECTIVES}
    save_results(doc, path)
    return doc


def run_key(budget: float, objective: str, options: ClusteringConfig) -> str:
    return f"{objective}|{budget:g}|{options_key(options)}"


# ---------------------------------------------------------------- readers for the app and the report

def load_search(path: str | Path) -> dict:
    """The result document written by :func:`run_search`. Raises CheckpointError if unreadable."""
    return ckpt.read_json(path)


def best_record(path_or_doc, budget: float, objective: str = "macs", options: ClusteringConfig | None = None
                ) -> dict | None:
    """The verified evaluation with the lowest ``objective`` whose drop is at most ``budget``
    points (ties: smaller drop), among all evaluations in the file (greedy steps, back-offs and
    uniform configurations) - optionally only those with ``options``' clustering options. None when
    no clustered configuration qualifies."""
    doc = load_search(path_or_doc) if not isinstance(path_or_doc, dict) else path_or_doc
    ok = []
    for r in doc.get("evaluations", {}).values():
        if not r["config"]["ks"] or r["drop_pts"] > budget + 1e-9:
            continue
        if options is not None and options_key(ClusteringConfig.from_dict(r["config"])) != options_key(options):
            continue
        ok.append(r)
    if not ok:
        return None
    return min(ok, key=lambda r: (r[objective], r["drop_pts"]))


def most_accurate_record(path_or_doc, min_reduction: float, objective: str = "macs") -> dict | None:
    """The verified evaluation with the highest top-1 among those that save at least
    ``min_reduction`` (a fraction) of the baseline's MACs (``objective="params"``: of its
    parameters) - the starting point to fine-tune for a compression target. None if none does."""
    doc = load_search(path_or_doc) if not isinstance(path_or_doc, dict) else path_or_doc
    ok = [r for r in doc.get("evaluations", {}).values()
          if (1 - r[objective] / r[f"baseline_{objective}"]) >= min_reduction - 1e-12]
    return max(ok, key=lambda r: (r["top1"], -r[objective])) if ok else None


def best_config(path, budget: float, objective: str = "macs", options: ClusteringConfig | None = None
                ) -> ClusteringConfig | None:
    """:func:`best_record`'s configuration as a ClusteringConfig (None if none qualifies). Raises
    CheckpointError when the file is missing or unreadable."""
    r = best_record(path, budget, objective, options)
    return None if r is None else ClusteringConfig.from_dict(r["config"])


def pareto_table(path_or_doc):
    """All verified evaluations as a pandas DataFrame (columns source, top1, drop_pts, macs, params,
    mac_reduction, compression_ratio, metric, fold_bn, recalibrate_bn, layers_clustered, config,
    pareto_macs, pareto_params)."""
    import json

    import pandas as pd

    doc = load_search(path_or_doc) if not isinstance(path_or_doc, dict) else path_or_doc
    recs = list(doc.get("evaluations", {}).values())
    front = {x: {json.dumps(r["config"], sort_keys=True) for r in pareto_front(recs, x)} for x in OBJECTIVES} if recs else {}
    rows = []
    for r in recs:
        key = json.dumps(r["config"], sort_keys=True)
        rows.append({"source": r["source"], "top1": r["top1"], "drop_pts": r["drop_pts"], "macs": r["macs"],
                     "params": r["params"], "mac_reduction": r["mac_reduction"],
                     "compression_ratio": r["compression_ratio"], "metric": r["config"]["metric"],
                     "fold_bn": r["config"]["fold_bn"], "recalibrate_bn": r["config"]["recalibrate_bn"],
                     "layers_clustered": len(r["config"]["ks"]), "config": json.dumps(r["config"]["ks"]),
                     "pareto_macs": key in front.get("macs", ()), "pareto_params": key in front.get("params", ())})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m explorer.search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--budget", type=float, nargs="+", default=[1.0], metavar="PTS",
                   help="allowed top-1 drop in accuracy points (several: one greedy run each)")
    p.add_argument("--objective", choices=OBJECTIVES, default="macs", help="what to minimise")
    p.add_argument("--metric", choices=METRICS, default="euclidean", help="k-means metric")
    p.add_argument("--fold-bn", action="store_true", help="cluster BN-folded filters (both convs of a block shrink)")
    p.add_argument("--recalibrate-bn", type=int, default=0, metavar="N",
                   help="re-estimate BatchNorm statistics on N training images after clustering (0 = off)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed")
    p.add_argument("--n-init", type=int, default=3, help="k-means restarts")
    p.add_argument("--tau", type=float, default=DEFAULT_TAU,
                   help="points added to every estimated cost when ranking moves")
    p.add_argument("--max-evals", type=int, default=200, help="verifications per budget at most")
    p.add_argument("--uniform-ks", type=int, nargs="*", default=list(UNIFORM_KS), metavar="K",
                   help="uniform configurations to evaluate for comparison")
    p.add_argument("--layers", nargs="+", default=None, metavar="NAME", help="only cluster these layers")
    p.add_argument("--sensitivity", default=None, help="sensitivity file (default: checkpoints/<name>.sensitivity.json)")
    p.add_argument("--out", default=None, help="result file (default: checkpoints/<name>.search.json)")
    p.add_argument("--write-config", default=None, metavar="FILE",
                   help="write the best configuration for the first budget as JSON (for explorer.finetune / prune)")
    p.add_argument("--target-reduction", type=float, default=None, metavar="FRACTION",
                   help="with --write-config: write instead the most accurate verified configuration that saves at "
                        "least this fraction of MACs (or params), e.g. 0.45 - a start for fine-tuning")
    p.add_argument("--restart", action="store_true", help="discard an existing result file")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out) if args.out else beside(args.checkpoint, SUFFIX)
    sens = Path(args.sensitivity) if args.sensitivity else beside(args.checkpoint, SENS_SUFFIX)
    try:
        if any(b < 0 for b in args.budget):
            raise ClusteringError("--budget must be >= 0 points")
        options = ClusteringConfig(metric=args.metric, fold_bn=args.fold_bn, recalibrate_bn=args.recalibrate_bn,
                                   seed=args.seed, n_init=args.n_init).validate()
        for name in args.layers or []:
            if name not in CONV_LAYER_NAMES:
                raise ClusteringError(f"unknown conv layer {name!r}; valid names: {', '.join(CONV_LAYER_NAMES)}")
        explorer = explorer_from_args(args)
        doc = run_search(explorer, out, args.budget, options, args.objective, sens, args.uniform_ks, args.tau,
                         args.max_evals, args.restart, not args.quiet, args.layers)
    except (ClusteringError, ckpt.CheckpointError, DataNotFoundError, ResultsMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; rerun the same command to continue ({out} holds the finished evaluations)",
              file=sys.stderr)
        return 130
    print(f"{'budget':>8}  {'top-1':>7}  {'drop':>6}  {'MACs':>12}  {'fewer':>6}  {'params':>8}  ks")
    for b in args.budget:
        r = doc["runs"][run_key(b, args.objective, options)]["best"]
        if r is None:
            print(f"{b:8g}  infeasible: the options alone cost more than the budget")
            continue
        print(f"{b:8g}  {100 * r['top1']:6.2f}%  {r['drop_pts']:6.2f}  {r['macs']:12,}  "
              f"{100 * r['mac_reduction']:5.1f}%  {r['params']:8,}  {r['config']['ks']}")
    for key in doc.get("uniform", []):
        r = doc["evaluations"][key]
        ks = sorted(set(r["config"]["ks"].values())) or ["-"]
        print(f"{'uniform':>8}  {100 * r['top1']:6.2f}%  {r['drop_pts']:6.2f}  {r['macs']:12,}  "
              f"{100 * r['mac_reduction']:5.1f}%  {r['params']:8,}  k = {ks[-1]}")
    if args.write_config:
        r = doc["runs"][run_key(args.budget[0], args.objective, options)]["best"]
        if r is None and args.target_reduction is None:
            print(f"error: budget {args.budget[0]:g} is infeasible; nothing to write", file=sys.stderr)
            return 2
        if args.target_reduction is not None:
            r = most_accurate_record(doc, args.target_reduction, args.objective)
            if r is None:
                print(f"error: no verified configuration saves {100 * args.target_reduction:.0f}% of {args.objective}; "
                      f"rerun with a larger --budget", file=sys.stderr)
                return 2
            print(f"target {100 * args.target_reduction:.0f}%: {100 * r['mac_reduction']:.1f}% fewer MACs at "
                  f"{r['drop_pts']:.2f} pts lost before fine-tuning")
        try:
            ckpt.save_json(ClusteringConfig.from_dict(r["config"]).to_dict(), args.write_config)
        except ckpt.CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {args.write_config}")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
