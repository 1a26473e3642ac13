"""``python -m explorer.train``: train ResNet20 on CIFAR-10 (:func:`explorer.training.train.train`)."""
from __future__ import annotations

import argparse
import sys

import torch.distributed as dist

from ..training.loop import SCHEDULES
from ..training.train import TrainConfig, train
from .common import DATA_HELP, parser, run, set_threads

EXAMPLES = """
python -m explorer.train --epochs 90 --compile            # the recipe of the shipped checkpoint
nohup python -m explorer.train --name my_run --epochs 90 &  # unattended; --resume continues it
torchrun --nproc_per_node 2 -m explorer.train --device cpu # DistributedDataParallel
"""


def build_parser():
    d = TrainConfig()
    p = parser("train", "Train ResNet20 on CIFAR-10 and write checkpoints/<name>.pt + .json every epoch "
                        "(resumable, bit-identical).", EXAMPLES)
    p.add_argument("--epochs", type=int, default=d.epochs, help="number of training epochs")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size (split across processes)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of SGD with Nesterov momentum")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="L2 weight decay")
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule,
                   help="LR schedule after warm-up: cosine to 0, step (x0.1 at 50%% and 75%%), or constant")
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear LR warm-up length")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="label smoothing of the loss")
    p.add_argument("--cutout", type=int, default=d.cutout, help="Cutout square side in pixels (0 = off)")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help="decay of the weight EMA that is saved")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (init, shuffling, augmentation)")
    p.add_argument("--data", default=None, help=DATA_HELP + " (official batches or ImageFolder train/<class>, "
                                                           "test/<class>)")
    p.add_argument("--out", default=d.out, help="checkpoint directory")
    p.add_argument("--name", default=d.name, help="checkpoint name: writes <out>/<name>.pt, .json, .log.jsonl")
    p.add_argument("--resume", action="store_true", help="continue from <out>/<name>.train.pt if present")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device, help="where to train")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=d.precision,
                   help="auto: bf16 autocast where the hardware runs it natively (CUDA; CPU with AVX-512 BF16/AMX), else fp32; final accuracy is always fp32")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="evaluate the test split every N epochs")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step (faster after warm-up)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--synthetic", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads < 0:
        print("error: --threads must be >= 0", file=sys.stderr)
        return 2
    set_threads(args.threads)
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__})

    def body() -> int:
        train(cfg, resume=args.resume, stop_after=args.stop_after, quiet=args.quiet)
        return 0

    try:
        return run(body, "interrupted; rerun with --resume to continue from the last complete epoch")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
