"""Stage-width configurations at a MACs target, ranked without training (``python -m explorer.search --widths``).

The greedy search (:mod:`.search`) lowers one layer or stream at a time under an accuracy budget; a
net meant for fine-tuning is instead chosen at a *MACs target* among whole shapes. A shape gives
each stage s (1..3) a residual-stream k ``stream[s]`` (the coupled clustering of the stem and every
block's second conv, :func:`explorer.clustering.cluster_stream`; its width means unclustered) and
one k ``conv1[s]`` for the first conv of each of its three blocks. :func:`width_grid` lists the
shapes whose analytic MAC count (:func:`shape_macs`) saves a fraction of MACs in
``[target, target + band]``, with every k a multiple of ``step``, the option-A shortcut's rule
(:func:`explorer.clustering.stream_min_k`: a stage's stream k exceeds the previous stage's), and
no k above its stage's width (the width itself: unclustered); :func:`rank_widths` clusters each one with the
given options (data-aware k-means and least-squares recovery, say) and ranks them by top-1 on the
2,000 held-out *training* images (:meth:`explorer.pipeline.Explorer.select_top1`), so the test
split never chooses. The MACs recorded are the real count of the compressed net
(:func:`explorer.compress.count_macs`).

Why whole shapes and a step: the fine-tuned net's accuracy is decided by training, so the choice
only needs a start that is not already far behind; and a conv whose output width is not a multiple
of 8 runs slower on oneDNN than the same conv padded (``python -m explorer.bench --conv-widths``),
so ``step=8`` keeps the shipped net's real latency close to what its MACs promise.
"""
from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import checkpoints as ckpt
from ..clustering import ClusteringConfig, ClusteringError, stream_min_k
from ..compress import count_macs
from ..digest import state_digest
from ..model import BLOCKS_PER_STAGE, STAGE_WIDTHS, STREAM_STAGES, stream_width
from .results import ResultsMismatch

SUFFIX = ".widths.json"
NUM_CLASSES = 10
MAP_SIZES = (32 * 32, 16 * 16, 8 * 8)  # pixels of each stage's feature maps on a 32x32 image


@dataclass(frozen=True)
class StageWidths:
    """One shape: residual-stream k and block-first-conv k per stage (1..3), each in 1..the stage's
    width (``stream[s] == width`` leaves that stream unclustered)."""

    stream: tuple[int, int, int]
    conv1: tuple[int, int, int]

    def config(self, options: ClusteringConfig | None = None) -> ClusteringConfig:
        """The :class:`ClusteringConfig` of this shape, with ``options``' other fields (metric,
        fold_bn, space, recovery, ...). Raises ClusteringError when the options cannot cluster a
        stream (stream clustering needs fold_bn, filter granularity and the euclidean metric)."""
        d = (options or ClusteringConfig(fold_bn=True)).to_dict()
        d["ks"] = {f"layer{s}.{b}.conv1": k for s, k in zip(STREAM_STAGES, self.conv1)
                   for b in range(BLOCKS_PER_STAGE) if k < stream_width(s)}
        d["stream"] = {s: k for s, k in zip(STREAM_STAGES, self.stream) if k < stream_width(s)}
        return ClusteringConfig.from_dict(d).validate()

    def label(self) -> str:
        """``streams 8/24/64, conv1 8/8/40``."""
        return (f"streams {'/'.join(map(str, self.stream))}, conv1 {'/'.join(map(str, self.conv1))}")


def shape_macs(shape: StageWidths) -> int:
    """Multiply-accumulates per 32x32 image of the merged net of ``shape``: every 3x3 conv is
    9 x in x out x map pixels (the stem reads 3 channels; a stage's first block reads the previous
    stage's stream at stride 2), plus the classifier. Equals :func:`explorer.compress.count_macs` of
    the compressed net (the option-A shortcut and the adds cost no MACs)."""
    s, c = shape.stream, shape.conv1
    macs = 9 * 3 * s[0] * MAP_SIZES[0]
    for i in range(3):
        for b in range(BLOCKS_PER_STAGE):
            reads = s[i - 1] if (b == 0 and i > 0) else s[i]
            macs += 9 * reads * c[i] * MAP_SIZES[i] + 9 * c[i] * s[i] * MAP_SIZES[i]
    return macs + s[2] * NUM_CLASSES


BASELINE_SHAPE = StageWidths(STAGE_WIDTHS, STAGE_WIDTHS)


def width_grid(target: float, band: float = 0.005, step: int = 8) -> list[StageWidths]:
    """Every shape whose analytic MACs (:func:`shape_macs`) save a fraction in ``[target, target +
    band]`` of the unclustered ResNet20's, every k a multiple of ``step`` (and at most its stage's
    width; the width itself is always offered), and each clustered stream's k above the previous stage's (:func:`explorer.clustering.stream_min_k`).
    Sorted by fraction saved, then shape. Raises ClusteringError for a target outside (0, 1), a
    negative band or a step outside 1..16."""
    if not 0 < target < 1:
        raise ClusteringError(f"--target-reduction must be a fraction in (0, 1), e.g. 0.65; got {target}")
    if band < 0:
        raise ClusteringError(f"--band must be >= 0; got {band}")
    if not 1 <= step <= STAGE_WIDTHS[0]:
        raise ClusteringError(f"--step must be in 1..{STAGE_WIDTHS[0]}; got {step}")
    base = shape_macs(BASELINE_SHAPE)
    ks = [sorted({*range(step, w + 1, step), w}) for w in STAGE_WIDTHS]  # the width: that k unclustered
    out = []
    for stream in itertools.product(*ks):
        clustered = {st: k for st, k in zip(STREAM_STAGES, stream) if k < stream_width(st)}
        if any(k < stream_min_k(st, clustered) for st, k in clustered.items()):
            continue  # option A: stage s+1 holds every cluster of stage s plus the zero-padded group
        for conv1 in itertools.product(*ks):
            shape = StageWidths(tuple(stream), tuple(conv1))
            saved = 1 - shape_macs(shape) / base
            if target - 1e-12 <= saved <= target + band + 1e-12:
                out.append((saved, shape))
    out.sort(key=lambda t: (t[0], t[1].stream, t[1].conv1))
    return [s for _, s in out]


def _read_ranking(path: Path) -> dict | None:
    """The ranking in ``path``, or None (with a line on stderr) when it is damaged: cut short,
    overwritten, or its records unreadable; the shapes are then ranked again. Raises ClusteringError
    for a readable JSON file that is not a ranking (another command's results)."""
    try:
        old = ckpt.read_json(path)
    except ckpt.CheckpointError as e:
        print(f"{e}; ranking again from the start", file=sys.stderr)
        return None
    if "options" not in old and "records" not in old:
        raise ClusteringError(f"{path.name} is not a --widths ranking (no options, no records); give --out "
                              "another file")
    records = old.get("records")
    fields = ("stream", "conv1", "label", "config", "macs", "mac_reduction", "select_top1", "select_drop_pts")
    if not (isinstance(old.get("options"), dict) and isinstance(records, list)
            and all(isinstance(r, dict) and all(f in r for f in fields) for r in records)):
        print(f"{path.name}: damaged ranking; ranking again from the start", file=sys.stderr)
        return None
    return old


def rank_widths(explorer, shapes: list[StageWidths], options: ClusteringConfig, path: str | Path | None = None,
                progress: bool = True) -> dict:
    """Cluster every shape with ``options`` (:meth:`StageWidths.config`) and rank them by top-1 on
    the held-out training images. Resumable: records already in ``path`` (same options) are kept.
    Returns ``{"options": ..., "baseline_select_top1": f, "records": [{"stream", "conv1", "label",
    "config", "macs", "mac_reduction", "select_top1", "select_drop_pts"}, ...]}``, best first;
    written atomically to ``path`` after every shape; the file pins the checkpoint's weights
    (``weights_sha1``) and the dataset. A damaged file is ranked again. Raises ClusteringError for
    options that cannot cluster a stream or a file that is not a ranking, ResultsMismatch for a file
    ranked on other weights, data or options."""
    opts = options.to_dict()
    opts.pop("ks", None), opts.pop("stream", None)
    pins = {"weights_sha1": state_digest(explorer.model), "dataset": explorer.data.identity.to_dict()}
    doc = {**pins, "options": opts, "baseline_select_top1": None, "records": []}
    if path is not None and Path(path).exists():
        old = _read_ranking(Path(path))
        if old is not None:
            for key, want in pins.items():
                if old.get(key) != want:
                    raise ResultsMismatch(f"{Path(path).name} was ranked on another {'checkpoint' if key == 'weights_sha1' else 'dataset'} "
                                          f"({key} {old.get(key)!r}, now {want!r}); pass --restart to discard it, "
                                          "or --out to write elsewhere")
            if old["options"] != opts:
                raise ResultsMismatch(f"{Path(path).name} was ranked with other clustering options ({old['options']}); "
                                      "pass --restart to discard it, or --out to write elsewhere")
            doc = old
    done = {(tuple(r["stream"]), tuple(r["conv1"])) for r in doc["records"]}
    base_macs = count_macs(explorer.model)
    for i, shape in enumerate(shapes):
        if (shape.stream, shape.conv1) in done:
            continue
        t = time.perf_counter()
        config = shape.config(options)
        top1, base = explorer.select_top1(config)
        macs = count_macs(explorer.compressed(config))
        doc["baseline_select_top1"] = base
        doc["records"].append({"stream": list(shape.stream), "conv1": list(shape.conv1), "label": shape.label(),
                               "config": config.to_dict(), "macs": macs, "mac_reduction": 1 - macs / base_macs,
                               "select_top1": top1, "select_drop_pts": 100.0 * (base - top1)})
        doc["records"].sort(key=lambda r: (-r["select_top1"], r["macs"]))
        if path is not None:
            ckpt.save_json(doc, path)
        if progress:
            print(f"[{i + 1}/{len(shapes)}] {shape.label()}: {100 * (1 - macs / base_macs):.1f}% fewer MACs, "
                  f"held-out top-1 {100 * top1:.2f}% ({time.perf_counter() - t:.1f} s)", file=sys.stderr, flush=True)
    return doc
