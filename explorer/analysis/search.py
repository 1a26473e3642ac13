"""Per-layer k under an accuracy budget (:func:`run_search`; command line: ``python -m explorer.search``).

Goal: choose k for every conv layer so that the compressed net (:mod:`explorer.compress`) has as
few MACs per image as possible (``objective="params"``: unique parameters) while its top-1 on the
test split is at most ``budget`` accuracy points below the unclustered checkpoint (measured on held-out
training images: the test split never chooses). With ``--stream`` it also lowers residual-stream ks.

Method (greedy with verification, deterministic):

1. Sensitivity table. The single-layer sweep of :mod:`.sensitivity` for the same options gives
   drop[L][k], the points lost when only layer L is clustered to k (missing points are swept first).
2. Start from the unclustered net (verified drop 0). A *move* lowers one layer L from its current
   k to a lower grid value k'. Its estimated cost is max(0, drop[L][k'] - drop[L][k]) (layers
   assumed additive); its gain is the exact objective saved (:class:`CostModel`).
3. Among moves whose estimated total (verified drop so far + estimated cost) is within the budget,
   take the one with the largest gain / (estimated cost + tau) (tau = 0.05 points, so free moves
   are ranked by their gain), and verify it by a full evaluation (exact fp32, whole test split).
4. Accept the move if the verified drop is within the budget. Otherwise back off: layer L may from
   then on only take ks above k'. Repeat from 3 until no move is left or ``max_evals`` is spent.

Residual-stream moves (``stream=(1, 2, 3)``, command line ``--stream``; off by default, so the
shipped result files stay what they were). A stream move lowers one stage's stream k
(:meth:`ClusteringConfig.with_stream`) one step down its grid: ``round(width * f)`` for the
fractions ``stream_fractions`` (default 3/4, 1/2, 1/4: 12, 8, 4 for stage 1; 24, 16, 8; 48, 32,
16), taking the largest grid value below the current k that is at least :func:`stream_min_k`
(the option-A shortcut: one more than the previous stage's cluster count), above the stage's
back-off floor, and within the checkpoint's distinct channels. There is no single-stage
sensitivity table (a stage-2 or -3 k is only valid together with the earlier stages' ks), so a
stream move's cost is *probed*: its configuration is evaluated on the held-out training images,
and its exact cost (probed drop - current drop) ranks it with the layer moves by the same score.
A probe is made only when the move could still win the round (gain / tau at least the best
score so far), so a round costs at most one probe per stage. A chosen stream move needs no further
verification (the probe is it); a probe over the budget is logged as rejected and backs the stage
off like a layer. Writer rule (first come, first served): a stream writer
(:func:`explorer.model.stream_writers`: the stem and ``layer<s>.*.conv2``) cannot also have a
per-layer k, so once stage s's stream is clustered its writers get no per-layer moves, and stage
s gets no stream move once one of its writers has a per-layer k. ``max_evals`` counts probes too.

The best configuration is the accepted one with the lowest objective; every verified configuration
is kept, so the result file also gives the accuracy-vs-MACs Pareto front. For comparison the
uniform configurations ``ClusteringConfig.uniform(k)`` are evaluated with the same options.
Resumable like the sensitivity sweep (``checkpoints/<name>.search.json``): the greedy is
deterministic, so a rerun replays the finished part from the file. :func:`best_config` answers
"the best configuration for budget X" (the app's "apply best configuration for budget X").
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import checkpoints as ckpt
from .. import limits
from ..clustering import ClusteringConfig, ClusteringError, apply, cluster_model, stream_min_k
from ..compress import compress, count_macs
from ..model import CONV_LAYER_NAMES, STREAM_STAGES, conv_layer, count_parameters, stream_width, stream_writers
from .results import Evaluations, ResultsMismatch, header, open_results, save_results
from .sensitivity import K_GRID, SUFFIX as SENS_SUFFIX, drop_table, load_sensitivity, options_key, sweep

SUFFIX = ".search.json"
OBJECTIVES = ("macs", "params")
UNIFORM_KS = (1, 2, 3, 4, 8, 16, 32)
DEFAULT_TAU = 0.05
STREAM_FRACTIONS = (0.75, 0.5, 0.25)  # a stage's stream k grid: round(width * f)
EPS = 1e-9  # drops are differences of fractions x 100: 1.0000000000000009 is 20 images of 2,000, within 1 point


# ---------------------------------------------------------------- costs and evaluations

class CostModel:
    """Exact MACs and parameters of the compressed net for a configuration, without evaluating it
    (k-means is cached by :func:`explorer.clustering.cluster_model`; BN re-estimation is skipped
    because it does not change the structure). Memoised per configuration key."""

    def __init__(self, model):
        self.model = model
        self._memo: dict[str, dict] = {}

    def __call__(self, config: ClusteringConfig) -> dict:
        # The structure depends on the ks and fold_bn only (recoveries keep the clusters; the
        # data space picks other members but the same counts and merges), so it is costed in the
        # weight space without recovery, which needs no training images.
        cfg = replace(config, recalibrate_bn=0, recovery="none", space="weight", seeds=1)
        key = cfg.key()
        hit = self._memo.get(key)
        if hit is None:
            clustering = cluster_model(self.model, cfg)
            small = compress(apply(self.model, clustering), clustering)
            hit = {"macs": count_macs(small), "params": count_parameters(small)}
            self._memo[key] = hit
        return hit


def evaluation_record(result, source: str, select: tuple[float, float] | None = None) -> dict:
    """JSON-ready record of one verified configuration (a PruneResult). ``select``: (top-1,
    baseline top-1) on the held-out training images (:meth:`explorer.pipeline.Explorer.select_top1`),
    stored as ``select_top1`` / ``select_drop_pts``: what the greedy accepts or rejects on."""
    c = result.compression
    extra = {} if select is None else {"select_top1": select[0], "select_drop_pts": 100.0 * (select[1] - select[0]) + 0.0}
    return {**extra,
        "config": result.config.to_dict(), "source": source,
        "top1": result.evaluation.top1, "top1_delta": result.comparison.top1_delta,
        "drop_pts": -100.0 * result.comparison.top1_delta + 0.0,
        "per_class": result.evaluation.per_class_dict(),
        "macs": c.macs, "params": c.params, "baseline_macs": c.baseline_macs, "baseline_params": c.baseline_params,
        "mac_reduction": c.mac_reduction, "compression_ratio": c.compression_ratio,
    }


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


def stream_grid(stage: int, fractions=STREAM_FRACTIONS) -> list[int]:
    """Stage ``stage``'s stream k grid, descending: ``round(width * f)`` for each fraction in (0, 1)."""
    w = stream_width(stage)
    return sorted({max(1, int(round(w * f))) for f in fractions if 0 < f < 1} - {w}, reverse=True)


def next_stream_k(config: ClusteringConfig, stage: int, floor: int = 0, fractions=STREAM_FRACTIONS,
                  admissible=None) -> int | None:
    """The k of stage ``stage``'s next stream move from ``config``: the largest grid value below its
    current k that honours the option-A shortcut (at least :func:`stream_min_k`), lies above
    ``floor`` and passes ``admissible(config)`` (e.g. the checkpoint's distinct channels); None if
    there is none."""
    current = config.active_stream
    k_cur = current.get(stage, stream_width(stage))
    lo = max(floor + 1, stream_min_k(stage, current))
    for k in stream_grid(stage, fractions):
        if lo <= k < k_cur and (admissible is None or admissible(config.with_stream(stage, k))):
            return k
    return None


def greedy(evaluate, cost, drops: dict[str, dict[int, float]], options: ClusteringConfig, budget: float,
           objective: str = "macs", tau: float = DEFAULT_TAU, max_evals: int = 200,
           layers: list[str] | None = None, key: str = "select_drop_pts", stream=(),
           stream_fractions=STREAM_FRACTIONS, admissible=None) -> GreedyResult:
    """The greedy of the module doc. ``evaluate(config, source) -> record`` verifies a
    configuration (record has ``drop_pts`` and the objective); ``cost(config) -> {"macs", "params"}``
    is exact structure cost; ``drops[layer][k]`` is the single-layer sensitivity (points lost).
    Layers without sensitivity data are left unclustered. ``max_evals`` bounds the number of
    verifications (replayed ones count too, so a resumed run takes the same path). ``key``: the
    record's drop that the budget applies to; ``"select_drop_pts"`` (held-out training images) so
    that the test split never chooses; ``"drop_pts"`` (test) reproduces the older, leaking runs.
    ``stream``: the stages that get stream moves (module doc; () = none, the older search);
    ``admissible(config) -> bool`` filters stream candidates (the checkpoint's distinct channels).
    Accepted and rejected steps name ``"layer"`` or ``"stream"`` (the stage); a rejected stream
    probe has ``"probe": True``."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}")
    layers = [n for n in (layers or CONV_LAYER_NAMES) if n in drops]
    stages = [s for s in STREAM_STAGES if s in set(stream)]
    config = replace(options, ks={}, stream={})
    current = evaluate(config, "greedy")
    res = GreedyResult(budget, objective, {**current, "step": 0})
    if current[key] > budget + EPS:
        # The options alone (BN re-estimation of the unclustered net) already cost more than the
        # budget: nothing is feasible.
        res.best, res.feasible = None, False
        return res
    floor = {n: 0 for n in layers}  # a layer may only take ks above its floor (after a back-off)
    stream_floor = {s: 0 for s in stages}
    n_eval = 0
    while True:
        cur_cost = cost(config)[objective]
        best = None
        taken = {n for s in config.active_stream for n in stream_writers(s)}  # writers of clustered streams
        for name in layers:
            if name in taken:
                continue
            n = conv_layer(name).filters
            k_cur = config.ks.get(name, n)
            d_cur = drops[name].get(k_cur, 0.0)  # k = n is the measured reference point
            for k_new in sorted(drops[name]):
                if not floor[name] < k_new < k_cur:
                    continue
                est = max(0.0, drops[name][k_new] - d_cur)
                if current[key] + est > budget + EPS:
                    continue
                cand = config.with_k(name, k_new)
                gain = cur_cost - cost(cand)[objective]
                if gain <= 0:
                    continue
                score = (gain / (est + tau), gain, -CONV_LAYER_NAMES.index(name), -k_new)
                if best is None or score > best[0]:
                    best = (score, name, k_new, est, gain, cand, None)
        # Stream moves: one step per stage, costed exactly by a probe on the held-out images.
        moves = []
        for s in stages:
            if any(n in config.active for n in stream_writers(s)):
                continue  # a writer already has its own k
            k_new = next_stream_k(config, s, stream_floor[s], stream_fractions, admissible)
            if k_new is None:
                continue
            cand = config.with_stream(s, k_new)
            gain = cur_cost - cost(cand)[objective]
            if gain > 0:
                moves.append((gain, s, k_new, cand))
        for gain, s, k_new, cand in sorted(moves, key=lambda m: (-m[0], m[1])):
            if best is not None and gain / tau < best[0][0]:
                continue  # cannot win this round whatever its cost
            if n_eval >= max_evals:
                res.exhausted = True
                break
            rec = evaluate(cand, "greedy")
            n_eval += 1
            est = max(0.0, rec[key] - current[key])
            if rec[key] > budget + EPS:
                stream_floor[s] = k_new
                res.rejected.append(_step({"stream": s}, k_new, est, gain, rec, key, objective, probe=True))
                continue
            score = (gain / (est + tau), gain, -len(CONV_LAYER_NAMES) - s, -k_new)
            if best is None or score > best[0]:
                best = (score, ("stream", s), k_new, est, gain, cand, rec)
        if best is None:
            break
        _, name, k_new, est, gain, cand, rec = best
        if rec is None:  # a layer move: verify it
            if n_eval >= max_evals:
                res.exhausted = True
                break
            rec = evaluate(cand, "greedy")
            n_eval += 1
        step = _step({"stream": name[1]} if isinstance(name, tuple) else {"layer": name}, k_new, est, gain, rec, key,
                     objective)
        if rec[key] <= budget + EPS:
            config, current = cand, rec
            res.accepted.append(step)
            if rec[objective] < res.best[objective] or (rec[objective] == res.best[objective]
                                                        and rec[key] < res.best[key]):
                res.best = {**rec, "step": len(res.accepted)}
        else:  # only layer moves get here: a stream move was probed within the budget
            floor[name] = k_new
            res.rejected.append(step)
    res.evaluations = n_eval
    return res


def _step(move: dict, k: int, est: float, gain, rec: dict, key: str, objective: str, probe: bool = False) -> dict:
    out = {**move, "k": k, "estimated_cost_pts": est, "gain": gain, "drop_pts": rec["drop_pts"], key: rec[key],
           objective: rec[objective], "config": rec["config"]}
    if probe:
        out["probe"] = True
    return out


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
               progress: bool = True, layers: list[str] | None = None, grid=K_GRID, spread_seeds: int = 5,
               stream=(), stream_fractions=STREAM_FRACTIONS) -> dict:
    """Sweep missing sensitivity points, run the greedy for each budget, evaluate the uniform
    configurations, and write everything to ``path``. ``stream``: stages (1..3) that get
    residual-stream moves (module doc), () for none; ``stream_fractions``: their k grid. Both are
    pinned in the file's header (``"stream_moves"``, null when off; files from before it mean off):
    a resume with another setting raises ResultsMismatch. Returns the result document:
    ``{"header", "evaluations": {config key: record}, "runs": {run key: GreedyResult dict, with the
    best configuration's ``seed_spread`` over ``spread_seeds`` k-means seeds},
    "uniform": [config keys], "pareto": {"macs": [...], "params": [...]}}``.

    Raises ResultsMismatch (file from other weights/data, or other stream moves), ClusteringError
    (bad options).
    """
    options = replace(options, ks={}).validate()
    if options.active_stream:
        raise ClusteringError("the search starts from the unclustered net and chooses stream ks itself with stream "
                              "moves (--stream); drop --stream-k")
    stream_moves = search_stream_setting(stream, stream_fractions)
    if stream_moves is not None and not (options.fold_bn and options.metric == "euclidean"):
        raise ClusteringError("stream moves (--stream) need fold_bn and metric=euclidean (stream clustering "
                              "merges channels only when they are identical after BatchNorm); add --fold-bn")
    if options.granularity != "filter":
        raise ClusteringError("search needs granularity 'filter' (kernel clustering has no structural savings)")
    if objective not in OBJECTIVES:
        raise ClusteringError(f"objective must be one of {OBJECTIVES}")
    path = Path(path)
    sensitivity_path = Path(sensitivity_path) if sensitivity_path else path.with_name(
        path.name.replace(SUFFIX, SENS_SUFFIX) if path.name.endswith(SUFFIX) else path.stem + SENS_SUFFIX)
    sweep(explorer, sensitivity_path, layers, [options], grid, progress=progress)
    # Choices are made on held-out training images; the test split is only reported.
    drops = drop_table(load_sensitivity(sensitivity_path), options, column="select_drop_pts")

    fresh = restart or not path.is_file()
    doc = open_results(path, header(explorer), restart=restart)
    if not fresh and doc["header"].get("stream_moves") != stream_moves:
        was = doc["header"].get("stream_moves")
        raise ResultsMismatch(
            f"{path.name} was searched with stream moves {json.dumps(was)}, now {json.dumps(stream_moves)} (--stream "
            f"changed). Pass --restart to discard it, or --out to write elsewhere.")
    doc["header"]["stream_moves"] = stream_moves
    doc["header"]["sensitivity_file"] = sensitivity_path.name
    ev = Evaluations(explorer, doc, lambda: save_results(doc, path), store="evaluations", required="select_top1",
                     record=lambda result, source: evaluation_record(result, source, explorer.select_top1(result.config)))
    cost = CostModel(explorer.model)
    stages = tuple(stream_moves["stages"]) if stream_moves else ()

    def admissible(cfg):  # a fine-tuned stream-clustered checkpoint holds fewer distinct channels
        return not limits.problems(explorer.model, cfg)

    runs = doc.setdefault("runs", {})
    t0 = time.perf_counter()
    for b in budgets:
        rk = run_key(b, objective, options)
        r = greedy(ev, cost, drops, options, b, objective, tau, max_evals, layers, stream=stages,
                   stream_fractions=tuple(stream_fractions), admissible=admissible)
        runs[rk] = {**r.to_dict(), "options": options_key(options), "tau": tau}
        if r.best is not None and ClusteringConfig.from_dict(r.best["config"]).clustered and spread_seeds > 1:
            # How much the k-means draw moves the chosen configuration (test split, measured only).
            runs[rk]["seed_spread"] = explorer.seed_spread(ClusteringConfig.from_dict(r.best["config"]), spread_seeds)
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
        if limits.problems(explorer.model, cfg):  # above a fine-tuned layer's distinct filters
            continue
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


def search_stream_setting(stream=(), fractions=STREAM_FRACTIONS) -> dict | None:
    """The header's ``"stream_moves"``: ``{"stages": [...], "fractions": [...]}``, or None when no
    stage gets stream moves. Raises ClusteringError for an unknown stage or a fraction outside (0, 1)."""
    stages = sorted(set(stream or ()))
    if not stages:
        return None
    bad = [s for s in stages if isinstance(s, bool) or s not in STREAM_STAGES]
    if bad:
        raise ClusteringError(f"unknown residual-stream stage {bad[0]!r} for --stream; valid stages: 1, 2, 3")
    fr = sorted({float(f) for f in fractions}, reverse=True)
    if not fr or any(not 0 < f < 1 for f in fr):
        raise ClusteringError("--stream-fractions must be fractions of the stream's width in (0, 1), e.g. 0.75 0.5")
    return {"stages": stages, "fractions": fr}


def config_options_key(config_dict: dict) -> str:
    """:func:`options_key` of a recorded configuration, without its stream ks (those are search moves,
    not options)."""
    return options_key(replace(ClusteringConfig.from_dict(config_dict), stream={}))


# ---------------------------------------------------------------- readers for the app and the report

def load_search(path: str | Path) -> dict:
    """The result document written by :func:`run_search`. Raises CheckpointError if unreadable."""
    return ckpt.read_json(path)


def best_record(path_or_doc, budget: float, objective: str = "macs", options: ClusteringConfig | None = None
                ) -> dict | None:
    """The verified evaluation with the lowest ``objective`` whose drop on the held-out training
    images is at most ``budget`` points (ties: smaller drop), among all evaluations in the file
    (greedy steps, back-offs and uniform configurations) - optionally only those with ``options``'
    clustering options. Records from before the held-out figure existed use their test drop (and
    say so: ``"chosen_on": "test"``). None when no clustered configuration qualifies."""
    doc = load_search(path_or_doc) if not isinstance(path_or_doc, dict) else path_or_doc
    ok = []
    for r in doc.get("evaluations", {}).values():
        r = {**r, "chosen_on": "holdout" if "select_drop_pts" in r else "test"}
        r["budget_drop_pts"] = r.get("select_drop_pts", r["drop_pts"])
        if not (r["config"]["ks"] or r["config"].get("stream")) or r["budget_drop_pts"] > budget + EPS:
            continue
        if options is not None and config_options_key(r["config"]) != options_key(replace(options, stream={})):
            continue
        ok.append(r)
    if not ok:
        return None
    return min(ok, key=lambda r: (r[objective], r["budget_drop_pts"]))


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
    mac_reduction, compression_ratio, metric, fold_bn, recalibrate_bn, layers_clustered, config (the
    ks), stream (the stream ks, "{}" when none), pareto_macs, pareto_params)."""
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
                     "stream": json.dumps(r["config"].get("stream", {})),
                     "pareto_macs": key in front.get("macs", ()), "pareto_params": key in front.get("params", ())})
    return pd.DataFrame(rows)
