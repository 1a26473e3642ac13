"""``python -m explorer.finetune``: fine-tune a clustered net that stays clustered (:func:`explorer.training.finetune.finetune`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import checkpoints as ckpt
from ..analysis.results import default_checkpoint, load_data
from ..clustering import ClusteringConfig, ClusteringError
from ..pruning import CRITERIA
from ..training.finetune import METHODS, FinetuneConfig, finetune
from .common import DATA_HELP, parser, run, set_threads

EXAMPLES = """
python -m explorer.search --fold-bn --budget 5 10 20 40 --target-reduction 0.42 --write-config cfg.json
python -m explorer.finetune --config cfg.json --epochs 30 --distill 0.7     # --device cuda where there is one
python -m explorer.finetune --config cfg.json --epochs 30 --distill 0.7 --resume
python -m explorer.finetune --config cfg.json --epochs 30 --method merged         # train the smaller net itself
python -m explorer.finetune --config cfg.json --epochs 30 --pruning fpgm          # the pruning baseline
"""


def build_parser() -> argparse.ArgumentParser:
    d = FinetuneConfig()
    p = parser("finetune", "Fine-tune a checkpoint clustered by a configuration, keeping its clusters tied, and "
                           "write <name>.pt/.json plus the compressed export (resumable).", EXAMPLES)
    p.add_argument("--config", required=True, help="clustering configuration JSON (from the app, or "
                   "explorer.search --write-config)")
    p.add_argument("--checkpoint", default=default_checkpoint(), help="base ResNet20 checkpoint (.pt)")
    p.add_argument("--data", default=None, help=DATA_HELP)
    p.add_argument("--epochs", type=int, default=d.epochs, help="fine-tuning epochs")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="batch size")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (cosine decay to 0)")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD (Nesterov) momentum")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="L2 weight decay")
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear warm-up length")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="label smoothing")
    p.add_argument("--cutout", type=int, default=d.cutout, help="Cutout square side in pixels (0 = off)")
    p.add_argument("--seed", type=int, default=d.seed, help="shuffling / augmentation seed")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=d.precision,
                   help="auto: bf16 where the hardware runs it natively, else fp32 (evaluation is always fp32)")
    p.add_argument("--rebase-images", type=int, default=d.rebase_images,
                   help="training images for re-basing identity BatchNorms (fold_bn without BN re-estimation)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="evaluate the test split every N epochs")
    p.add_argument("--name", default=None, help="output name (default <checkpoint name>_ft)")
    p.add_argument("--out", default=d.out, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue from <out>/<name>.train.pt if present")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument("--distill", type=float, default=d.distill, metavar="ALPHA",
                   help="weight of knowledge distillation from the base net (0 = off; Hinton et al. 2015)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="distillation temperature")
    p.add_argument("--method", choices=METHODS, default=d.method,
                   help="tied: centroids trained at full width; merged: the smaller merged net trained itself "
                        "(faster); centripetal: filters pulled to their cluster's mean during training "
                        "(Ding et al. 2019)")
    p.add_argument("--strength", type=float, default=d.strength,
                   help="centripetal pull per step (fraction of the way to the cluster mean)")
    p.add_argument("--pruning", default=d.pruning, choices=("", *CRITERIA),
                   help="baseline: prune the --config layers to their k by this Torch-Pruning criterion instead "
                        "of clustering, then train the pruned net with the same recipe")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device,
                   help="where to train (evaluation always runs on CPU in fp32)")
    p.add_argument("--latency", action="store_true", help="time the compressed net at batch 1 and 256 at the end")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--synthetic", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_threads(args.threads)
    fields = {k: v for k, v in vars(args).items() if k in FinetuneConfig.__dataclass_fields__}
    fields["name"] = args.name or f"{Path(args.checkpoint).stem}_ft"

    def body() -> int:
        ft = FinetuneConfig(**fields)
        ft.validate()
        try:
            config = ClusteringConfig.from_json(Path(args.config).read_text())
        except (OSError, UnicodeDecodeError) as e:
            raise ClusteringError(f"cannot read --config: {e}") from None
        ckpt.load_model(args.checkpoint)  # a bad checkpoint fails in a second, not after decoding the dataset
        data = load_data(args.data, synthetic=args.synthetic)
        finetune(args.checkpoint, config, ft, data, resume=args.resume, quiet=args.quiet, stop_after=args.stop_after,
                 latency=args.latency)
        return 0

    return run(body, "interrupted; rerun with --resume to continue from the last complete epoch")
