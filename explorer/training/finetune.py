"""Fine-tune a clustered ResNet20 so that it stays clustered (:func:`finetune`; command line:
``python -m explorer.finetune``).

Clustering every filter of a layer to one of k centroids (:mod:`explorer.clustering`) costs
accuracy; a few epochs of training win most of it back (FPGM, He et al. 2019, retrains pruned
ResNets the same way). The loop is :func:`explorer.training.loop.run_epochs`, as for training; the
fine-tuning :class:`TiedHooks` differ in three ways:

- what trains is the tied model of :mod:`explorer.training.tied` (gradients averaged per cluster
  after each backward, tied BatchNorm gains kept positive after each step);
- with ``distill`` the loss adds knowledge distillation from the unclustered base net (Hinton et al.
  2015): ``(1 - a) CE + a T^2 KL(softmax(z_t / T) || softmax(z / T))``;
- its own files: the saved ``<name>.pt`` is the tied model written out as a plain ResNet20 (filters
  exactly clustered: the app and every CLI load it like any checkpoint), every test accuracy comes
  from the exact fp32 engine on the compressed net (as :meth:`explorer.pipeline.Explorer.run`), and
  the metadata holds the clustering (configuration and labels), accuracy before and after with
  per-class rows, the recovery curve and the compression report. At the end the compressed export
  goes to ``<out>/compressed/<name>.pt`` + ``.json`` + ``.onnx``.

Defaults (smaller than training's): peak LR 0.02, half an epoch of warm-up, cosine decay per step.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import checkpoints as ckpt
from ..clustering import ClusteringConfig
from ..compress import compress, count_macs, export_onnx, report, save_compressed
from ..data import CLASSES, CIFAR10Tensors, normalize
from ..model import conv_layer, count_parameters, resnet20
from ..digest import state_digest
from ..engine import FastEvaluator
from ..evaluate import Comparison, evaluate, per_class_table
from .loop import UNPINNED, Hooks, LoopConfig, Pins, memory_format, pick_device, resolve_precision, run_epochs, sgd
from .centripetal import DEFAULT_STRENGTH, CentripetalGroups, project, projected_clustering
from .narrow import expand_pruned, narrow_from_tied, write_back
from .tied import MIN_TIED_GAMMA, distinct_directions, distinct_filters, materialize, prepare, tied_clustering, tied_layers

METHODS = ("tied", "merged", "centripetal")
METHOD_TEXT = {
    "tied": "tied centroids (gradients averaged per cluster); merged layers' BN tied",
    "merged": "the merged (narrow) net trained directly: merged blocks' first convs have k filters, second convs "
              "read k channels (gain-weighted sums); other clustered layers tied",
    "centripetal": "centripetal SGD (Ding et al. 2019): cluster-mean gradients plus a pull of each member to its "
                   "cluster's mean after every step; the projected (exactly clustered) net is saved",
    "pruned": "the physically pruned net (Torch-Pruning) trained directly",
}


@dataclass
class FinetuneConfig(LoopConfig):
    """Hyper-parameters of one fine-tuning run (stored in the metadata; JSON-serialisable)."""

    epochs: int = 30
    lr: float = 0.02
    warmup_epochs: float = 0.5
    name: str = ""
    rebase_images: int = 2000
    distill: float = 0.0
    temperature: float = 4.0
    method: str = "tied"
    strength: float = DEFAULT_STRENGTH
    pruning: str = ""

    def checks(self) -> list[tuple[bool, str]]:
        from ..pruning import CRITERIA

        return super().checks() + [
            (self.rebase_images >= 1, "--rebase-images must be >= 1"),
            (0 <= self.distill <= 1, "--distill must be in [0, 1]"),
            (self.temperature > 0, "--temperature must be > 0"),
            (self.method in METHODS, f"--method must be one of {', '.join(METHODS)}"),
            (0 < self.strength < 1, "--strength must be in (0, 1)"),
            (self.pruning in ("", *CRITERIA), f"--pruning must be one of {', '.join(CRITERIA)}"),
            (not self.pruning or self.method == "tied",
             "--pruning trains the pruned net itself; leave --method at its default"),
        ]


def _on_cpu(tied: nn.Module) -> nn.Module:
    """The tied model itself on CPU, else a CPU copy (materialising and the engine run on CPU)."""
    return tied if next(tied.parameters()).device.type == "cpu" else copy.deepcopy(tied).cpu()


def distillation_teacher(base: nn.Module, device: torch.device, fmt: torch.memory_format) -> nn.Module:
    """The distillation teacher: ``base`` (a ResNet20) as its dense BatchNorm-folded twin
    (:func:`explorer.compress.compress` with no clustering; logits equal within 1e-4), in eval mode
    on ``device`` in memory format ``fmt``. Input (N, 3, 32, 32) normalised images, output (N, 10)
    logits. Folding spares the teacher's 19 BatchNorm passes: a forward of 128 images on the 2-core
    CPU took 90.6 ms against 111.5 ms for the eager net (no_grad, fp32 channels_last), and the
    teacher is about a third of a distilled step."""
    teacher = compress(copy.deepcopy(base).float().eval()).to(device).to(memory_format=fmt).eval()
    return teacher.requires_grad_(False)


def distilled_loss(hooks, logits, x, y, cfg) -> torch.Tensor:
    """The loop's cross-entropy, plus knowledge distillation from ``hooks.teacher`` when there is
    one: ``(1 - a) CE + a T^2 KL(softmax(z_t / T) || softmax(z / T))`` (Hinton et al. 2015)."""
    loss = Hooks.loss(hooks, logits, x, y, cfg)
    if hooks.teacher is None:
        return loss
    t = hooks.temperature
    with torch.no_grad():
        soft = F.softmax(hooks.teacher(x).float() / t, dim=1)
    kd = F.kl_div(F.log_softmax(logits.float() / t, dim=1), soft, reduction="batchmean")
    return (1 - hooks.distill) * loss + hooks.distill * t ** 2 * kd


class ExportHooks(Hooks):
    """What every fine-tuning method shares: optional distillation from ``teacher``, the test
    top-1 from the exact fp32 ``engine``, ``plain`` (the full-width ResNet20 written out each
    epoch) as the saved weights, the model itself (on CPU) in the resume file, the recovery curve."""

    def __init__(self, model, forward, engine, before_top1: float, teacher=None, distill: float = 0.0,
                 temperature: float = 4.0):
        super().__init__(model, forward)
        self.engine, self.before_top1 = engine, before_top1
        self.teacher, self.distill, self.temperature = teacher, distill, temperature
        self.plain = None

    def loss(self, logits, x, y, cfg):
        return distilled_loss(self, logits, x, y, cfg)

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.contiguous() for k, v in self.plain.state_dict().items()}

    def state_dict(self) -> dict:
        return {"model": _on_cpu(self.model).state_dict()}

    def epoch_meta(self, record: dict, log: list[dict]) -> dict:
        return {"recovery": self.recovery(log)}

    def recovery(self, log: list[dict]) -> list[dict]:
        """Test top-1 per evaluated epoch, epoch 0 being the reduced net before fine-tuning."""
        return [{"epoch": 0, "test_top1": self.before_top1}] + [
            {"epoch": r["epoch"], "test_top1": r["test_top1"]} for r in log if "test_top1" in r]


class TiedHooks(ExportHooks):
    """Fine-tuning of a tied model: averaged cluster gradients, optional distillation, and the
    plain clustered ResNet20 as the saved weights (evaluated compressed, exact fp32)."""

    def __init__(self, tied, forward, config, clustering0, engine, before_top1: float, teacher=None,
                 distill: float = 0.0, temperature: float = 4.0):
        super().__init__(tied, forward, engine, before_top1, teacher, distill, temperature)
        self.config, self.clustering0 = config, clustering0
        self.convs = list(tied_layers(tied).values())
        self.cpu_tied = None

    def after_backward(self) -> None:
        for t in self.convs:
            t.average_gradients()

    def after_step(self) -> None:
        for t in self.convs:
            t.project()

    def end_epoch(self) -> None:
        self.cpu_tied = _on_cpu(self.model)
        self.plain = materialize(self.cpu_tied)

    def evaluate(self) -> float:
        clustering = tied_clustering(self.cpu_tied, self.config, self.clustering0)
        return self.engine.evaluate(compress(self.plain, clustering)).top1

    def final(self):
        """(plain clustered ResNet20, its Clustering) of the current weights, for the export."""
        self.end_epoch()
        return self.plain, tied_clustering(self.cpu_tied, self.config, self.clustering0)


class MergedHooks(TiedHooks):
    """Fine-tuning of the narrow net of :func:`explorer.training.narrow.narrow_from_tied` (the
    merged structure itself); the tied model is kept on CPU and written back each epoch, so the
    saved weights, the evaluation and the export are the tied method's."""

    def __init__(self, narrow, forward, tied_cpu, merged, *args, **kwargs):
        super().__init__(narrow, forward, *args, **kwargs)
        self.tied_cpu, self.merged = tied_cpu, merged
        self.narrow_bns = [narrow.get_submodule(n.rsplit(".", 1)[0] + ".bn1") for n in sorted(merged)]

    def after_step(self) -> None:
        super().after_step()
        with torch.no_grad():
            for bn in self.narrow_bns:
                bn.weight.clamp_(min=MIN_TIED_GAMMA)  # merged channels need positive gains (as TiedConv.project)

    def end_epoch(self) -> None:
        write_back(_on_cpu(self.model), self.tied_cpu, self.merged)
        self.cpu_tied = self.tied_cpu
        self.plain = materialize(self.tied_cpu)


class CentripetalHooks(TiedHooks):
    """Centripetal SGD (:mod:`explorer.training.centripetal`) of a plain ResNet20 that starts from
    the base weights; the projected net is what is evaluated and saved."""

    def __init__(self, model, forward, strength, *args, **kwargs):
        super().__init__(model, forward, *args, **kwargs)
        self.groups, self.strength, self.convs = CentripetalGroups(model, args[1]), strength, []

    def after_backward(self) -> None:
        self.groups.average_gradients()

    def after_step(self) -> None:
        self.groups.pull(self.strength)

    def end_epoch(self) -> None:
        self.plain = project(self.model, self.groups)

    def evaluate(self) -> float:
        return self.engine.evaluate(compress(self.plain, projected_clustering(self.plain, self.clustering0))).top1

    def epoch_meta(self, record: dict, log: list[dict]) -> dict:
        return {"recovery": self.recovery(log), "centripetal_spread": self.groups.spread()}

    def final(self):
        self.end_epoch()
        return self.plain, projected_clustering(self.plain, self.clustering0)


@dataclass
class _Run:
    """What both fine-tuning paths set up the same way around the trained module."""

    device: torch.device
    precision: str
    optimizer: object
    scheduler: object
    steps: int
    pins: Pins
    meta: dict
    teacher: nn.Module | None


def _start(ft: FinetuneConfig, trained: nn.Module, base: nn.Module, base_digest: str, config: ClusteringConfig,
           data: CIFAR10Tensors, checkpoint, baseline, before, finetune_meta: dict, extra_meta: dict) -> _Run:
    """Move ``trained`` to the device in its memory format; the optimizer, resume pins, the
    metadata skeleton (``finetune_meta`` merged into its "finetune" entry, ``extra_meta`` at the top)
    and the distillation teacher (a copy of ``base``, or None without ``ft.distill``)."""
    device = pick_device(ft.device)
    precision = resolve_precision(ft.precision, device)
    fmt = memory_format(precision, device)
    trained.to(device).to(memory_format=fmt)
    optimizer, scheduler, steps = sgd(ft, list(trained.parameters()), len(data.train_labels))
    pins = Pins("finetune", {**asdict(ft), "precision": precision}, frozenset(asdict(ft)) - UNPINNED,
                {"clustering": config.to_dict(), "base_weights_sha1": base_digest, "dataset": data.identity.to_dict()})
    meta = {
        "architecture": "resnet20", "status": "training", "epochs": ft.epochs,
        "dataset": data.identity.to_dict(), "classes": list(CLASSES),
        "finetune": {"base_checkpoint": Path(checkpoint).stem, "base_weights_sha1": base_digest,
                     "hyperparameters": asdict(ft), "precision_used": precision, **finetune_meta},
        "clustering": config.to_dict(),
        **extra_meta,
        "baseline": {"top1": baseline.top1, "per_class": baseline.per_class_dict()},
        "before": {"top1": before.top1, "per_class": before.per_class_dict()},
        "torch": torch.__version__, "device": device.type,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # Knowledge distillation from the unclustered base net: its soft targets carry the base net's
    # class similarities, the usual way to recover a pruned net's accuracy.
    teacher = distillation_teacher(base, device, fmt) if ft.distill > 0 else None
    return _Run(device, precision, optimizer, scheduler, steps, pins, meta, teacher)


def finetune(checkpoint: str | os.PathLike, config: ClusteringConfig, ft: FinetuneConfig, data: CIFAR10Tensors,
             resume: bool = False, quiet: bool = False, stop_after: int | None = None,
             latency: bool = False) -> dict:
    """Fine-tune ``checkpoint`` clustered by ``config`` on ``data``; write the files of the module
    doc; return the metadata dict (the in-progress one when ``stop_after`` epochs of this call have
    run). Raises ValueError (settings, resume mismatch), ClusteringError, CheckpointError."""
    ft.validate()
    base = ckpt.load_model(checkpoint)
    base_digest = state_digest(base)
    files = ckpt.paths(ft.out, ft.name)

    # Every accuracy below comes from the exact fp32 engine on the compressed nets (as Explorer.run),
    # so "before", the recovery curve and "after" are comparable to the app and the search numbers.
    engine = FastEvaluator(data.test_images, data.test_labels, cache_mb=0, mixed=False)
    baseline = engine.evaluate(compress(base))
    if ft.method == "centripetal" and not (config.fold_bn and config.metric == "euclidean"
                                           and config.granularity == "filter"):
        # The projection sets a cluster's filters *and* BatchNorms equal, i.e. clusters of folded
        # filters under the euclidean metric; other configurations would change structure at the end.
        raise ValueError("--method centripetal needs fold_bn, the euclidean metric and filter granularity "
                         "(the pulled-together filters and BatchNorms must merge)")
    if ft.pruning:
        if config.active_stream:
            raise ValueError("--pruning prunes the blocks' first convs only; remove the stream k from the "
                             "configuration")
        return _finetune_pruned(checkpoint, base, base_digest, config, ft, data, engine, baseline, files,
                                resume, quiet, stop_after, latency)
    model0, clustering0, small0, tied, merged = prepare(base, config, data, ft.rebase_images)
    before = engine.evaluate(small0)
    specs0 = [asdict(s) for s in small0.specs]
    # Narrowed: the blocks' merged first convs. A clustered residual stream stays tied at full width
    # while it trains (every writer and reader of it would have to narrow together).
    narrowed = {n for n in merged if not conv_layer(n).residual}
    if ft.method == "merged":
        trained = narrow_from_tied(tied, narrowed)
    elif ft.method == "centripetal":
        trained = copy.deepcopy(base).float().train()
        for p in trained.parameters():
            p.requires_grad_(True)
    else:
        trained = tied
    run = _start(ft, trained, base, base_digest, config, data, checkpoint, baseline, before, {
        "merged_layers": sorted(merged),
        "tied_bn_layers": sorted(n for n, t in tied_layers(tied).items() if t.bn is not None),
        "method": METHOD_TEXT[ft.method], "method_name": ft.method, "macs": count_macs(small0)},
        {"labels": {n: [int(x) for x in r.labels] for n, r in clustering0.layers.items()}})
    meta = run.meta
    forward = torch.compile(trained) if ft.compile else trained
    rest = (config, clustering0, engine, before.top1, run.teacher, ft.distill, ft.temperature)
    if ft.method == "merged":
        hooks = MergedHooks(trained, forward, tied, narrowed, *rest)
    elif ft.method == "centripetal":
        hooks = CentripetalHooks(trained, forward, ft.strength, *rest)
    else:
        hooks = TiedHooks(trained, forward, *rest)
    progress = run_epochs(ft, hooks, data, run.optimizer, run.scheduler, run.steps, files, meta, run.pins, run.device,
                          resume=resume, quiet=quiet, stop_after=stop_after, desc="finetune")
    if not progress.finished:
        return meta
    return _finish(hooks, specs0, base, data, files, ft, meta, before, baseline, progress.log, latency, quiet)


def _complete(meta: dict, files: dict, ft: FinetuneConfig, top1: float) -> None:
    """Write the finished run's metadata, then its status (atomic writes, in that order)."""
    ckpt.save_json(meta, files["meta"])
    ckpt.write_status(files["status"], state="complete", epoch=ft.epochs, epochs=ft.epochs, test_top1=top1,
                      pid=os.getpid())


def _finish(hooks: TiedHooks, specs0, base, data, files, ft, meta, before, baseline, log, latency, quiet):
    plain, clustering = hooks.final()
    small = compress(plain, clustering)
    if [asdict(s) for s in small.specs] != specs0:
        raise RuntimeError("fine-tuning changed the compressed architecture; this is a bug")
    after = hooks.engine.evaluate(small)
    check = evaluate(plain, data.test_images, data.test_labels)
    with torch.inference_mode():
        x = normalize(data.test_images[:256])
        max_diff = float((small(x) - plain(x)).abs().max())
    rep = report(small, base, latency_batches=(1, 256) if latency else ())
    comp = Comparison(baseline, after)
    pt, js = save_compressed(small, Path(ft.out) / "compressed", ft.name, extra={
        "clustering": hooks.config.to_dict(), "source": ft.name,
        "base_checkpoint": meta["finetune"]["base_checkpoint"], "top1": after.top1, "dataset": data.identity.to_dict()})
    onnx = export_onnx(small, pt.with_suffix(".onnx"))
    meta.update(
        status="complete", epochs_done=ft.epochs, test_top1=after.top1, per_class=after.per_class_dict(),
        test_evaluated_in="fp32", recovery=hooks.recovery(log),
        after={"top1": after.top1, "per_class": after.per_class_dict(), "eager_top1": check.top1,
               "compressed_vs_plain_max_abs_logit_diff": max_diff},
        per_class_rows=per_class_table({"baseline": baseline, "before": before, "after": after}).to_dict("records"),
        top1_drop_pts=-100 * comp.top1_delta,
        compression=rep.to_dict(),
        distinct_filters={n: distinct_filters(plain.get_submodule(n).weight) for n in clustering.layers},
        distinct_directions={n: distinct_directions(plain.get_submodule(n).weight) for n in clustering.layers},
        compressed_export=[str(pt), str(js), str(onnx)],
    )
    _complete(meta, files, ft, after.top1)
    if not quiet:
        print(f"done: top-1 {100 * baseline.top1:.2f}% (base) -> {100 * before.top1:.2f}% (clustered) -> "
              f"{100 * after.top1:.2f}% (fine-tuned, {ft.epochs} epochs); {100 * rep.mac_reduction:.1f}% fewer MACs, "
              f"{rep.compression_ratio:.2f}x fewer parameters; wrote {files['weights']}, {pt}, {onnx}")
    return meta


class PrunedHooks(ExportHooks):
    """Fine-tuning of a physically pruned net (Torch-Pruning); saved and evaluated as the masked
    full-width ResNet20 (:func:`explorer.training.narrow.expand_pruned`)."""

    def __init__(self, narrow, forward, template, kept, *args, **kwargs):
        super().__init__(narrow, forward, *args, **kwargs)
        self.template, self.kept = template, kept

    def end_epoch(self) -> None:
        self.plain = expand_pruned(_on_cpu(self.model), self.template, self.kept)

    def evaluate(self) -> float:
        return self.engine.evaluate(compress(self.plain)).top1


def _finetune_pruned(checkpoint, base, base_digest, config, ft, data, engine, baseline, files, resume, quiet,
                     stop_after, latency):
    """The pruning baseline: prune ``config.ks`` (blocks' first convs) by ``ft.pruning``, apply
    ``config.recovery`` (as :mod:`explorer.analysis.baselines`), then train the physically pruned net
    with the same loop and recipe as the clustered nets."""
    from .. import pruning
    if not config.ks:
        raise ValueError("--pruning needs a configuration with per-layer k (the blocks' first convs)")
    masked, kept = pruning.prune(base, dict(config.ks), ft.pruning, data.train_images, data.train_labels)
    masked = pruning.recover(base, masked, dict(config.ks), config.recovery, data.train_images)
    before = engine.evaluate(compress(masked))
    narrow = pruning.pruned_structure(masked, kept).train()
    macs = count_macs(narrow)
    run = _start(ft, narrow, base, base_digest, config, data, checkpoint, baseline, before, {
        "method": METHOD_TEXT["pruned"], "method_name": "pruned", "pruning": ft.pruning, "recovery": config.recovery,
        "macs": macs, "kept": {n: [int(i) for i in k] for n, k in kept.items()}},
        {"pruning": {"criterion": ft.pruning, "ks": dict(config.ks)}})
    meta = run.meta
    hooks = PrunedHooks(narrow, torch.compile(narrow) if ft.compile else narrow, masked, kept, engine, before.top1,
                        run.teacher, ft.distill, ft.temperature)
    progress = run_epochs(ft, hooks, data, run.optimizer, run.scheduler, run.steps, files, meta, run.pins, run.device,
                          resume=resume, quiet=quiet, stop_after=stop_after, desc="finetune")
    if not progress.finished:
        return meta
    hooks.end_epoch()
    plain = hooks.plain
    after = engine.evaluate(compress(plain))
    small = _on_cpu(hooks.model).eval()
    with torch.inference_mode():
        x = normalize(data.test_images[:256])
        max_diff = float((small(x) - plain(x)).abs().max())
    out = Path(ft.out) / "compressed"
    pt = out / f"{ft.name}.pt"
    ckpt.save_torch({k: v.contiguous() for k, v in small.state_dict().items()}, pt)
    js = out / f"{ft.name}.json"
    ckpt.save_json({"architecture": "resnet20-pruned", "criterion": ft.pruning, "kept": meta["finetune"]["kept"],
                    "macs": macs, "top1": after.top1, "source": ft.name, "dataset": data.identity.to_dict()}, js)
    onnx = export_onnx(small, out / f"{ft.name}.onnx")
    lat = {}
    if latency:
        from ..compress import measure_latency

        for b in (1, 256):
            c, o = measure_latency(small, b), measure_latency(base, b)
            lat[f"b{b}"] = {"compressed_s": c, "baseline_s": o, "speedup": o / c}
    base_macs = count_macs(base)
    comp = Comparison(baseline, after)
    meta.update(
        status="complete", epochs_done=ft.epochs, test_top1=after.top1, per_class=after.per_class_dict(),
        test_evaluated_in="fp32", recovery=hooks.recovery(progress.log),
        after={"top1": after.top1, "per_class": after.per_class_dict(), "pruned_vs_masked_max_abs_logit_diff": max_diff},
        per_class_rows=per_class_table({"baseline": baseline, "before": before, "after": after}).to_dict("records"),
        top1_drop_pts=-100 * comp.top1_delta,
        compression=pruned_compression(small, macs, base_macs, count_parameters(base), lat or None),
        compressed_export=[str(pt), str(js), str(onnx)],
    )
    _complete(meta, files, ft, after.top1)
    if not quiet:
        print(f"done: top-1 {100 * baseline.top1:.2f}% (base) -> {100 * before.top1:.2f}% (pruned, {ft.pruning}) -> "
              f"{100 * after.top1:.2f}% (fine-tuned, {ft.epochs} epochs); {100 * (1 - macs / base_macs):.1f}% fewer MACs")
    return meta


def pruned_compression(small: nn.Module, macs: int, base_macs: int, base_params: int, latency: dict | None) -> dict:
    """The metadata ``compression`` of a pruned net, with the fields a clustering run's has
    (:func:`explorer.compress.report`): parameters counted BN-folded (:func:`folded_parameters`),
    the baseline's, and their ratio (a pruned net shares no filters: unique = all)."""
    params = folded_parameters(small)
    return {"macs": macs, "baseline_macs": base_macs, "mac_reduction": 1 - macs / base_macs, "params": params,
            "baseline_params": base_params, "compression_ratio": base_params / params, "latency": latency}


def is_pruned(meta: dict) -> bool:
    """Whether a fine-tuning result's metadata is a pruning baseline's run (no clustering)."""
    return meta.get("finetune", {}).get("method_name") == "pruned"


def folded_parameters(net: nn.Module) -> int:
    """Parameters of ``net`` (a pruned, narrower ResNet20 with its BatchNorms) counted as the
    clustered nets' are (:class:`explorer.compress.CompressedResNet20`, BN folded into the convs):
    each BN channel's scale and shift become one conv bias, so one parameter fewer per channel. A
    pruned and a clustered net of the same shapes then have the same count."""
    bn = sum(m.num_features for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    return count_parameters(net) - bn


def list_finetuned(directory: str | os.PathLike = ckpt.DEFAULT_DIR) -> list[dict]:
    """Metadata (with ``name`` added) of every fine-tuning result in ``directory``, by name."""
    out = []
    for info in ckpt.list_checkpoints(directory):
        if "finetune" in info.meta:
            meta = {**info.meta, "name": info.name}
            c = meta.get("compression")
            if is_pruned(meta) and c and "compression_ratio" not in c:
                # a pruned run written before its metadata named the ratio: unique = all parameters
                base = c.get("baseline_params") or count_parameters(resnet20())
                meta["compression"] = {**c, "baseline_params": base, "compression_ratio": base / c["params"]}
            out.append(meta)
    return sorted(out, key=lambda m: m["name"])


def finetuned_for(directory: str | os.PathLike | None, base: str) -> list[dict]:
    """The fine-tuning results (:func:`list_finetuned`, finished or not) in ``directory`` whose base
    checkpoint is named ``base``; [] without a directory."""
    if directory is None:
        return []
    return [m for m in list_finetuned(directory) if m["finetune"].get("base_checkpoint") == base]
