"""The one training loop: ResNet20 training (:mod:`explorer.training.train`) and cluster-preserving
fine-tuning (:mod:`explorer.training.finetune`) both run :func:`run_epochs` and differ only by their
:class:`Hooks` (what is trained and saved, extra loss terms, what happens after each step).

What the loop guarantees, for both:

- **Reproducible epochs.** Shuffling and augmentation of epoch e are drawn from a generator seeded
  by (seed, e), so a run killed at any moment and resumed ends bit-identical to an uninterrupted one.
- **Cheap bookkeeping.** Loss and correct counts are summed on the device (a ``.item()`` per step
  would wait for an accelerator every step); the status file is rewritten at most every 10 s.
- **Crash-safe files, in this order** each epoch (every write atomic, :mod:`explorer.checkpoints`):
  weights, resume state, metadata, log, status. A crash between any two leaves a consistent older
  epoch to resume from (the log is rewritten whole from the resume state).
- **Resume checks.** Every hyper-parameter that shapes the result (all but where files go and how
  fast it runs, :data:`UNPINNED`) and the run's other pins (dataset, clustering...) must equal the
  saved ones, else ``ValueError`` naming the flag.

Recipe pieces shared by both: SGD with Nesterov momentum, linear warm-up then a per-step schedule
(:func:`lr_factor`; cosine: Loshchilov & Hutter 2017), label smoothing (Szegedy et al. 2016), crop +
flip (He et al. 2016) with optional Cutout (DeVries & Taylor 2017), bf16 autocast on request.
Under ``torchrun`` (DistributedDataParallel) each rank takes its interleaved share of every global
batch and only rank 0 writes files.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import checkpoints as ckpt
from ..data import CIFAR10Tensors, augment, normalize

SCHEDULES = ("cosine", "step", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
# Settings a resumed run may change: where files go and how fast it runs. (``precision`` is pinned
# as it resolved, fp32 or bf16, never as "auto": each command pins :func:`resolve_precision`'s
# answer, so a run cannot switch precision when resumed on other hardware.)
UNPINNED = frozenset({"out", "name", "data", "device", "eval_every", "compile"})
STATUS_EVERY_S = 10.0


@dataclass
class LoopConfig:
    """Hyper-parameters every run of the loop has (JSON-serialisable; stored in the metadata)."""

    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.1
    cutout: int = 8
    seed: int = 0
    precision: str = "auto"
    device: str = "auto"
    name: str = ckpt.DEFAULT_NAME
    out: str = str(ckpt.DEFAULT_DIR)
    eval_every: int = 1
    compile: bool = False

    def checks(self) -> list[tuple[bool, str]]:
        """(condition, message naming the flag) pairs; subclasses add their own."""
        return [
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.batch_size >= 2, "--batch-size must be >= 2"),
            (self.lr > 0, "--lr must be > 0"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.warmup_epochs >= 0, "--warmup-epochs must be >= 0"),
            (0 <= self.cutout <= 32, "--cutout must be in 0..32 pixels"),
            (0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
            (self.precision in PRECISIONS, "--precision must be auto, fp32 or bf16"),
            (self.device in ("auto", "cpu", "cuda"), "--device must be auto, cpu or cuda"),
            (self.eval_every >= 1, "--eval-every must be >= 1"),
            (bool(self.name) and "/" not in self.name and not self.name.startswith("."),
             "--name must be a plain file name"),
        ]

    def validate(self) -> None:
        """Raise ValueError with the offending flag when a value is out of range."""
        for ok, msg in self.checks():
            if not ok:
                raise ValueError(msg)

    def pinned(self) -> dict:
        """The settings a resume must not change (all but :data:`UNPINNED`)."""
        return {k: v for k, v in asdict(self).items() if k not in UNPINNED}


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


def distributed() -> tuple[int, int]:
    """(rank, world size) under ``torchrun``; (0, 1) otherwise."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def pick_device(name: str, rank: int = 0) -> torch.device:
    """``cuda`` (this rank's GPU) for "cuda", or "auto" where CUDA is available; else ``cpu``.
    Raises ValueError for "cuda" without CUDA."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda given but CUDA is not available; use --device cpu")
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    return torch.device("cpu")


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast is the fast way to train on ``device``: CUDA with bf16 support, or a
    CPU whose oneDNN has native bf16 kernels (AVX-512 BF16 / AMX). Elsewhere (e.g. an AVX2-only
    EPYC, measured: one ResNet20 epoch 124 s in fp32, 1,988 s under bf16 autocast) bf16 is
    emulated and fp32 is far faster."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device) -> str:
    """``fp32`` or ``bf16`` for a configured precision: ``auto`` is bf16 where :func:`fast_bf16`."""
    if precision == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    return precision


def memory_format(precision: str, device: torch.device) -> torch.memory_format:
    """channels_last where it pays (bf16 on oneDNN, any CUDA run); contiguous NCHW for fp32 on CPU,
    where oneDNN's AVX2 fp32 kernels for these 16-64-channel convs are fastest on NCHW."""
    return torch.channels_last if device.type == "cuda" or precision == "bf16" else torch.contiguous_format


def sgd(cfg: LoopConfig, params, n_train: int, schedule: str = "cosine"):
    """SGD with Nesterov momentum and a per-step LambdaLR of :func:`lr_factor`. Returns
    (optimizer, scheduler, steps per epoch); the ragged last batch is dropped, so every rank takes
    equal steps. Raises ValueError when the batch exceeds the training split."""
    steps = n_train // cfg.batch_size
    if steps < 1:
        raise ValueError(f"--batch-size {cfg.batch_size} exceeds the {n_train} training images")
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                                weight_decay=cfg.weight_decay)
    total, warmup = steps * cfg.epochs, int(cfg.warmup_epochs * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, schedule))
    return optimizer, scheduler, steps


class Hooks:
    """What differs between runs of the loop. ``model`` is the module whose parameters train;
    override the methods below (the defaults are plain supervised training of ``model``)."""

    def __init__(self, model: nn.Module, forward=None):
        self.model = model
        # `forward or model` would ask a torch.compile wrapper for its len() (a TypeError for ResNet20)
        self.forward = model if forward is None else forward  # e.g. a torch.compile'd or DDP-wrapped model

    def loss(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, cfg: LoopConfig) -> torch.Tensor:
        """Cross-entropy with label smoothing, in fp32, for logits (B, 10) and labels (B,)."""
        return F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)

    def after_backward(self) -> None:
        """Between ``loss.backward()`` and the optimizer step (fine-tuning averages tied gradients)."""

    def after_step(self) -> None:
        """After the optimizer and scheduler steps (training updates its EMA)."""

    def end_epoch(self) -> None:
        """Once per epoch on rank 0, before :meth:`evaluate` and :meth:`weights`."""

    def evaluate(self) -> float:
        """Test top-1 (fraction) of the weights about to be saved."""
        raise NotImplementedError

    def weights(self) -> dict[str, torch.Tensor]:
        """The plain ResNet20 state dict written to ``<name>.pt``."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Module states for the resume file (optimizer and scheduler are added by the loop)."""
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])

    def epoch_meta(self, record: dict, log: list[dict]) -> dict:
        """Metadata fields to update after each epoch."""
        return {}


@dataclass
class Pins:
    """What a resume must match. ``key``: where the hyper-parameters are stored in the resume file
    (compared one by one: ``flags`` is the full settings dict, ``compare`` the names that count);
    ``values``: other entries compared whole (dataset, clustering, base weights), with a hint each."""

    key: str
    flags: dict
    compare: frozenset
    values: dict = field(default_factory=dict)
    hints: dict = field(default_factory=dict)

    def check(self, state: dict, file: str) -> None:
        """Raise ValueError naming the first setting that differs from ``state`` (an entry the
        older file does not have is not a difference)."""
        saved = state.get(self.key) or {}
        for key in sorted(self.compare):
            if key in saved and saved[key] != self.flags.get(key):
                raise ValueError(f"--resume: {key} was {saved[key]!r} in {file}, now {self.flags.get(key)!r}; "
                                 f"pass the same value or a new --name")
        for key, want in self.values.items():
            old = state.get(key)
            if old is not None and old != want:
                hint = self.hints.get(key, "pass the same setting")
                raise ValueError(f"--resume: {key} was {json.dumps(old)} in {file}, now {json.dumps(want)}; "
                                 f"{hint} or a new --name")

    def to_state(self) -> dict:
        return {self.key: self.flags, **self.values}


@dataclass
class Progress:
    """Where a run stands: the epoch log (one dict per finished epoch), wall seconds over all
    invocations, and whether the last epoch is done."""

    log: list[dict]
    wall: float
    finished: bool


def _write_log(path: Path, log: list[dict]) -> None:
    # Rewritten whole from the resume state, so it always matches the last complete epoch.
    ckpt.save_bytes("".join(json.dumps(r) + "\n" for r in log).encode(), path)


def _status(files: dict, epochs: int, epoch: float, log: list[dict], wall: float, start_epoch: int) -> None:
    done_here = max(epoch - start_epoch, 1e-9)
    per_epoch = wall / max(epoch, 1e-9) if start_epoch == 0 else None
    if per_epoch is None:
        recent = [r["seconds"] for r in log[-5:]] or [0.0]
        per_epoch = sum(recent) / len(recent)
    latest = next((r["test_top1"] for r in reversed(log) if "test_top1" in r), None)
    ckpt.write_status(files["status"], state="running", epoch=round(epoch, 3), epochs=epochs,
                      eta_seconds=round(per_epoch * (epochs - epoch)), test_top1=latest, pid=os.getpid(),
                      done_this_run=round(done_here, 3))


def _read_started(path: Path) -> str | None:
    try:
        return ckpt.read_json(path).get("started")
    except ckpt.CheckpointError:
        return None


def run_epochs(cfg: LoopConfig, hooks: Hooks, data: CIFAR10Tensors, optimizer, scheduler, steps: int,
               files: dict[str, Path], meta: dict, pins: Pins, device: torch.device, *, rank: int = 0,
               world: int = 1, resume: bool = False, quiet: bool = False, stop_after: int | None = None,
               desc: str = "epoch") -> Progress:
    """Train ``hooks.model`` for the epochs of ``cfg`` not done yet (``resume``: continue from
    ``files["train"]``), writing the files of :func:`explorer.checkpoints.paths` each epoch on rank 0.
    ``meta`` is updated in place and saved each epoch. ``stop_after`` returns after that many epochs
    of this call (tests). Raises ValueError for a resume that does not match ``pins``,
    CheckpointError on I/O errors."""
    from tqdm import tqdm

    is_main = rank == 0
    start_epoch, log, wall = 0, [], 0.0
    if resume and files["train"].is_file():
        state = ckpt.load_torch(files["train"])
        pins.check(state, files["train"].name)
        hooks.load_state_dict(state)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, log, wall = state["epoch"], list(state["log"]), state["wall_seconds"]
        # A resumed run started when its first epoch did, not now (resume files from before this
        # field: the metadata the last epoch wrote says when).
        started = state.get("started") or _read_started(files["meta"])
        if started and "started" in meta:
            meta["started"] = started
    elif resume and is_main and not quiet:
        print(f"--resume: no {files['train'].name} yet, starting from epoch 0", file=sys.stderr)

    n_train, local_batch = len(data.train_labels), cfg.batch_size // world
    precision = resolve_precision(cfg.precision, device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    fmt = memory_format(precision, device)
    epochs_run = 0
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        perm = torch.randperm(n_train, generator=g)[: steps * cfg.batch_size]
        images = augment(data.train_images[perm], g, cutout=cfg.cutout)
        labels = data.train_labels[perm]
        images = images.view(steps, world, local_batch, *images.shape[1:])[:, rank]
        labels = labels.view(steps, world, local_batch)[:, rank]
        hooks.model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        bar = tqdm(range(steps), desc=f"{desc} {epoch + 1}/{cfg.epochs}", unit="step",
                   disable=quiet or not is_main, leave=False, mininterval=2.0)
        last_status = time.time()
        for i in bar:
            x = normalize(images[i]).to(device, non_blocking=True).contiguous(memory_format=fmt)
            y = labels[i].to(device, non_blocking=True)
            with autocast:
                logits = hooks.forward(x)
                loss = hooks.loss(logits, x, y, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            hooks.after_backward()
            optimizer.step()
            scheduler.step()
            hooks.after_step()
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y).sum()
            if is_main and time.time() - last_status > STATUS_EVERY_S:
                last_status = time.time()
                _status(files, cfg.epochs, epoch + (i + 1) / steps, log, wall + time.time() - t0, start_epoch)
        if world > 1:
            dist.all_reduce(loss_sum)
            dist.all_reduce(correct)
        seconds = time.time() - t0
        wall += seconds
        record = {"epoch": epoch + 1, "train_loss": loss_sum.item() / (steps * world),
                  "train_top1": correct.item() / (steps * cfg.batch_size),
                  "lr": optimizer.param_groups[0]["lr"], "seconds": round(seconds, 2)}
        if is_main:
            hooks.end_epoch()
            if epoch + 1 == cfg.epochs or (epoch + 1) % cfg.eval_every == 0:
                record["test_top1"] = hooks.evaluate()
            log.append(record)
            if not quiet:
                tqdm.write(json.dumps(record))
            ckpt.save_torch(hooks.weights(), files["weights"])
            ckpt.save_torch({**hooks.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "log": log,
                             "wall_seconds": wall, "started": meta.get("started"), **pins.to_state()}, files["train"])
            meta.update(status="training", epochs_done=epoch + 1, wall_seconds=round(wall, 1),
                        **hooks.epoch_meta(record, log))
            ckpt.save_json(meta, files["meta"])
            _write_log(files["log"], log)  # last: whoever sees an epoch in the log finds its metadata too
            _status(files, cfg.epochs, epoch + 1, log, wall, start_epoch)
        if world > 1:
            dist.barrier()
        epochs_run += 1
        if stop_after is not None and epochs_run >= stop_after and epoch + 1 < cfg.epochs:
            return Progress(log, wall, False)
    return Progress(log, wall, True)
