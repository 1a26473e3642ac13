"""Train ResNet20 on CIFAR-10 (:func:`train`; command line: ``python -m explorer.train``).

The loop is :func:`explorer.training.loop.run_epochs` (resumable bit-identically, DDP under
``torchrun``, files written atomically per epoch). What is particular to training from scratch:
an exponential moving average of the weights (``torch.optim.swa_utils.AveragedModel``) is what gets
saved and evaluated, and the metadata records the run (hyper-parameters, dataset identity,
normalisation, torch version, git commit, and at the end the fp32 test top-1 and per-class accuracy).
"""
from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .. import checkpoints as ckpt
from ..data import CLASSES, MEAN, STD, CIFAR10Tensors, load_cifar10, synthetic_cifar10
from ..evaluate import evaluate
from ..model import count_parameters, resnet20
from .loop import (SCHEDULES, UNPINNED, Hooks, LoopConfig, Pins, distributed, memory_format, pick_device,
                   resolve_precision, run_epochs, sgd)


@dataclass
class TrainConfig(LoopConfig):
    """Hyper-parameters of one training run (JSON-serialisable; stored in the checkpoint metadata)."""

    schedule: str = "cosine"
    ema_decay: float = 0.999
    data: str | None = None
    synthetic: int = 0

    def checks(self) -> list[tuple[bool, str]]:
        return super().checks() + [
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}"),
            (0 <= self.ema_decay < 1, "--ema-decay must be in [0, 1)"),
        ]


class EMAHooks(Hooks):
    """Plain supervised training; the weight EMA is updated after every step and is what is saved."""

    def __init__(self, model, forward, ema: AveragedModel, data: CIFAR10Tensors, precision: str):
        super().__init__(model, forward)
        self.ema, self.data, self.precision = ema, data, precision

    def after_step(self) -> None:
        self.ema.update_parameters(self.model)

    def evaluate(self) -> float:
        # The monitor runs in the training precision; the final number is fp32 (see train()).
        return evaluate(self.ema.module, self.data.test_images, self.data.test_labels, precision=self.precision).top1

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone().contiguous() for k, v in self.ema.module.state_dict().items()}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])

    def epoch_meta(self, record: dict, log: list[dict]) -> dict:
        return {"test_top1_monitor": record.get("test_top1")}


def train(cfg: TrainConfig, resume: bool = False, stop_after: int | None = None, quiet: bool = False) -> dict:
    """Run (or resume) training; return the final metadata dict (or the in-progress one when
    ``stop_after`` epochs of this invocation have run, for tests).

    Raises ValueError for bad settings, DataNotFoundError without data, CheckpointError on I/O errors.
    """
    cfg.validate()
    rank, world = distributed()
    device = pick_device(cfg.device, rank)
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")
    files = ckpt.paths(cfg.out, cfg.name)
    data = (synthetic_cifar10(cfg.synthetic, max(10, cfg.synthetic // 4), seed=1234) if cfg.synthetic
            else load_cifar10(cfg.data))

    torch.manual_seed(cfg.seed)
    precision = resolve_precision(cfg.precision, device)
    model = resnet20().to(device).to(memory_format=memory_format(precision, device))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    optimizer, scheduler, steps = sgd(cfg, model.parameters(), len(data.train_labels), cfg.schedule)
    forward = model
    if cfg.compile:
        # Inductor fuses BN/ReLU into the convs (faster per epoch after a one-off compile).
        forward = torch.compile(model)
    if world > 1:
        forward = torch.nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None)

    meta = _metadata(cfg, data, world, device)
    pins = Pins("config", {**asdict(cfg), "precision": precision}, frozenset(asdict(cfg)) - UNPINNED,
                {"dataset": data.identity.to_dict()},
                {"dataset": "point --data at the same dataset"})
    meta["precision_used"] = precision
    hooks = EMAHooks(model, forward, ema, data, precision)
    progress = run_epochs(cfg, hooks, data, optimizer, scheduler, steps, files, meta, pins, device, rank=rank,
                          world=world, resume=resume, quiet=quiet, stop_after=stop_after)
    if not progress.finished:
        return meta
    if rank == 0:
        ev = evaluate(ema.module.float().eval(), data.test_images, data.test_labels, precision="fp32")
        meta.update(status="complete", epochs_done=cfg.epochs, wall_seconds=round(progress.wall, 1),
                    test_top1=ev.top1, per_class=ev.per_class_dict(), test_evaluated_in="fp32", weights="ema")
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


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


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
