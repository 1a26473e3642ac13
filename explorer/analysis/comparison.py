"""Side by side: the clustering spaces and recoveries (issue "clustering that keeps accuracy
without training"), from the sensitivity sweep's points where each layer alone is clustered to
half its filters. Pure pandas over :func:`explorer.analysis.sensitivity.load_sensitivity`'s frame;
the Analysis page and the report draw the same tables."""
from __future__ import annotations

import pandas as pd

from ..clustering import RECOVERIES, SPACES
from ..model import CONV_LAYER_NAMES

SPACE_NAMES = {"weight": "weight space", "data": "data-aware"}
RECOVERY_NAMES = {"none": "no recovery", "bn": "BN re-estimation", "lsq": "least squares"}


def variant_name(space: str, recovery: str) -> str:
    """``"data-aware + least squares"`` and the like."""
    return f"{SPACE_NAMES.get(space, space)} + {RECOVERY_NAMES.get(recovery, recovery)}"


def half_points(df: pd.DataFrame, fold_bn: bool = False, metric: str = "euclidean") -> pd.DataFrame:
    """The sensitivity rows with k = half the layer's filters, filter granularity, ``metric`` and
    ``fold_bn``, 3 k-means restarts, any space, recovery and seed; a ``variant`` column names the
    space and recovery. Empty when none are measured."""
    if df.empty:
        return df
    m = ((df["k"] * 2 == df["filters"]) & (df["granularity"] == "filter") & (df["fold_bn"] == fold_bn)
         & (df["metric"] == metric) & (df["n_init"] == 3) & (df["seeds"] == 1))
    out = df[m].copy()
    out["variant"] = [variant_name(s, r) for s, r in zip(out["space"], out["recovery"])]
    return out


def _order(variants) -> list[str]:
    rank = {variant_name(s, r): i for i, (s, r) in enumerate((s, r) for s in SPACES for r in RECOVERIES)}
    return sorted(set(variants), key=lambda v: rank.get(v, len(rank)))


def half_table(half: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Points lost per layer (rows, forward order) and variant (columns) at half the filters, one
    k-means seed; a last row ``mean`` over the layers measured in every variant shown."""
    h = half[half["seed"] == seed]
    if h.empty:
        return pd.DataFrame()
    piv = h.pivot_table(index="layer", columns="variant", values="drop_pts", aggfunc="first")
    piv = piv.reindex([n for n in CONV_LAYER_NAMES if n in piv.index])[_order(piv.columns)]
    complete = piv.dropna()
    piv.loc["mean (layers in every column)"] = complete.mean()
    return piv


def summary(half: pd.DataFrame) -> pd.DataFrame:
    """One row per variant: layers measured, mean and worst points lost at half the filters (seed
    0), the same on the held-out training images, and the seed spread (max - min top-1 over the
    k-means seeds measured, mean and worst over layers; points). Sorted in the spaces' and
    recoveries' order."""
    rows = []
    for v in _order(half["variant"]) if not half.empty else []:
        g = half[half["variant"] == v]
        s0 = g[g["seed"] == 0]
        spread = g.groupby("layer")["top1"].agg(["min", "max", "count"])
        spread = spread[spread["count"] > 1]
        rows.append({
            "variant": v, "layers": int(len(s0)),
            "mean drop (pp)": float(s0["drop_pts"].mean()) if len(s0) else float("nan"),
            "worst drop (pp)": float(s0["drop_pts"].max()) if len(s0) else float("nan"),
            "mean held-out drop (pp)": float(s0["select_drop_pts"].mean()) if len(s0) else float("nan"),
            "seeds": int(spread["count"].max()) if len(spread) else 1,
            "mean seed spread (pp)": float(100 * (spread["max"] - spread["min"]).mean()) if len(spread) else float("nan"),
            "worst seed spread (pp)": float(100 * (spread["max"] - spread["min"]).max()) if len(spread) else float("nan"),
        })
    return pd.DataFrame(rows)


def spread_of(half: pd.DataFrame, layer: str, variant: str) -> dict | None:
    """{"seeds", "min", "median", "max"} top-1 (fractions) of one layer at half its filters over
    the k-means seeds measured for ``variant``; None when fewer than two seeds are."""
    g = half[(half["layer"] == layer) & (half["variant"] == variant)]
    if len(g) < 2:
        return None
    return {"seeds": sorted(int(s) for s in g["seed"]), "min": float(g["top1"].min()),
            "median": float(g["top1"].median()), "max": float(g["top1"].max())}
