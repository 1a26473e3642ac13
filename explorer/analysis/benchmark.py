"""Benchmark of the live path (:func:`run`, :func:`exactness`; command line: ``python -m explorer.bench``).

Measures in one run, on this machine, the slider-to-full-result time of the fast path
(:class:`explorer.pipeline.Explorer` with :mod:`explorer.engine`) against the naive baseline a
newcomer would write: apply the configuration, then a fresh eager fp32 pass over all test images in
the default memory layout with batch 500. Returns seconds and speed-up ratios; tests never assert
timings. The figures of the last runs are in the README and docs/engine.md.
"""
from __future__ import annotations

import random
import resource
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .. import checkpoints as ckpt
from ..clustering import ClusteringConfig, cluster_layer, prune
from ..data import load_cifar10, normalize
from ..model import CONV_LAYERS


@torch.inference_mode()
def naive_evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 by a plain eager fp32 pass, default (NCHW) layout, batch 500: the naive reference."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += (model(normalize(images[i : i + batch_size])).argmax(1) == labels[i : i + batch_size]).sum().item()
    return correct / len(images)


def _pct(xs, q):
    return float(np.percentile(xs, q))


def _rss_mb(field: str = "VmRSS") -> float:
    """Current (VmRSS) or peak (VmHWM) resident set size in MB (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def random_changes(seed: int, n: int):
    """The slider sequence every measurement here replays: ``n`` single-layer changes, each a random
    layer set to a random k in [1, filters - 1], accumulated from "nothing clustered". Yields
    (layer name, ClusteringConfig after the change); the same sequence for the same seed."""
    rng, cfg = random.Random(seed), ClusteringConfig()
    for _ in range(n):
        layer = rng.choice(CONV_LAYERS)
        cfg = cfg.with_k(layer.name, rng.randint(1, layer.filters - 1))
        yield layer.name, cfg


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(checkpoint: str, data_root: str | None, changes: int, seed: int, naive_repeats: int,
        sessions: int = 3, data=None, umap: bool = True) -> dict:
    """Run every measurement of the module doc; returns the JSON-ready result dict.
    ``data``: an already loaded dataset (tests pass a small synthetic one)."""
    from ..pipeline import Explorer

    t0 = time.perf_counter()
    data = data if data is not None else load_cifar10(data_root)
    t_data = time.perf_counter() - t0
    _log("data loaded; building the explorer (baseline evaluation)")
    t0 = time.perf_counter()
    explorer = Explorer(ckpt.load_model(checkpoint), data, "bench")
    t_explorer = time.perf_counter() - t0
    base = explorer.model
    x, y = data.test_images, data.test_labels

    def timed(fn):
        t = time.perf_counter()
        r = fn()
        return time.perf_counter() - t, r

    def naive(cfg):
        def go():
            model, _ = prune(base, cfg, data.train_images)
            return naive_evaluate(model, x, y)
        return timed(go)

    results: dict = {"cold_start": {"data_s": t_data, "explorer_s": t_explorer}}
    # Warm k-means for the fixed scenarios so both paths pay the same (cached) clustering cost.
    last = ClusteringConfig().with_k("layer3.2.conv2", 32)
    first = ClusteringConfig().with_k("conv1", 8)
    for cfg in (last, first):
        prune(base, cfg)
    scen = {}
    for label, cfg in (("last_layer", last), ("first_layer", first)):
        explorer.run(ClusteringConfig())  # the previous slider state: nothing clustered
        fast_s, res = timed(lambda: explorer.run(cfg))
        naive_s, naive_top1 = naive(cfg)
        scen[label] = {"fast_s": fast_s, "naive_s": naive_s, "speedup": naive_s / fast_s,
                       "top1_fast": res.evaluation.top1, "top1_naive": naive_top1}
    results["scenarios"] = scen
    rss = {"after_cold_start": _rss_mb(), "peak_after_cold_start": _rss_mb("VmHWM")}
    _log(f"scenarios done; {changes} random single-layer changes")

    fast, previews, kmeans_s = [], [], []
    rechecked0, cfg = explorer.engine.stats["rechecked"], ClusteringConfig()
    for _, cfg in random_changes(seed, changes):
        t = time.perf_counter()
        explorer.preview(cfg)
        previews.append(time.perf_counter() - t)
        t = time.perf_counter()
        explorer.run(cfg)
        fast.append(time.perf_counter() - t)
    rss["after_random_sequence"] = _rss_mb()
    rss["peak_after_random_sequence"] = _rss_mb("VmHWM")
    rechecked = explorer.engine.stats["rechecked"] - rechecked0
    _log("random sequence done; naive passes")
    naive_times = [naive(cfg)[0] for _ in range(naive_repeats)]
    nmed = statistics.median(naive_times)
    results["random_sequence"] = {
        "changes": changes, "fast_median_s": statistics.median(fast), "fast_p90_s": _pct(fast, 90),
        "preview_median_s": statistics.median(previews), "preview_p90_s": _pct(previews, 90),
        "naive_median_s": nmed, "speedup_median": nmed / statistics.median(fast),
        "speedup_p90": nmed / _pct(fast, 90),
        "fast_s": [round(t, 3) for t in fast],
    }
    results["engine_path"] = "mixed (bf16 + fp32 re-check)" if explorer.engine.mixed else "fp32"
    results["rechecked_per_change"] = rechecked / max(1, changes)  # previews re-check nothing

    # Teammates: ``sessions`` threads each moving sliders at once on the one shared Explorer (as
    # the app's sessions do); peak memory below covers this phase.
    _log(f"{sessions} concurrent sessions")

    def session(i: int) -> float:
        t = time.perf_counter()
        for _, c in random_changes(seed + 100 + i, 3):
            explorer.preview(c)
            explorer.run(c)
        return (time.perf_counter() - t) / 3

    with ThreadPoolExecutor(sessions) as pool:
        per_change = list(pool.map(session, range(sessions)))
    rss["after_sessions"] = _rss_mb()
    rss["peak_after_sessions"] = _rss_mb("VmHWM")
    results["rss_mb"] = rss
    results["sessions"] = {"sessions": sessions, "changes_each": 3, "mean_s_per_change": statistics.mean(per_change)}
    modules = dict(base.named_modules())
    for layer in CONV_LAYERS:
        c = ClusteringConfig(seed=seed + 1)  # a seed the app has not cached
        t = time.perf_counter()
        cluster_layer(layer.name, modules[layer.name].weight, modules[layer.bn], max(1, layer.filters // 2), c)
        kmeans_s.append(time.perf_counter() - t)
    results["kmeans_per_layer_p50_s"] = statistics.median(kmeans_s)
    _log("k-means per layer, UMAP")
    try:
        if not umap:
            raise ImportError
        from ..projection import embed

        w = modules["layer3.2.conv2"].weight.detach().reshape(64, -1).numpy()
        # First call: numba compiles UMAP's kernels (once per process); repeated: a new layer's
        # filters (different points, so not served from the projection cache).
        t1, _ = timed(lambda: embed(w, method="umap"))
        t2, _ = timed(lambda: embed(w * 1.0001, method="umap"))
        results["umap"] = {"first_call_s": t1, "repeated_call_s": t2}
    except ImportError:
        results["umap"] = None
    rss["after_umap"] = _rss_mb()
    results["engine"] = dict(explorer.engine.stats, cache_mb=explorer.engine.cache.bytes / 2**20)
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["threads"] = torch.get_num_threads()
    return results


def recovery_cost(checkpoint: str, data_root: str | None, changes: int = 20, seed: int = 0, data=None) -> dict:
    """What least-squares recovery adds to a slider move, measured in one run: the random slider
    sequence (:func:`random_changes`) replayed without recovery (weight space), with least squares
    (weight space) and with the app's default (data-aware space + least squares), each full result
    timed (clustering, recovery, compression and the full-test evaluation). Returns per variant the
    median / p90 seconds and the median extra over "none" per change (same change, same run), and
    the one-time cost of the training-image statistics (warmed before timing). The last variant is
    the app's default with :func:`explorer.recovery.lsq_recover`'s re-fitted-prefix cache off, for
    the speed-up of that cache in the same run."""
    from dataclasses import replace

    from .. import recovery
    from ..lru import ActivationCache
    from ..pipeline import Explorer

    data = data if data is not None else load_cifar10(data_root)
    explorer = Explorer(ckpt.load_model(checkpoint), data, "bench")
    seq = [cfg for _, cfg in random_changes(seed, changes)]
    t = time.perf_counter()
    explorer.run(ClusteringConfig(ks={"conv1": 8}, space="data", recovery="lsq"))  # statistics: once per checkpoint
    stats_s = time.perf_counter() - t
    variants = {"none": {}, "lsq": {"recovery": "lsq"}, "data+lsq": {"space": "data", "recovery": "lsq"},
                "data+lsq, no prefix cache": {"space": "data", "recovery": "lsq", "seed": 1}}
    # Each variant gets its own re-fitted-prefix cache, as if it were the only session (interleaved
    # variants would otherwise evict each other's prefixes); the last one none at all. Its k-means
    # seed differs only so that it cannot reuse the third variant's cached nets (so its clusterings,
    # and top-1, differ too). The swap is of a module global: nothing else in this process may
    # re-fit meanwhile (a benchmark process runs nothing else).
    prefixes = {v: ActivationCache(recovery.PREFIX_CACHE_MB * 2**20 if v != "data+lsq, no prefix cache" else 0)
                for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    top1: dict[str, list[float]] = {v: [] for v in variants}
    _log(f"recovery cost: {changes} changes x {len(variants)} variants")
    saved = recovery._PREFIXES
    try:
        for cfg in seq:
            for v, opts in variants.items():  # interleaved, so host speed drifts hit every variant alike
                c = replace(cfg, **opts)
                recovery._PREFIXES = prefixes[v]
                t = time.perf_counter()
                r = explorer.run(c)
                times[v].append(time.perf_counter() - t)
                top1[v].append(r.evaluation.top1)
    finally:
        recovery._PREFIXES = saved
    out = {"changes": changes, "statistics_s": stats_s, "threads": torch.get_num_threads()}
    for v in variants:
        out[v] = {"median_s": statistics.median(times[v]), "p90_s": _pct(times[v], 90),
                  "mean_top1": statistics.mean(top1[v]), "top1": top1[v]}
        if v != "none":
            extra = [a - b for a, b in zip(times[v], times["none"])]
            out[v].update(extra_median_s=statistics.median(extra), extra_p90_s=_pct(extra, 90),
                          ratio_median=statistics.median(times[v]) / statistics.median(times["none"]))
    return out


def format_recovery_cost(r: dict) -> str:
    out = [f"{'variant':<27}{'median s':>10}{'p90 s':>8}{'extra median s':>16}{'extra p90 s':>13}{'mean top-1':>12}"]
    for v in ("none", "lsq", "data+lsq", "data+lsq, no prefix cache"):
        if v not in r:
            continue
        x = r[v]
        out.append(f"{v:<27}{x['median_s']:10.2f}{x['p90_s']:8.2f}{x.get('extra_median_s', 0):16.2f}"
                   f"{x.get('extra_p90_s', 0):13.2f}{100 * x['mean_top1']:11.2f}%")
    if "data+lsq, no prefix cache" in r:
        a, b = r["data+lsq"], r["data+lsq, no prefix cache"]
        out.append(f"re-fitted-prefix cache: least squares' extra median {b['extra_median_s']:.2f} s -> "
                   f"{a['extra_median_s']:.2f} s; whole move median {b['median_s'] / a['median_s']:.2f}x faster")
    out.append(f"{r['changes']} random single-layer changes (cumulative, from nothing clustered), each variant on the "
               f"same change in the same run; training-image statistics, once per checkpoint: {r['statistics_s']:.1f} s")
    return "\n".join(out)


def exactness(checkpoint: str, data_root: str | None, seeds: tuple[int, ...] = (0, 7, 11), changes: int = 15,
              data=None) -> dict:
    """How far the reported (mixed) path's predictions are from fp32: for ``changes`` random
    single-layer changes from each of ``seeds``, the number of the N predictions that differ from the
    fp32 engine's (equal to an eager fp32 pass up to float rounding), the images re-checked, and the
    bf16 flip error over all N images against the audit's and against the final re-check bound tau
    (where tau exceeds it, no prediction could differ).
    Returns a JSON-ready dict; ``data`` as in :func:`run`."""
    from ..compress import compress
    from ..engine import FastEvaluator, flip_error

    data = data if data is not None else load_cifar10(data_root)
    base = ckpt.load_model(checkpoint)
    fast = FastEvaluator(data.test_images, data.test_labels, mixed=True)
    ref = FastEvaluator(data.test_images, data.test_labels, mixed=False, cache_mb=700, split=False)
    rows = []
    for seed in seeds:
        for i, (layer, cfg) in enumerate(random_changes(seed, changes)):
            model, cl = prune(base, cfg, data.train_images)
            net = compress(model, cl)
            pred, exact = fast.predictions(net), ref.logits(net)
            low = fast.bf16_logits(net)  # from the activations cached by the call above
            full = flip_error(low, exact)
            audit = flip_error(fast.bf16_logits(net, "audit"), exact[fast.audit_index])
            top2 = low.topk(2, dim=1).values
            margin, flipped = top2[:, 0] - top2[:, 1], low.argmax(1) != exact.argmax(1)
            rows.append({"seed": seed, "change": i, "layer": layer, "differ": int((pred != exact.argmax(1)).sum()),
                         "rechecked": fast.stats["last_rechecked"], "tau": fast.stats["last_tau"],
                         "tau_initial": max(fast.tau, fast.safety * audit),
                         "flip_error_full": full, "flip_error_audit": audit,
                         # headroom: what smaller safety factors (no floor, no widening) would have let through
                         "differ_at_safety": {str(f): int((flipped & (margin >= f * audit)).sum()) for f in (0.5, 1.0)}})
            _log(f"seed {seed} change {i}: {rows[-1]['differ']} differ, {rows[-1]['rechecked']} re-checked")
    return {"images": len(data.test_labels), "configurations": len(rows), "safety": fast.safety,
            "differ_total": sum(r["differ"] for r in rows), "differ_max": max(r["differ"] for r in rows),
            "full_over_audit_max": max(r["flip_error_full"] / max(r["flip_error_audit"], 1e-12) for r in rows),
            # >= 1: the final bound exceeded the flip error of every image, so none could differ
            "tau_over_full_min": min(r["tau"] / max(r["flip_error_full"], 1e-12) for r in rows),
            "tau_initial_over_full_min": min(r["tau_initial"] / max(r["flip_error_full"], 1e-12) for r in rows),
            "differ_at_safety_max": {f: max(r["differ_at_safety"][f] for r in rows) for f in ("0.5", "1.0")},
            "rows": rows}


def format_table(r: dict) -> str:
    s = r["random_sequence"]
    rows = [
        ("change in the last layer", r["scenarios"]["last_layer"]),
        ("change in the first layer", r["scenarios"]["first_layer"]),
    ]
    out = [f"{'scenario':<34}{'naive s':>9}{'fast s':>9}{'speed-up':>10}"]
    for name, v in rows:
        out.append(f"{name:<34}{v['naive_s']:9.2f}{v['fast_s']:9.2f}{v['speedup']:9.1f}x")
    n = s["changes"]
    out.append(f"{f'{n} random changes, median':<34}{s['naive_median_s']:9.2f}{s['fast_median_s']:9.2f}"
               f"{s['speedup_median']:9.1f}x")
    out.append(f"{f'{n} random changes, p90':<34}{s['naive_median_s']:9.2f}{s['fast_p90_s']:9.2f}"
               f"{s['speedup_p90']:9.1f}x")
    out.append(f"{'preview (2,000 images), median':<34}{'':>9}{s['preview_median_s']:9.2f}")
    out.append(f"k-means per layer p50: {r['kmeans_per_layer_p50_s']:.3f} s; cold start: data "
               f"{r['cold_start']['data_s']:.1f} s + model/baseline {r['cold_start']['explorer_s']:.1f} s")
    if r.get("umap"):
        out.append(f"UMAP first call {r['umap']['first_call_s']:.1f} s, repeated {r['umap']['repeated_call_s']:.2f} s")
    out.append(f"{r['sessions']['sessions']} concurrent sessions: {r['sessions']['mean_s_per_change']:.2f} s per change "
               f"(preview + full) each")
    out.append(f"engine path: {r['engine_path']}, {r['rechecked_per_change']:.0f} images re-checked in fp32 per "
               f"change on average")
    out.append(f"peak RSS {r['peak_rss_mb']:.0f} MB (whole run, sessions included), torch threads {r['threads']}")
    return "\n".join(out)
