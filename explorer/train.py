"""Train ResNet20 on CIFAR-10: ``python -m explorer.train``.

Resumable (``--resume`` continues from the last complete epoch with identical results, because
every epoch's shuffling and augmentation are drawn from a generator seeded by (seed, epoch)),
runs unattended (``nohup ... &``) and writes, per epoch and atomically, the files described in
:mod:`explorer.checkpoints`. Runs under ``torchrun --nproc_per_node N`` with
DistributedDataParallel (NCCL on GPUs, gloo on CPU); only rank 0 writes files.

Recipe: SGD with Nesterov momentum, linear warm-up then cosine decay per step (Loshchilov &
Hutter 2017), label smoothing (Szegedy et al. 2016), crop + flip (He et al. 2016) with optional
Cutout (DeVries & Taylor 2017), and an exponential moving average of the weights
(``torch.optim.swa_utils.AveragedModel``) which is what gets saved and evaluated.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from . import checkpoints as ckpt
from .data import CLASSES, MEAN, STD, DataNotFoundError, augment, load_cifar10, normalize, synthetic_cifar10
from .evaluate import evaluate
from .model import count_parameters, resnet20


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (JSON-serialisable; stored in the checkpoint metadata)."""

    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.1
    cutout: int = 8
    ema_decay: float = 0.999
    seed: int = 0
    precision: str = "bf16"
    device: str = "auto"
    name: str = ckpt.DEFAULT_NAME
    out: str = str(ckpt.DEFAULT_DIR)
    data: str | None = None
    synthetic: int = 0
    eval_every: int = 1
    compile: bool = False

    def validate(self) -> None:
        """Raise ValueError with the offending flag when a value is out of range."""
        checks = [
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.batch_size >= 2, "--batch-size must be >= 2"),
            (self.lr > 0, "--lr must be > 0"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.warmup_epochs >= 0, "--warmup-epochs must be >= 0"),
            (0 <= self.cutout <= 32, "--cutout must be in 0..32 pixels"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}"),
            (0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
            (0 <= self.ema_decay < 1, "--ema-decay must be in [0, 1)"),
            (self.precision in ("fp32", "bf16"), "--precision must be fp32 or bf16"),
            (self.device in ("auto", "cpu", "cuda"), "--device must be auto, cpu or cuda"),
            (self.eval_every >= 1, "--eval-every must be >= 1"),
            (self.name and "/" not in self.name and not self.name.startswith("."), "--name must be a plain file name"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


SCHEDULES = ("cosine", "step", "constant")


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based): linear warm-up over
    ``warmup_steps``, then ``cosine`` (to 0 at ``total_steps``), ``step`` (x0.1 at 50% and 75%,
    He et al. 2016) or ``constant``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if schedule == "step":
        return 0.1 ** ((t >= 0.5) + (t >= 0.75))
    return 1.0


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _distributed() -> tuple[int, int]:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def _pick_device(cfg: TrainConfig, rank: int) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda given but CUDA is not available; use --device cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    return torch.device("cpu")


def train(cfg: TrainConfig, resume: bool = False, stop_after: int | None = None, quiet: bool = False) -> dict:
    """Run (or resume) training; return the final metadata dict (or the in-progress one when
    ``stop_after`` epochs of this invocation have run, for tests).

    Raises ValueError for bad settings, DataNotFoundError without data, CheckpointError on I/O errors.
    """
    from tqdm import tqdm

    cfg.validate()
    rank, world = _distributed()
    device = _pick_device(cfg, rank)
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")
    is_main = rank == 0
    files = ckpt.paths(cfg.out, cfg.name)

    data = synthetic_cifar10(cfg.synthetic, max(10, cfg.synthetic // 4), seed=1234) if cfg.synthetic else load_cifar10(cfg.data)

    torch.manual_seed(cfg.seed)
    model = resnet20().to(device).to(memory_format=torch.channels_last)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                                weight_decay=cfg.weight_decay)
    n_train = len(data.train_labels)
    local_batch = cfg.batch_size // world
    steps_per_epoch = n_train // cfg.batch_size  # drop the ragged last batch: equal steps on every rank
    if steps_per_epoch < 1:
        raise ValueError(f"--batch-size {cfg.batch_size} exceeds the {n_train} training images")
    total = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, cfg.schedule))

    start_epoch, log, wall = 0, [], 0.0
    if resume and files["train"].is_file():
        state = ckpt.load_torch(files["train"])
        saved = state["config"]
        # Everything that shapes the result must match; where files go and how fast it runs may change.
        for key in sorted(set(asdict(cfg)) - {"out", "name", "data", "device", "eval_every", "compile"}):
            if saved.get(key) != getattr(cfg, key):
                raise ValueError(f"--resume: {key} was {saved.get(key)!r} in {files['train'].name}, now "
                                 f"{getattr(cfg, key)!r}; pass the same value or a new --name")
        if state.get("dataset") not in (None, data.identity.to_dict()):
            raise ValueError(f"--resume: {files['train'].name} was trained on {state['dataset']}, not on "
                             f"{data.identity}; point --data at the same dataset or use a new --name")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, log, wall = state["epoch"], list(state["log"]), state["wall_seconds"]
    elif resume and is_main and not quiet:
        print(f"--resume: no {files['train'].name} yet, starting from epoch 0", file=sys.stderr)

    ddp_model = model
    if cfg.compile:
        # Inductor fuses BN/ReLU into the convs: about 1.2x faster per epoch on 2 CPU cores after a
        # one-off compile of about a minute and a half.
        ddp_model = torch.compile(model)
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(ddp_model, device_ids=[device.index] if device.type == "cuda" else None)

    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
                else contextlib.nullcontext())
    meta = _metadata(cfg, data, world, device)
    epochs_run = 0
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        perm = torch.randperm(n_train, generator=g)[: steps_per_epoch * cfg.batch_size]
        images = augment(data.train_images[perm], g, cutout=cfg.cutout)
        labels = data.train_labels[perm]
        # Each rank takes its interleaved share of every global batch.
        images = images.view(steps_per_epoch, world, local_batch, *images.shape[1:])[:, rank]
        labels = labels.view(steps_per_epoch, world, local_batch)[:, rank]
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                   disable=quiet or not is_main, leave=False, mininterval=2.0)
        last_status = time.time()
        for i in bar:
            x = normalize(images[i]).to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = labels[i].to(device, non_blocking=True)
            with autocast:
                logits = ddp_model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            ema.update_parameters(model)
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y).sum()
            if is_main and time.time() - last_status > 10:
                last_status = time.time()
                _status(files, cfg, epoch + (i + 1) / steps_per_epoch, log, wall + time.time() - t0, start_epoch)
        if world > 1:
            dist.all_reduce(loss_sum)
            dist.all_reduce(correct)
        epoch_seconds = time.time() - t0
        wall += epoch_seconds
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum.item() / (steps_per_epoch * world),
            "train_top1": correct.item() / (steps_per_epoch * cfg.batch_size),
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": round(epoch_seconds, 2),
        }
        if is_main:
            last = epoch + 1 == cfg.epochs
            if last or (epoch + 1) % cfg.eval_every == 0:
                ev = evaluate(ema.module, data.test_images, data.test_labels, precision=cfg.precision)
                record["test_top1"] = ev.top1
            log.append(record)
            if not quiet:
                tqdm.write(json.dumps(record))
            # Weights first, then the resume state, then metadata: a crash between any two leaves a
            # consistent older epoch to resume from.
            ckpt.save_torch(_plain_state(ema.module), files["weights"])
            ckpt.save_torch({
                "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "log": log, "wall_seconds": wall,
                "config": asdict(cfg), "dataset": data.identity.to_dict(),
            }, files["train"])
            _write_log(files["log"], log)
            meta.update(status="training", epochs_done=epoch + 1, wall_seconds=round(wall, 1),
                        test_top1_monitor=record.get("test_top1"))
            ckpt.save_json(meta, files["meta"])
            _status(files, cfg, epoch + 1, log, wall, start_epoch)
        if world > 1:
            dist.barrier()
        epochs_run += 1
        if stop_after is not None and epochs_run >= stop_after and epoch + 1 < cfg.epochs:
            return meta

    if is_main:
        final = ema.module.float().eval()
        ev = evaluate(final, data.test_images, data.test_labels, precision="fp32")
        meta.update(
            status="complete", epochs_done=cfg.epochs, wall_seconds=round(wall, 1),
            test_top1=ev.top1, per_class={c: float(a) for c, a in zip(CLASSES, ev.per_class)},
            test_evaluated_in="fp32", weights="ema",
        )
        meta.pop("test_top1_monitor", None)
        ckpt.save_json(meta, files["meta"])
        ckpt.write_status(files["status"], state="complete", epoch=cfg.epochs, epochs=cfg.epochs,
                          test_top1=ev.top1, pid=os.getpid())
        if not quiet:
            print(f"done: fp32 test top-1 {100 * ev.top1:.2f}% on {data.identity.name}; "
                  f"wrote {files['weights']} and {files['meta'].name}")
    if world > 1:
        dist.barrier()
    return meta


def _plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _write_log(path: Path, log: list[dict]) -> None:
    # Rewritten whole from the resume state, so it always matches the last complete epoch.
    data = "".join(json.dumps(r) + "\n" for r in log).encode()
    ckpt._atomic_write(path, lambda f: f.write(data))


def _status(files, cfg: TrainConfig, epoch: float, log: list[dict], wall: float, start_epoch: int) -> None:
    done_here = max(epoch - start_epoch, 1e-9)
    per_epoch = wall / max(epoch, 1e-9) if start_epoch == 0 else None
    if per_epoch is None:
        recent = [r["seconds"] for r in log[-5:]] or [0.0]
        per_epoch = sum(recent) / len(recent)
    latest = next((r["test_top1"] for r in reversed(log) if "test_top1" in r), None)
    ckpt.write_status(files["status"], state="running", epoch=round(epoch, 3), epochs=cfg.epochs,
                      eta_seconds=round(per_epoch * (cfg.epochs - epoch)), test_top1=latest, pid=os.getpid(),
                      done_this_run=round(done_here, 3))


def _metadata(cfg: TrainConfig, data, world: int, device: torch.device) -> dict:
    return {
        "architecture": "resnet20",
        "parameters": count_parameters(resnet20()),
        "status": "training",
        "epochs": cfg.epochs,
        "hyperparameters": {k: v for k, v in asdict(cfg).items() if k not in ("out", "name", "data", "device")},
        "dataset": data.identity.to_dict(),
        "normalization": {"mean": list(MEAN), "std": list(STD)},
        "classes": list(CLASSES),
        "processes": world,
        "device": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m explorer.train",
        description="Train ResNet20 on CIFAR-10 and write checkpoints/<name>.pt + .json (resumable).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    p.add_argument("--data", default=None, help="local CIFAR-10 directory (official batches or ImageFolder "
                   "train/<class>, test/<class>); default $EXPLORER_DATA, else download")
    p.add_argument("--out", default=d.out, help="checkpoint directory")
    p.add_argument("--name", default=d.name, help="checkpoint name: writes <out>/<name>.pt, .json, .log.jsonl")
    p.add_argument("--resume", action="store_true", help="continue from <out>/<name>.train.pt if present")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device, help="where to train")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=d.precision,
                   help="bf16 autocast (CPU with AVX-512 BF16, or CUDA) or fp32; final accuracy is always fp32")
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
    if args.threads:
        torch.set_num_threads(args.threads)
    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig(**fields)
    try:
        train(cfg, resume=args.resume, stop_after=args.stop_after, quiet=args.quiet)
    except (ValueError, DataNotFoundError, ckpt.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue from the last complete epoch", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
