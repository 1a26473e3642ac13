"""What the command-line front ends share: parsers with a short description and examples in the
epilog, the clustering-option flags (one place: :func:`add_clustering_args` /
:func:`clustering_options`), the analysis flags, and one error convention (exit 2 with one
``error:`` line; 130 on Ctrl-C with how to resume)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Callable

import torch

from .. import checkpoints as ckpt
from ..analysis.results import ResultsMismatch, default_checkpoint, load_data, make_explorer
from ..clustering import GRANULARITIES, METRICS, RECOVERIES, SPACES, ClusteringConfig, ClusteringError
from ..data import DataNotFoundError

# What a command reports as "error: <message>" with exit status 2.
ERRORS = (ValueError, ClusteringError, ckpt.CheckpointError, DataNotFoundError, ResultsMismatch)
DATA_HELP = "local CIFAR-10 directory (default $EXPLORER_DATA, else download)"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Examples in the epilog keep their lines; every flag's help shows its default."""


def parser(command: str, description: str, examples: str = "") -> argparse.ArgumentParser:
    """An ArgumentParser for ``python -m explorer.<command>``: ``--help`` prints the usage, the one-
    or two-line ``description`` and the flags, then ``examples`` (shell lines) as the epilog."""
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples.strip().splitlines()) if examples else None
    return argparse.ArgumentParser(prog=f"python -m explorer.{command}", description=description, epilog=epilog,
                                   formatter_class=HelpFormatter)


# ---------------------------------------------------------------- clustering options

def option_fields() -> tuple[str, ...]:
    """The ClusteringConfig fields that are options (everything but ``ks``)."""
    return tuple(f.name for f in dataclasses.fields(ClusteringConfig) if f.name != "ks")


def add_clustering_args(p: argparse.ArgumentParser, *, metrics: tuple[str, ...] = METRICS,
                        granularity: bool = True) -> None:
    """The flags of the clustering options, named like the ClusteringConfig fields they set
    (``--fold-bn`` -> ``fold_bn``), so that :func:`clustering_options` picks up every one of them.
    ``metrics`` are the choices of ``--metric`` (sensitivity adds "both"); ``granularity=False``
    leaves ``--granularity`` out (the search needs filter granularity). A new ClusteringConfig
    option needs its flag here and nowhere else."""
    d = ClusteringConfig()
    p.add_argument("--metric", choices=metrics, default=d.metric,
                   help="k-means metric: raw filters (euclidean) or unit-length filters that keep their norms (cosine)")
    if granularity:
        p.add_argument("--granularity", choices=GRANULARITIES, default=d.granularity,
                       help="cluster whole filters (structural savings) or 2D kernels")
    p.add_argument("--fold-bn", action="store_true", help="cluster BN-folded filters (lets both convs of a block shrink)")
    p.add_argument("--space", choices=SPACES, default=d.space,
                   help="k-means on the filters (weight) or in the metric of the layer's output error on "
                        "training images (data)")
    p.add_argument("--recovery", choices=RECOVERIES, default=d.recovery,
                   help="repair without training: none, bn (re-estimate BatchNorm statistics) or lsq "
                        "(least-squares re-fit of the layers to the original net's outputs; includes the BN shift)")
    p.add_argument("--recalibrate-bn", type=int, default=d.recalibrate_bn, metavar="N",
                   help="training images for the recovery (0 = the recovery's default: bn 2000, lsq 512); "
                        "N > 0 alone means --recovery bn")
    p.add_argument("--seed", type=int, default=d.seed, help="k-means seed")
    p.add_argument("--n-init", type=int, default=d.n_init, help="k-means restarts")
    p.add_argument("--seeds", type=int, default=d.seeds, metavar="S",
                   help="try k-means seeds seed..seed+S-1 and keep the best on held-out training images")
    p.add_argument("--stream-k", dest="stream", type=stream_k, action="append", default=None, metavar="STAGE=K",
                   help="cluster residual stream STAGE (1-3) to K channels, shared by every conv that writes it "
                        "(needs --fold-bn; stage 2 needs K > stage 1's k, stage 3 K > stage 2's; no per-layer k "
                        "for those writers); repeat for several stages")


def stream_k(text: str) -> tuple[int, int]:
    """``--stream-k STAGE=K`` -> (stage, k). Raises argparse.ArgumentTypeError for another form."""
    stage, sep, k = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return int(stage), int(k)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected STAGE=K with integers, e.g. 1=8, got {text!r}") from None


def clustering_options(args: argparse.Namespace, **override) -> ClusteringConfig:
    """The ClusteringConfig (no ks) of the clustering flags in ``args`` (fields absent from
    ``args`` keep their defaults), with ``override`` applied; validated. Raises ClusteringError."""
    values = {f: getattr(args, f) for f in option_fields() if hasattr(args, f)}
    if "stream" in values:  # --stream-k gives (stage, k) pairs, or None when not given
        values["stream"] = dict(values["stream"] or ())
    return ClusteringConfig(**{**values, **override}).validate()


# ---------------------------------------------------------------- analyses

def add_analysis_args(p: argparse.ArgumentParser) -> None:
    """--checkpoint, --data, --test-per-class, --threads, --cache-mb and the hidden --synthetic."""
    p.add_argument("--checkpoint", default=default_checkpoint(), help="ResNet20 state dict (.pt) to analyse")
    p.add_argument("--data", default=None, help=DATA_HELP)
    p.add_argument("--test-per-class", type=int, default=0, metavar="N",
                   help="evaluate on a fixed stratified subset of N test images per class instead of the full "
                        "test split (quick trial runs; the result file records the subset and refuses to mix)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--cache-mb", type=int, default=None,
                   help="activation cache of the evaluation engine in MB (default $EXPLORER_ACTIVATION_CACHE_MB "
                        "or 1408; 3072 also keeps more stage-1 outputs, which speeds up sweeps of stage-1 layers)")
    p.add_argument("--synthetic", type=int, default=0, help=argparse.SUPPRESS)


def explorer_from_args(args):
    """An exact fp32 :func:`~explorer.analysis.results.make_explorer` for ``args.checkpoint`` on the
    data the flags select. Raises CheckpointError or DataNotFoundError."""
    set_threads(args.threads)
    model = ckpt.load_model(args.checkpoint)
    data = load_data(args.data, args.test_per_class, args.synthetic)
    return make_explorer(model, data, Path(args.checkpoint).stem, args.cache_mb)


def set_threads(n: int) -> None:
    """``torch.set_num_threads(n)`` for n > 0 (0: torch's default)."""
    if n:
        torch.set_num_threads(n)


def run(body: Callable[[], int], interrupted: str = "interrupted") -> int:
    """Call ``body`` and turn the library's errors into one ``error:`` line and exit status 2, and
    Ctrl-C into status 130 with the ``interrupted`` hint."""
    try:
        return body()
    except ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
