"""Fine-tune a clustered ResNet20 so that it stays clustered: ``python -m explorer.finetune``.

Clustering every filter of a layer to one of k centroids (:mod:`explorer.clustering`) costs
accuracy; a few epochs of training win most of it back (FPGM, He et al. 2019, retrains pruned
ResNets the same way). Plain training would pull the filters of a cluster apart again and lose the
structural savings, so here the clusters are tied by construction:

- Each clustered conv is replaced by a :class:`TiedConv` whose only weight is its k distinct
  filters D (k, Cin, 3, 3); its Cout output channels are ``conv(x, D)[:, labels] * scales``
  (scales: the per-filter norm of the cosine metric, fixed; all 1 for euclidean). After every step
  the full filter bank ``D[labels] * scales`` is exactly clustered, by construction, not by a
  projection that rounding could break.
- Gradients of D are divided by the cluster sizes, i.e. each centroid moves by the *mean* of its
  members' gradients. That is projected gradient descent in the original weight space ("average the
  gradients within each cluster, then re-project"), so a cluster of 30 filters does not take 30x
  larger steps than a singleton.
- With ``fold_bn`` (the configuration clusters BN-folded filters) and wherever the compressed net
  merged a block's first conv (clustered channels identical after BN + ReLU, so the block's second
  conv also shrinks), the BatchNorm after a clustered conv is tied too: one BatchNorm over the k
  centroid outputs, gathered after it, with gamma kept >= 1e-3 after each step (merging needs
  positive per-channel gains). So the folded filters stay clustered as well, and clustering the
  fine-tuned checkpoint again with the same configuration (what the app does) finds exactly the
  same clusters. Every other BatchNorm is trained normally (batch statistics in training, running
  statistics updated as usual).
- With ``fold_bn``, the clustered layers' BatchNorms are identities (+ the clustered bias) after
  :func:`explorer.clustering.apply` (BN re-estimation leaves them alone); they are first re-based on 2,000 training
  images (running statistics set to the measured ones, gamma/beta adjusted so that the eval-mode
  function is unchanged) so that training-mode normalisation starts from the same function.

So :func:`explorer.compress.compress` of the fine-tuned net yields the same smaller architecture
(same k per layer, same merges) - checked at the end and in the tests.

Recipe (as :mod:`explorer.train`, smaller): SGD with Nesterov momentum from a small peak LR
(0.02 by default), short linear warm-up then cosine decay per step, label smoothing, crop + flip
(+ Cutout), bf16 autocast on CPU (fp32 on request); evaluation always in fp32.

Files, all written atomically per epoch (``--out``, default ``checkpoints/``; ``--name``, default
``<base>_ft``): ``<name>.pt`` (the fine-tuned net as a plain ResNet20 state dict, filters exactly
clustered: the app and every CLI load it like any checkpoint), ``<name>.json`` (metadata: the
clustering configuration and labels, accuracy before and after with per-class rows, the recovery
curve, the compression report), ``<name>.log.jsonl`` (one line per epoch), ``<name>.train.pt``
(resume state), ``<name>.status.json`` (progress). At the end the compressed export goes to
``<out>/compressed/<name>.pt`` + ``.json`` + ``.onnx`` (:func:`explorer.compress.save_compressed`,
:func:`explorer.compress.export_onnx`).

Examples::

    python -m explorer.search --fold-bn --budget 5 10 20 40 --target-reduction 0.42 \\
        --write-config checkpoints/resnet20_cifar10_ft.config.json
    python -m explorer.finetune --config checkpoints/resnet20_cifar10_ft.config.json --epochs 30
    python -m explorer.finetune --config checkpoints/resnet20_cifar10_ft.config.json --epochs 30 --resume

(``*.config.json`` files are not listed as checkpoints by the app.)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoints as ckpt
from .analysis_io import default_checkpoint, load_data, weights_digest
from .clustering import Clustering, ClusteringConfig, ClusteringError
from .compress import compress, export_onnx, report, save_compressed
from .data import CLASSES, DataNotFoundError, augment, normalize
from .engine import FastEvaluator
from .evaluate import Comparison, evaluate
from .model import conv_layer, resnet20
from .train import _write_log, lr_factor

MIN_TIED_GAMMA = 1e-3


# ---------------------------------------------------------------- tied modules

class TiedConv(nn.Module):
    """A clustered 3x3 conv parametrised by its k distinct filters; optionally with the tied
    BatchNorm of its clusters.

    centroids: (k, Cin, 3, 3) parameter; labels: (Cout,) int64 buffer; scales: (Cout,) float buffer,
    the fixed per-filter factor of the cosine metric (all 1 for euclidean); bn: a BatchNorm2d over
    the k centroid outputs, or None; gains: (Cout,) fixed per-channel factor after a tied BN.
    forward: (N, Cin, H, W) -> (N, Cout, H/stride, W/stride) =
    ``conv(x, centroids)[:, labels] * scales`` without bn, ``bn(conv(x, centroids))[:, labels] * gains``
    with it.
    """

    def __init__(self, centroids: torch.Tensor, labels: torch.Tensor, scales: torch.Tensor, stride: int,
                 bn: nn.BatchNorm2d | None = None, gains: torch.Tensor | None = None):
        super().__init__()
        k = centroids.shape[0]
        self.centroids = nn.Parameter(centroids.detach().clone().float())
        self.register_buffer("labels", labels.detach().clone().long())
        self.register_buffer("scales", scales.detach().clone().float())
        self.register_buffer("gains", (torch.ones_like(self.scales) if gains is None else gains.detach().clone().float()))
        self.register_buffer("counts", torch.bincount(self.labels, minlength=k).float().clamp_min(1))
        self.stride = stride
        self.bn = bn
        post = self.gains if bn is not None else self.scales
        self.unit = bool(torch.all(post == 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.conv2d(x, self.centroids, None, self.stride, 1)
        if self.bn is not None:
            z = self.bn(z)
        z = z.index_select(1, self.labels)
        if self.unit:
            return z
        post = self.gains if self.bn is not None else self.scales
        return z * post.view(1, -1, 1, 1).to(z.dtype)

    def filters(self) -> torch.Tensor:
        """The full filter bank (Cout, Cin, 3, 3) = centroids[labels] * scales: exactly clustered."""
        return self.centroids.detach()[self.labels] * self.scales.view(-1, 1, 1, 1)

    @torch.no_grad()
    def average_gradients(self) -> None:
        """Turn the summed member gradients of each centroid (and tied BN parameter) into means."""
        if self.centroids.grad is not None:
            self.centroids.grad.div_(self.counts.view(-1, 1, 1, 1))
        if self.bn is not None:
            for p in (self.bn.weight, self.bn.bias):
                if p.grad is not None:
                    p.grad.div_(self.counts)

    @torch.no_grad()
    def project(self) -> None:
        """Keep tied BN gains positive (so merged channels stay mergeable)."""
        if self.bn is not None:
            self.bn.weight.clamp_(min=MIN_TIED_GAMMA)


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    head, _, attr = path.rpartition(".")
    return (model.get_submodule(head) if head else model), attr


def tied_layers(model: nn.Module) -> dict[str, TiedConv]:
    """{layer name: TiedConv} of a tied model, in forward order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, TiedConv)}


def _representatives(labels: torch.Tensor, scales: torch.Tensor, k: int) -> torch.Tensor:
    """Index of the member with the largest scale in each cluster (as explorer.compress does)."""
    rep = torch.full((k,), -1, dtype=torch.long)
    for i in range(len(labels)):
        c = int(labels[i])
        if rep[c] < 0 or scales[i] > scales[rep[c]]:
            rep[c] = i
    return rep


def merged_layers(compressed) -> set[str]:
    """Layers whose clustered channels the compressed net merged (k filters, no gather)."""
    return {s.name for s in compressed.specs if s.filters < conv_layer(s.name).filters and not s.gathered}


def tied_bn_layers(clustering: Clustering, compressed) -> set[str]:
    """Layers whose BatchNorm is tied during fine-tuning: the merged ones, and with ``fold_bn``
    every clustered layer (its folded filter and bias are what was clustered)."""
    merged = merged_layers(compressed)
    return merged | set(clustering.layers) if clustering.config.fold_bn else merged


@torch.no_grad()
def tie(model: nn.Module, clustering: Clustering, tied_bn: set[str] = frozenset(),
        must_tie: set[str] = frozenset()) -> nn.Module:
    """A trainable copy of a clustered ResNet20 (the output of :func:`explorer.clustering.apply`)
    with every clustered conv replaced by a :class:`TiedConv`; layers in ``tied_bn`` also get their
    BatchNorm tied (and the model's BatchNorm replaced by an identity): use it for merged layers
    and for every clustered layer of a ``fold_bn`` configuration (see :func:`tied_bn_layers`).
    A layer whose channels are not proportional within its clusters after BatchNorm keeps its own
    per-channel BatchNorm (fold_bn with cosine and BN re-estimation); for one in ``must_tie`` (the
    merged layers) that raises ClusteringError. The eval-mode function is unchanged (up to float
    rounding). Raises ClusteringError for kernel granularity."""
    if clustering.config.granularity != "filter":
        raise ClusteringError("fine-tuning keeps filter clusters; kernel granularity is not supported")
    tied = copy.deepcopy(model).float()
    for name, res in clustering.layers.items():
        conv = tied.get_submodule(name)
        bn_path = conv_layer(name).bn
        bn = tied.get_submodule(bn_path)
        labels = torch.as_tensor(res.labels, dtype=torch.long)
        scales = res.scales.float().clone()
        k = int(labels.max()) + 1
        rep = _representatives(labels, scales, k)
        s = scales[rep].view(-1, 1, 1, 1)
        w = conv.weight.detach().float()
        safe = torch.where(s > 0, s, torch.ones_like(s))
        d = torch.where(s > 0, w[rep] / safe, torch.zeros_like(w[rep]))
        tbn, gains = None, None
        if name in tied_bn:
            # Eval-mode channel i = A_i z_c + B_i (z_c = conv(x, D_c), A_i = a_i s_i, B_i = b_i). The
            # BN can be tied when (A_i, B_i) = g_i (A_rep, B_rep) within each cluster: the tied BN
            # over k channels is the exact affine A_rep z + B_rep (mean 0, var 1 - eps), g_i a
            # fixed gain.
            from .clustering import bn_affine

            a, b = bn_affine(bn)
            big_a, big_b = a * scales, b
            ar, br = big_a[rep][labels], big_b[rep][labels]
            safe_ar = torch.where(ar != 0, ar, torch.ones_like(ar))
            g = torch.where(ar != 0, big_a / safe_ar, torch.zeros_like(ar))
            if bool((ar != 0).all()) and torch.allclose(big_b, g * br, rtol=1e-4, atol=1e-5):
                tbn = nn.BatchNorm2d(k, eps=bn.eps, momentum=bn.momentum)
                tbn.weight.copy_(big_a[rep])
                tbn.bias.copy_(big_b[rep])
                tbn.running_mean.zero_()
                tbn.running_var.fill_(1.0 - bn.eps)
                gains = g
                parent, attr = _parent(tied, bn_path)
                setattr(parent, attr, nn.Identity())
            elif name in must_tie:
                raise ClusteringError(f"{name}: the merged channels of a cluster differ after BatchNorm")
        parent, attr = _parent(tied, name)
        setattr(parent, attr, TiedConv(d, labels, scales, conv.stride[0], tbn, gains))
    return tied.eval()


@torch.no_grad()
def rebase_batchnorms(model: nn.Module, bns: list[nn.BatchNorm2d], images: torch.Tensor, batch_size: int = 500
                      ) -> None:
    """Set the running statistics of ``bns`` to the batch statistics (mean, biased variance) of
    their inputs on uint8 ``images`` and change weight/bias so that each BN's eval-mode affine
    y = a x + b stays exactly the same. Afterwards training-mode normalisation starts from the
    eval-mode function. Model in eval mode throughout; nothing else changes."""
    sums = {id(m): [0.0, 0.0, 0] for m in bns}

    def hook(m, inp, out):
        x = inp[0].detach().double()
        s = sums[id(m)]
        s[0] = s[0] + x.sum((0, 2, 3))
        s[1] = s[1] + (x * x).sum((0, 2, 3))
        s[2] += x.shape[0] * x.shape[2] * x.shape[3]

    handles = [m.register_forward_hook(hook) for m in bns]
    model.eval()
    try:
        for i in range(0, len(images), batch_size):
            model(normalize(images[i : i + batch_size]))
    finally:
        for h in handles:
            h.remove()
    for m in bns:
        s0, s1, n = sums[id(m)]
        mean = s0 / n
        var = (s1 / n - mean * mean).clamp_min(0)
        a = m.weight.double() / torch.sqrt(m.running_var.double() + m.eps)
        b = m.bias.double() - a * m.running_mean.double()
        m.running_mean.copy_(mean.float())
        m.running_var.copy_(var.float())
        m.weight.copy_((a * torch.sqrt(var + m.eps)).float())
        m.bias.copy_((b + a * mean).float())


@torch.no_grad()
def materialize(tied: nn.Module) -> nn.Module:
    """The plain ResNet20 (eval mode) computing the same function as ``tied``: clustered filters
    written out as centroids[labels] * scales, tied BatchNorms expanded per channel
    (weight g_i gamma_c, bias g_i beta_c, mean s_i mu_c, var s_i^2 (var_c + eps) - eps, so that
    BN_i(s_i z) = g_i BN_c(z))."""
    plain = resnet20()
    state = plain.state_dict()
    src = tied.state_dict()
    for k in state:
        if k in src:
            state[k] = src[k].detach().clone().float() if src[k].is_floating_point() else src[k].clone()
    for name, t in tied_layers(tied).items():
        state[f"{name}.weight"] = t.filters().clone()
        if t.bn is not None:
            bn_path = conv_layer(name).bn
            s, g, lab, eps = t.scales.clamp_min(1e-12), t.gains, t.labels, t.bn.eps
            state[f"{bn_path}.weight"] = g * t.bn.weight.detach()[lab]
            state[f"{bn_path}.bias"] = g * t.bn.bias.detach()[lab]
            state[f"{bn_path}.running_mean"] = s * t.bn.running_mean[lab]
            state[f"{bn_path}.running_var"] = s * s * (t.bn.running_var[lab] + eps) - eps
            state[f"{bn_path}.num_batches_tracked"] = t.bn.num_batches_tracked.clone()
    plain.load_state_dict(state)
    return plain.eval()


def tied_clustering(tied: nn.Module, config: ClusteringConfig, template: Clustering) -> Clustering:
    """The Clustering that describes the tied model's current filters (labels and scales unchanged,
    replacement weights and centroids updated), for :func:`explorer.compress.compress`."""
    layers = {}
    for name, t in tied_layers(tied).items():
        old = template.layers[name]
        cent = t.centroids.detach().reshape(t.centroids.shape[0], -1).numpy().astype(np.float32)
        layers[name] = replace(old, weight=t.filters().float().contiguous(), scales=t.scales.clone(),
                               centroids=cent)
    return Clustering(config, layers)


def distinct_filters(weight: torch.Tensor) -> int:
    """Number of bit-distinct filters in a (Cout, Cin, kh, kw) weight."""
    return len(torch.unique(weight.reshape(weight.shape[0], -1), dim=0))


def distinct_directions(weight: torch.Tensor, tol: float = 1e-5) -> int:
    """Number of distinct filter directions (unit vectors equal within ``tol`` per entry, zero
    filters counted as one direction): what stays shared under the cosine metric, where each
    filter keeps its own norm. Equals :func:`distinct_filters` for euclidean clusters of nonzero
    filters."""
    w = weight.detach().double().reshape(weight.shape[0], -1)
    u = w / w.norm(dim=1, keepdim=True).clamp_min(1e-30)
    reps: list[torch.Tensor] = []
    for row in u:
        if not any(float((row - r).abs().max()) <= tol for r in reps):
            reps.append(row)
    return len(reps)


# ---------------------------------------------------------------- training

@dataclass
class FinetuneConfig:
    """Hyper-parameters of one fine-tuning run (stored in the metadata; JSON-serialisable)."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    cutout: int = 8
    seed: int = 0
    precision: str = "bf16"
    rebase_images: int = 2000
    eval_every: int = 1
    name: str = ""
    out: str = str(ckpt.DEFAULT_DIR)
    compile: bool = False
    device: str = "auto"
    distill: float = 0.0
    temperature: float = 4.0

    def validate(self) -> None:
        """Raise ValueError naming the flag when a value is out of range."""
        checks = [
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.batch_size >= 2, "--batch-size must be >= 2"),
            (self.lr > 0, "--lr must be > 0"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.warmup_epochs >= 0, "--warmup-epochs must be >= 0"),
            (0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
            (0 <= self.cutout <= 32, "--cutout must be in 0..32 pixels"),
            (self.precision in ("fp32", "bf16"), "--precision must be fp32 or bf16"),
            (self.rebase_images >= 1, "--rebase-images must be >= 1"),
            (self.eval_every >= 1, "--eval-every must be >= 1"),
            (self.device in ("auto", "cpu", "cuda"), "--device must be auto, cpu or cuda"),
            (0 <= self.distill <= 1, "--distill must be in [0, 1]"),
            (self.temperature > 0, "--temperature must be > 0"),
            (bool(self.name) and "/" not in self.name and not self.name.startswith("."),
             "--name must be a plain file name"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


_NOT_PINNED = {"out", "name", "eval_every", "compile", "device"}


def _device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda given but CUDA is not available; use --device cpu")
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda")
    return torch.device("cpu")


def _on_cpu(tied: nn.Module) -> nn.Module:
    """The tied model itself on CPU, else a CPU copy (materialising and the engine run on CPU)."""
    return tied if next(tied.parameters()).device.type == "cpu" else copy.deepcopy(tied).cpu()


def _per_class(ev) -> dict:
    return {c: float(a) for c, a in zip(CLASSES, ev.per_class)}


def prepare(base: nn.Module, config: ClusteringConfig, data, rebase_images: int = 2000):
    """Cluster ``base`` with ``config`` and build the tied model. Returns (clustered model,
    clustering, compressed net, tied model, merged layers). Raises ClusteringError."""
    from .clustering import prune

    config.validate()
    if not config.active:
        raise ClusteringError("the configuration clusters no layer; nothing to fine-tune")
    model, clustering = prune(base, config, data.train_images)
    small = compress(model, clustering)
    merged = merged_layers(small)
    tied = tie(model, clustering, tied_bn_layers(clustering, small), must_tie=merged)
    if config.fold_bn:  # the clustered layers' BatchNorms are identities (+ bias) after apply()
        bns = []
        for name, t in tied_layers(tied).items():
            bns.append(t.bn if t.bn is not None else tied.get_submodule(conv_layer(name).bn))
        from .clustering import calibration_subset

        rebase_batchnorms(tied, bns, calibration_subset(data.train_images, min(rebase_images, len(data.train_images)),
                                                        config.seed))
    return model, clustering, small, tied, merged


def finetune(checkpoint: str | os.PathLike, config: ClusteringConfig, ft: FinetuneConfig, data,
             resume: bool = False, quiet: bool = False, stop_after: int | None = None,
             latency: bool = False) -> dict:
    """Fine-tune ``checkpoint`` clustered by ``config`` on ``data``; write the files of the module
    doc; return the metadata dict (the in-progress one when ``stop_after`` epochs of this call have
    run). Raises ValueError (settings, resume mismatch), ClusteringError, CheckpointError."""
    from tqdm import tqdm

    ft.validate()
    base = ckpt.load_model(checkpoint)
    base_digest = weights_digest(base)
    files = ckpt.paths(ft.out, ft.name)

    # Every accuracy below comes from the exact fp32 engine on the compressed nets (as Explorer.run),
    # so "before", the recovery curve and "after" are comparable to the app and the search numbers.
    engine = FastEvaluator(data.test_images, data.test_labels, cache_mb=0, mixed=False)
    baseline = engine.evaluate(compress(base))
    model0, clustering0, small0, tied, merged = prepare(base, config, data, ft.rebase_images)
    before = engine.evaluate(small0)
    specs0 = [asdict(s) for s in small0.specs]
    device = _device(ft.device)
    tied.to(device)

    params = [p for p in tied.parameters()]
    optimizer = torch.optim.SGD(params, lr=ft.lr, momentum=ft.momentum, nesterov=True, weight_decay=ft.weight_decay)
    n_train = len(data.train_labels)
    steps = n_train // ft.batch_size
    if steps < 1:
        raise ValueError(f"--batch-size {ft.batch_size} exceeds the {n_train} training images")
    total, warmup = steps * ft.epochs, int(ft.warmup_epochs * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, "cosine"))

    pinned = {k: v for k, v in asdict(ft).items() if k not in _NOT_PINNED}
    start_epoch, log, wall = 0, [], 0.0
    if resume and files["train"].is_file():
        state = ckpt.load_torch(files["train"])
        for key, want in (("clustering", config.to_dict()), ("base_weights_sha1", base_digest),
                          ("dataset", data.identity.to_dict())):
            if state.get(key) != want:
                raise ValueError(f"--resume: {key} was {json.dumps(state.get(key))} in {files['train'].name}, now "
                                 f"{json.dumps(want)}; pass the same setting or a new --name")
        for key, want in pinned.items():
            if state["finetune"].get(key) != want:
                raise ValueError(f"--resume: {key} was {state['finetune'].get(key)!r} in {files['train'].name}, "
                                 f"now {want!r}; pass the same value or a new --name")
        tied.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, log, wall = state["epoch"], list(state["log"]), state["wall_seconds"]
    elif resume and not quiet:
        print(f"--resume: no {files['train'].name} yet, starting from epoch 0", file=sys.stderr)

    meta = {
        "architecture": "resnet20", "status": "training", "epochs": ft.epochs,
        "dataset": data.identity.to_dict(), "classes": list(CLASSES),
        "finetune": {"base_checkpoint": Path(checkpoint).stem, "base_weights_sha1": base_digest,
                     "hyperparameters": asdict(ft), "merged_layers": sorted(merged),
                     "tied_bn_layers": sorted(n for n, t in tied_layers(tied).items() if t.bn is not None),
                     "method": "tied centroids (gradients averaged per cluster); merged layers' BN tied"},
        "clustering": config.to_dict(),
        "labels": {n: [int(x) for x in r.labels] for n, r in clustering0.layers.items()},
        "baseline": {"top1": baseline.top1, "per_class": _per_class(baseline)},
        "before": {"top1": before.top1, "per_class": _per_class(before)},
        "torch": torch.__version__, "device": device.type,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    train_fwd = torch.compile(tied) if ft.compile else tied
    # Knowledge distillation (Hinton et al. 2015) from the unclustered base net: the usual way to
    # recover a pruned net's accuracy, since its soft targets carry the base net's class similarities.
    teacher = copy.deepcopy(base).to(device).to(memory_format=torch.channels_last).eval() if ft.distill > 0 else None
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if ft.precision == "bf16"
                else contextlib.nullcontext())
    tconvs = list(tied_layers(tied).values())
    runs = 0
    for epoch in range(start_epoch, ft.epochs):
        t0 = time.time()
        g = torch.Generator().manual_seed(ft.seed * 100_003 + epoch)
        perm = torch.randperm(n_train, generator=g)[: steps * ft.batch_size]
        images = augment(data.train_images[perm], g, cutout=ft.cutout).view(steps, ft.batch_size, 3, 32, 32)
        labels = data.train_labels[perm].view(steps, ft.batch_size)
        tied.train()
        # Summed on the device: a .item() per step would wait for the accelerator every step.
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        bar = tqdm(range(steps), desc=f"finetune {epoch + 1}/{ft.epochs}", unit="step", disable=quiet, leave=False,
                   mininterval=2.0)
        last_status = time.time()
        for i in bar:
            x = normalize(images[i]).to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = labels[i].to(device, non_blocking=True)
            with autocast:
                logits = train_fwd(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=ft.label_smoothing)
                if teacher is not None:
                    with torch.no_grad():
                        soft = F.softmax(teacher(x).float() / ft.temperature, dim=1)
                    kd = F.kl_div(F.log_softmax(logits.float() / ft.temperature, dim=1), soft, reduction="batchmean")
                    loss = (1 - ft.distill) * loss + ft.distill * ft.temperature ** 2 * kd
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for t in tconvs:
                t.average_gradients()
            optimizer.step()
            scheduler.step()
            for t in tconvs:
                t.project()
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y).sum()
            if time.time() - last_status > 10:
                last_status = time.time()
                ckpt.write_status(files["status"], state="running", epoch=round(epoch + (i + 1) / steps, 3),
                                  epochs=ft.epochs, pid=os.getpid())
        seconds = time.time() - t0
        wall += seconds
        record = {"epoch": epoch + 1, "train_loss": float(loss_sum) / steps,
                  "train_top1": int(correct) / (steps * ft.batch_size),
                  "lr": optimizer.param_groups[0]["lr"], "seconds": round(seconds, 2)}
        cpu_tied = _on_cpu(tied)
        plain = materialize(cpu_tied)
        if (epoch + 1) % ft.eval_every == 0 or epoch + 1 == ft.epochs:
            record["test_top1"] = engine.evaluate(compress(plain, tied_clustering(cpu_tied, config, clustering0))).top1
        log.append(record)
        if not quiet:
            tqdm.write(json.dumps(record))
        ckpt.save_torch({k: v.contiguous() for k, v in plain.state_dict().items()}, files["weights"])
        ckpt.save_torch({"model": cpu_tied.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "log": log, "wall_seconds": wall,
                         "finetune": pinned, "clustering": config.to_dict(), "base_weights_sha1": base_digest,
                         "dataset": data.identity.to_dict()}, files["train"])
        _write_log(files["log"], log)
        meta.update(epochs_done=epoch + 1, wall_seconds=round(wall, 1), recovery=_curve(before, log))
        ckpt.save_json(meta, files["meta"])
        ckpt.write_status(files["status"], state="running", epoch=epoch + 1, epochs=ft.epochs,
                          test_top1=record.get("test_top1"), pid=os.getpid())
        runs += 1
        if stop_after is not None and runs >= stop_after and epoch + 1 < ft.epochs:
            return meta

    return _finish(_on_cpu(tied), config, clustering0, specs0, base, data, files, ft, meta, before, baseline, log, latency,
                   quiet, engine)


def _curve(before, log) -> list[dict]:
    return [{"epoch": 0, "test_top1": before.top1}] + [
        {"epoch": r["epoch"], "test_top1": r["test_top1"]} for r in log if "test_top1" in r]


def _finish(tied, config, clustering0, specs0, base, data, files, ft, meta, before, baseline, log, latency, quiet,
            engine):
    plain = materialize(tied)
    clustering = tied_clustering(tied, config, clustering0)
    small = compress(plain, clustering)
    if [asdict(s) for s in small.specs] != specs0:
        raise RuntimeError("fine-tuning changed the compressed architecture; this is a bug")
    after = engine.evaluate(small)
    check = evaluate(plain, data.test_images, data.test_labels)
    with torch.inference_mode():
        x = normalize(data.test_images[:256])
        max_diff = float((small(x) - plain(x)).abs().max())
    rep = report(small, base, latency_batches=(1, 256) if latency else ())
    comp = Comparison(baseline, after)
    out_dir = Path(ft.out) / "compressed"
    pt, js = save_compressed(small, out_dir, ft.name, extra={
        "clustering": config.to_dict(), "source": ft.name, "base_checkpoint": meta["finetune"]["base_checkpoint"],
        "top1": after.top1, "dataset": data.identity.to_dict()})
    onnx = export_onnx(small, pt.with_suffix(".onnx"))
    meta.update(
        status="complete", epochs_done=ft.epochs, test_top1=after.top1, per_class=_per_class(after),
        test_evaluated_in="fp32", recovery=_curve(before, log),
        after={"top1": after.top1, "per_class": _per_class(after), "eager_top1": check.top1,
               "compressed_vs_plain_max_abs_logit_diff": max_diff},
        per_class_rows=[{"class": c, "baseline": float(b), "before": float(p0), "after": float(p1)}
                        for c, b, p0, p1 in zip(CLASSES, baseline.per_class, before.per_class, after.per_class)],
        top1_drop_pts=-100 * comp.top1_delta,
        compression=rep.to_dict(),
        distinct_filters={n: distinct_filters(plain.get_submodule(n).weight) for n in clustering.layers},
        distinct_directions={n: distinct_directions(plain.get_submodule(n).weight) for n in clustering.layers},
        compressed_export=[str(pt), str(js), str(onnx)],
    )
    ckpt.save_json(meta, files["meta"])
    ckpt.write_status(files["status"], state="complete", epoch=ft.epochs, epochs=ft.epochs, test_top1=after.top1,
                      pid=os.getpid())
    if not quiet:
        print(f"done: top-1 {100 * baseline.top1:.2f}% (base) -> {100 * before.top1:.2f}% (clustered) -> "
              f"{100 * after.top1:.2f}% (fine-tuned, {ft.epochs} epochs); {100 * rep.mac_reduction:.1f}% fewer MACs, "
              f"{rep.compression_ratio:.2f}x fewer parameters; wrote {files['weights']}, {pt}, {onnx}")
    return meta


def list_finetuned(directory: str | os.PathLike = ckpt.DEFAULT_DIR) -> list[dict]:
    """Metadata (with ``name`` added) of every fine-tuning result in ``directory``, by name."""
    out = []
    for info in ckpt.list_checkpoints(directory):
        if "finetune" in info.meta:
            out.append({**info.meta, "name": info.name})
    return sorted(out, key=lambda m: m["name"])


# ---------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    d = FinetuneConfig()
    p = argparse.ArgumentParser(prog="python -m explorer.finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="clustering configuration JSON (from the app, or "
                   "explorer.search --write-config)")
    p.add_argument("--checkpoint", default=default_checkpoint(), help="base ResNet20 checkpoint (.pt)")
    p.add_argument("--data", default=None, help="local CIFAR-10 directory (default $EXPLORER_DATA, else download)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="fine-tuning epochs")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="batch size")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (cosine decay to 0)")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD (Nesterov) momentum")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="L2 weight decay")
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear warm-up length")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="label smoothing")
    p.add_argument("--cutout", type=int, default=d.cutout, help="Cutout square side in pixels (0 = off)")
    p.add_argument("--seed", type=int, default=d.seed, help="shuffling / augmentation seed")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=d.precision, help="training precision")
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
    if args.threads:
        torch.set_num_threads(args.threads)
    fields = {k: v for k, v in vars(args).items() if k in FinetuneConfig.__dataclass_fields__}
    fields["name"] = args.name or f"{Path(args.checkpoint).stem}_ft"
    try:
        ft = FinetuneConfig(**fields)
        ft.validate()
        try:
            config = ClusteringConfig.from_json(Path(args.config).read_text())
        except (OSError, UnicodeDecodeError) as e:
            raise ClusteringError(f"cannot read --config: {e}") from None
        data = load_data(args.data, synthetic=args.synthetic)
        finetune(args.checkpoint, config, ft, data, resume=args.resume, quiet=args.quiet, stop_after=args.stop_after,
                 latency=args.latency)
    except (ValueError, ClusteringError, DataNotFoundError, ckpt.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue from the last complete epoch", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
