"""A structurally smaller ResNet20 from a clustered one, and its measured savings.

Replacing filters by centroids alone saves nothing. Here every conv computes only its k distinct
filters; the Cout output channels are re-formed by a gather plus the per-channel affine of the
following BatchNorm (which also absorbs the per-filter scale of the cosine metric):

    y[:, i] = A_i * conv_k(x)[:, label_i] + B_i

Inside a BasicBlock the first conv's channels feed only the block's second conv. When clustered
channels are identical after ReLU up to a positive factor (``fold_bn``: shared folded filter and
bias, A_i > 0 and equal B_i / A_i in a cluster), they are merged: the first conv outputs k channels
and the second conv sums its matching input channels, scaled by A_i, so both convs shrink
(relu(A z + B) = A relu(z + B/A) for A > 0). The stem and each block's second conv write the
residual stream, which the option-A shortcut ties to its full width, so a per-layer k there gathers
back to Cout channels. Kernel granularity yields no structural savings and is kept dense.

With stream clustering (``ClusteringConfig.stream``, :func:`explorer.clustering.cluster_stream`)
every writer of stage s's stream shares one assignment of its W channels to k_s clusters, and the
channels of a cluster are identical after the residual add, so the stream itself narrows to k_s
channels: the writers compute k_s filters (no gather), every reader (the blocks' first convs and
the classifier) sums its input weights over the members of each stream cluster, and the option-A
shortcut into stages 2 and 3 becomes an index map between the clustered streams (a zero where the
original pads): ``shortcut(x)[:, j] = x[:, ::2, ::2][:, index_j]`` or 0. The shortcut constraint
of the clustering makes that map well defined (every member of a cluster has the same source).

MACs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (convs and the linear layer;
MACs = FLOPs / 2; :func:`count_macs`, the project's only MAC counter); gathers and per-channel
affines are not counted (< 0.2% of the total). Parameters are :func:`explorer.model.count_parameters`
of the compressed net: conv filters, biases, per-channel affines and the classifier (the gather
indices are int64 buffers, not parameters).
"""
from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoints as ckpt
from .clustering import Clustering, bn_affine
from .model import (BLOCKS_PER_STAGE, CONV_LAYERS, STAGE_WIDTHS, STREAM_STAGES, ResNet20, count_parameters,
                    shortcut_source, stream_stage_of, stream_width)

COMPRESSED_ARCH = "resnet20-clustered"


@dataclass(frozen=True)
class ConvSpec:
    """Shape of one compressed conv: in_channels read, filters computed (k), out_channels emitted
    (Cout when gathered, else = filters), stride, gathered (index + affine after the conv)."""

    name: str
    in_channels: int
    filters: int
    out_channels: int
    stride: int
    gathered: bool


# Set while counting MACs: the gather is a memory operation of the compressed structure, not a
# 1x1 conv, so MACs are counted on the index_select path.
_REFERENCE_GATHER = threading.local()


class CompressedConv(nn.Module):
    """3x3 conv with ``filters`` distinct filters, then (if gathered) index_select to
    ``out_channels`` and a per-channel affine; otherwise the affine is folded into weight and bias.

    forward: (N, in_channels, H, W) -> (N, out_channels, H/stride, W/stride).
    """

    def __init__(self, spec: ConvSpec):
        super().__init__()
        self.gathered = spec.gathered
        self.conv = nn.Conv2d(spec.in_channels, spec.filters, 3, spec.stride, 1, bias=not spec.gathered)
        if spec.gathered:
            self.register_buffer("index", torch.arange(spec.out_channels) % spec.filters)
            self.scale = nn.Parameter(torch.ones(spec.out_channels))
            self.shift = nn.Parameter(torch.zeros(spec.out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if not self.gathered:
            return y
        if torch.onnx.is_in_onnx_export() or getattr(_REFERENCE_GATHER, "on", False):
            return y.index_select(1, self.index) * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)
        return F.conv2d(y, self.gather_weight(y.shape[1]).to(y.dtype), self.shift.to(y.dtype))

    def gather_weight(self, filters: int) -> torch.Tensor:
        """The gather + affine as a 1x1 conv weight (out_channels, filters, 1, 1) with one nonzero,
        scale[i] at [i, index[i]], per output channel (``filters`` >= k: extra inputs get zero
        weights). The same products and sums as index_select + affine up to float rounding (the
        zeros add exactly), and much faster than index_select on a channels_last tensor
        (docs/engine.md)."""
        w = torch.zeros(len(self.index), filters, 1, 1, dtype=self.scale.dtype, device=self.scale.device)
        w[torch.arange(len(self.index), device=w.device), self.index, 0, 0] = self.scale
        return w


class CompressedBlock(nn.Module):
    """BasicBlock over compressed convs, with the option-A shortcut of the original block.

    When the block's input or output stream is clustered to fewer channels than ``in_planes`` /
    ``planes`` (read from its specs: c1.in_channels, c2.out_channels), a downsampling shortcut
    becomes an index map (buffer ``shortcut_index``, (c2.out_channels,) int64: the input stream
    channel copied into each output channel, or c1.in_channels for a zero channel)."""

    def __init__(self, c1: ConvSpec, c2: ConvSpec, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1, self.conv2 = CompressedConv(c1), CompressedConv(c2)
        self.stride, self.pad = stride, planes - in_planes
        self.mapped = bool(stride != 1 or self.pad) and (c1.in_channels, c2.out_channels) != (in_planes, planes)
        if self.mapped:
            self.register_buffer("shortcut_index", torch.full((c2.out_channels,), c1.in_channels, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In-place ReLU and residual add on tensors this block just made: an inference-only module,
        # and each saved pass over the activations is measurable on 2 cores.
        out = self.conv2(F.relu(self.conv1(x), inplace=True))
        return F.relu(out.add_(self.shortcut(x)), inplace=True)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """Option-A shortcut (He et al. 2016): x itself, or subsampled by the stride and zero-padded
        to ``planes`` channels."""
        if self.stride == 1 and not self.pad:
            return x
        if self.mapped:
            return self._mapped_shortcut(x)
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def _mapped_shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export() or getattr(_REFERENCE_GATHER, "on", False):
            xs = x[:, :, :: self.stride, :: self.stride]
            return torch.cat([xs, torch.zeros_like(xs[:, :1])], 1).index_select(1, self.shortcut_index)
        # A strided 1x1 conv with 0/1 weights: the same values (products by 1, sums of zeros are
        # exact) and much faster than index_select on channels_last memory (docs/engine.md).
        k_in = x.shape[1]
        w = torch.zeros(len(self.shortcut_index), k_in + 1, 1, 1, dtype=x.dtype, device=x.device)
        w[torch.arange(len(w), device=w.device), self.shortcut_index, 0, 0] = 1
        return F.conv2d(x, w[:, :k_in], stride=self.stride)


class CompressedResNet20(nn.Module):
    """ResNet20 with compressed convs; built from 19 :class:`ConvSpec` in registry order.

    forward: (N, 3, 32, 32) -> (N, 10) logits, equal to the clustered model's within float rounding.
    """

    def __init__(self, specs: list[ConvSpec], num_classes: int = 10):
        super().__init__()
        if [s.name for s in specs] != [c.name for c in CONV_LAYERS]:
            raise ValueError("specs must list the 19 ResNet20 conv layers in registry order")
        self.specs = list(specs)
        self.conv1 = CompressedConv(specs[0])
        i, in_planes = 1, STAGE_WIDTHS[0]
        for stage, planes in enumerate(STAGE_WIDTHS, start=1):
            blocks = []
            for b in range(BLOCKS_PER_STAGE):
                stride = 2 if (stage > 1 and b == 0) else 1
                blocks.append(CompressedBlock(specs[i], specs[i + 1], in_planes, planes, stride))
                i, in_planes = i + 2, planes
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.fc = nn.Linear(specs[-1].out_channels, num_classes)  # k_3 features with a clustered stage-3 stream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x), inplace=True)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def representatives(labels: torch.Tensor, scales: torch.Tensor, k: int) -> torch.Tensor:
    """Index (k,) of the member with the largest scale in each of the k clusters, given labels
    (Cout,) and per-filter scales (Cout,). The largest scale represents its cluster because a
    zero-norm filter of the cosine metric would give 0/0 = NaN; a cluster of zero filters has the
    zero direction."""
    rep = torch.full((k,), -1, dtype=torch.long)
    for i in range(len(labels)):
        c = int(labels[i])
        if rep[c] < 0 or scales[i] > scales[rep[c]]:
            rep[c] = i
    return rep


def _conv_parts(model: ResNet20, clustering: Clustering | None, name: str, w_in: torch.Tensor | None = None):
    """(distinct filters D (k, Cin, 3, 3), labels (Cout,), A (Cout,), B (Cout,)) for one layer."""
    mods = dict(model.named_modules())
    layer = next(c for c in CONV_LAYERS if c.name == name)
    w = mods[name].weight.detach().float() if w_in is None else w_in
    a, b = bn_affine(mods[layer.bn])
    res = clustering.layers.get(name) if clustering is not None else None
    if res is None or clustering.config.granularity != "filter":
        return w, torch.arange(w.shape[0]), a.float(), b.float()
    labels = torch.as_tensor(res.labels, dtype=torch.long)
    scales = res.scales.float()
    rep = representatives(labels, scales, int(labels.max()) + 1)
    s = scales[rep].view(-1, 1, 1, 1)
    d = torch.where(s > 0, w[rep] / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(w[rep]))
    return d, labels, (a * scales).float(), b.float()


def _mergeable(labels: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    if len(torch.unique(labels)) == len(labels) or not bool((a > 0).all()):
        return False
    ratio = b / a
    for c in torch.unique(labels):
        r = ratio[labels == c]
        if not torch.allclose(r, r[0].expand_as(r), rtol=1e-5, atol=1e-6):
            return False
    return True


@torch.no_grad()
def compress(model: ResNet20, clustering: Clustering | None = None) -> CompressedResNet20:
    """Build the structurally compressed net from a clustered model (the output of
    :func:`explorer.clustering.apply`, BN already re-estimated if asked) and its clustering.

    ``model`` is not mutated. Returns a CompressedResNet20 in eval mode whose logits equal
    ``model``'s within float rounding (tests check 1e-4 on real test images). With clustered
    residual streams (``clustering.stream``) the stream of stage s has k_s channels (module doc).

    Raises ValueError when the channels of a stream cluster are not identical in ``model`` (it was
    changed after clustering without keeping the stream's ties).
    """
    model = model.eval()
    mods = dict(model.named_modules())
    specs: list[ConvSpec] = []
    weights: dict[str, dict[str, torch.Tensor]] = {}
    streams = clustering.stream if clustering is not None else {}
    # comp[s][i]: the compressed stream channel that carries original channel i of stage s
    comp = {s: (torch.as_tensor(streams[s].labels, dtype=torch.long) if s in streams else torch.arange(stream_width(s)))
            for s in STREAM_STAGES}
    shortcut_maps: dict[str, torch.Tensor] = {}

    def read_stream(w, stage):
        """Input weights (Cout, W, ...) of a stream reader summed over each stream cluster's members."""
        if stage not in streams:
            return w
        out = torch.zeros(w.shape[0], streams[stage].k, *w.shape[2:], dtype=w.dtype)
        return out.index_add_(1, comp[stage], w)

    def emit_stream(name, stride, w, stage):
        """A writer of a clustered stream: k_s filters with the BatchNorm folded in, one per cluster."""
        st, labels = streams[stage], comp[stage]
        a, b = (t.float() for t in bn_affine(mods[next(c.bn for c in CONV_LAYERS if c.name == name)]))
        rep = representatives(labels, torch.ones(len(labels)), st.k)
        full_w = w * a.view(-1, 1, 1, 1)
        ok = torch.allclose(full_w, full_w[rep][labels], rtol=1e-5, atol=1e-6) and torch.allclose(
            b, b[rep][labels], rtol=1e-5, atol=1e-6)
        if not ok:
            raise ValueError(f"{name}: the channels of a stage-{stage} stream cluster differ after BatchNorm; the "
                             "model was changed after clustering without keeping the stream's ties")
        specs.append(ConvSpec(name, w.shape[1], st.k, st.k, stride, False))
        weights[name] = {"conv.weight": full_w[rep], "conv.bias": b[rep]}

    def emit(name, stride, d, labels, a, b, merged=False):
        k, cout = d.shape[0], len(labels)
        gathered = not merged and k < cout
        specs.append(ConvSpec(name, d.shape[1], k, k if merged else cout, stride, gathered))
        if gathered:
            weights[name] = {"conv.weight": d, "index": labels, "scale": a, "shift": b}
        elif merged:
            first = torch.stack([torch.nonzero(labels == c)[0, 0] for c in range(k)])
            weights[name] = {"conv.weight": d, "conv.bias": (b / a)[first]}
        else:  # one filter per channel: fold the affine into the conv
            weights[name] = {"conv.weight": d[labels] * a.view(-1, 1, 1, 1), "conv.bias": b}

    if 1 in streams:
        emit_stream("conv1", 1, model.conv1.weight.detach().float(), 1)
    else:
        emit("conv1", 1, *_conv_parts(model, clustering, "conv1"))
    for layer in CONV_LAYERS[1:]:
        if layer.residual:
            continue
        c1, c2 = layer.name, layer.name[:-1] + "2"
        stage, first = layer.stage, layer.name.split(".")[1] == "0"
        in_stage = stage - 1 if first and stage > 1 else stage
        d1, l1, a1, b1 = _conv_parts(model, clustering, c1, w_in=read_stream(mods[c1].weight.detach().float(), in_stage))
        merged = clustering is not None and clustering.config.granularity == "filter" and _mergeable(l1, a1, b1)
        emit(c1, layer.stride, d1, l1, a1, b1, merged=merged)
        w2 = mods[c2].weight.detach().float()
        if merged:
            k1 = d1.shape[0]
            w2m = torch.zeros(w2.shape[0], k1, *w2.shape[2:])
            w2m.index_add_(1, l1, w2 * a1.view(1, -1, 1, 1))
            w2 = w2m
        if stage in streams:
            emit_stream(c2, 1, w2, stage)
        else:
            emit(c2, 1, *_conv_parts(model, clustering, c2, w_in=w2))
        if layer.stride != 1 and (stage in streams or stage - 1 in streams):
            shortcut_maps[c1.rsplit(".", 1)[0]] = _shortcut_index(stage, comp[stage - 1], comp[stage])

    out = CompressedResNet20(specs)
    state = {f"{name}.{k}": v.clone() for name, tensors in weights.items() for k, v in tensors.items()}
    for block, index in shortcut_maps.items():
        state[f"{block}.shortcut_index"] = index
    state["fc.weight"] = read_stream(model.fc.weight.detach().float(), 3).clone()
    state["fc.bias"] = model.fc.bias.detach().clone()
    out.load_state_dict(state, strict=True)
    return out.eval()


def _shortcut_index(stage: int, comp_in: torch.Tensor, comp_out: torch.Tensor) -> torch.Tensor:
    """The option-A shortcut into stage ``stage`` between compressed streams: (k_out,) int64, the
    input stream channel each output channel copies, or k_in where the original zero-pads.
    comp_in (W_in,), comp_out (W_out,): compressed channel of each original channel. Raises
    ValueError when the members of an output cluster have different sources (a clustering that
    did not honour the shortcut)."""
    src = shortcut_source(stage)
    k_in, k_out = int(comp_in.max()) + 1, int(comp_out.max()) + 1
    mapped = torch.where(src >= 0, comp_in[src.clamp_min(0)], torch.full_like(src, k_in))
    index = torch.full((k_out,), -1, dtype=torch.long)
    for i in range(len(src)):
        j = int(comp_out[i])
        if index[j] < 0:
            index[j] = mapped[i]
        elif index[j] != mapped[i]:
            raise ValueError(f"stage {stage}: stream cluster {j} mixes channels with different shortcut sources")
    return index


# ---------------------------------------------------------------- save / load / ONNX

def save_compressed(model: CompressedResNet20, directory: str | os.PathLike, name: str, extra: dict | None = None
                    ) -> tuple[Path, Path]:
    """Write ``<dir>/<name>.pt`` (state dict) and ``<dir>/<name>.json`` (architecture specs + ``extra``)
    atomically. Returns the two paths. Raises CheckpointError on I/O errors."""
    d = Path(directory)
    meta = {"architecture": COMPRESSED_ARCH, "specs": [asdict(s) for s in model.specs], **(extra or {})}
    pt, js = d / f"{name}.pt", d / f"{name}.json"
    ckpt.save_torch({k: v.contiguous() for k, v in model.state_dict().items()}, pt)
    ckpt.save_json(meta, js)
    return pt, js


def load_compressed(path: str | os.PathLike) -> CompressedResNet20:
    """Load a compressed net saved by :func:`save_compressed` (``.pt`` with its ``.json`` beside it),
    with ``torch.load(weights_only=True)``. Raises CheckpointError when files are missing or do not
    match."""
    path = Path(path)
    meta = ckpt.read_json(path.with_suffix(".json"))
    if meta.get("architecture") != COMPRESSED_ARCH:
        raise ckpt.CheckpointError(f"{path.with_suffix('.json').name}: architecture is not {COMPRESSED_ARCH!r}")
    try:
        specs = [ConvSpec(**s) for s in meta["specs"]]
        model = CompressedResNet20(specs)
        model.load_state_dict(ckpt.load_torch(path), strict=True)
    except (TypeError, KeyError, ValueError, RuntimeError) as e:
        raise ckpt.CheckpointError(f"{path.name}: does not match its specs ({str(e).splitlines()[0][:200]})") from None
    return model.eval()


def export_onnx(model: nn.Module, path: str | os.PathLike, opset: int = 17) -> Path:
    """Export to ONNX with a dynamic batch axis: input ``images`` (N, 3, 32, 32) float32 (normalised),
    output ``logits`` (N, 10). Uses the TorchScript-based ``torch.onnx.export`` (dynamo=False)."""
    import warnings

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant-folding notes about the strided shortcut slices
        torch.onnx.export(model.eval(), (torch.zeros(1, 3, 32, 32),), str(path), input_names=["images"],
                          output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=opset, dynamo=False)
    return path


# ---------------------------------------------------------------- measurement

_MACS_BY_SPECS: dict[tuple, int] = {}


def count_macs(model: nn.Module) -> int:
    """Multiply-accumulates per 32x32 image (``FlopCounterMode`` FLOPs / 2, convs + linear).

    For a CompressedResNet20 the count depends only on its specs, so it is memoised by them (the
    app asks once per slider move, the search once per candidate; a new count costs about 10 ms)."""
    from torch.utils.flop_counter import FlopCounterMode

    key = tuple(model.specs) if isinstance(model, CompressedResNet20) else None
    if key is not None and key in _MACS_BY_SPECS:
        return _MACS_BY_SPECS[key]
    _REFERENCE_GATHER.on = True
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model.eval()(torch.zeros(1, 3, 32, 32))
    finally:
        _REFERENCE_GATHER.on = False
    macs = fc.get_total_flops() // 2
    if key is not None:
        _MACS_BY_SPECS[key] = macs
    return macs


def measure_latency(model: nn.Module, batch: int, repeats: int = 10, warmup: int = 2) -> float:
    """Median CPU wall time in seconds of one forward pass at ``batch`` images (fp32, eval,
    channels_last inputs, inference_mode). Uses the current torch thread count."""
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            t = time.perf_counter()
            model.eval()(x)
            if i >= warmup:
                times.append(time.perf_counter() - t)
    return statistics.median(times)


@dataclass(frozen=True)
class CompressionReport:
    """Savings of a compressed net against the original ResNet20 (counts per image, seconds)."""

    params: int
    baseline_params: int
    macs: int
    baseline_macs: int
    layers: list[dict]
    latency: dict | None = None

    @property
    def compression_ratio(self) -> float:
        """baseline parameters / compressed parameters (> 1 means smaller)."""
        return self.baseline_params / self.params

    @property
    def mac_reduction(self) -> float:
        """Fraction of MACs saved, in [0, 1)."""
        return 1 - self.macs / self.baseline_macs

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(compression_ratio=self.compression_ratio, mac_reduction=self.mac_reduction)
        return d


_BASELINE_COUNTS: dict[str, int] = {}


def report(compressed: CompressedResNet20, baseline: nn.Module, latency_batches: tuple[int, ...] = (),
           repeats: int = 10) -> CompressionReport:
    """Unique parameters, MACs per image and (optionally) latency at each of ``latency_batches`` for
    the compressed net and the uncompressed ``baseline``. Latency keys: ``b{N}`` -> {compressed_s,
    baseline_s, speedup}."""
    if not _BASELINE_COUNTS:
        _BASELINE_COUNTS.update(params=count_parameters(baseline), macs=count_macs(baseline))
    layers = [{"layer": s.name, "filters": s.filters, "in_channels": s.in_channels,
               "out_channels": s.out_channels, "gathered": s.gathered} for s in compressed.specs]
    lat = None
    if latency_batches:
        lat = {}
        for b in latency_batches:
            c = measure_latency(compressed, b, repeats)
            o = measure_latency(baseline, b, repeats)
            lat[f"b{b}"] = {"compressed_s": c, "baseline_s": o, "speedup": o / c}
    params = _BASELINE_COUNTS["params"] if is_dense(compressed) else count_parameters(compressed)
    return CompressionReport(params, _BASELINE_COUNTS["params"], count_macs(compressed),
                             _BASELINE_COUNTS["macs"], layers, lat)


def is_dense(compressed: CompressedResNet20) -> bool:
    """Whether every conv of ``compressed`` has the original ResNet20's shape (nothing clustered,
    or only kernel granularity, which keeps layers dense). Such a net saves nothing, so
    :func:`report` gives it the baseline's parameter count: folding each BatchNorm into its conv
    (688 parameters fewer) is a change of form, not a saving from clustering."""
    shapes = {c.name: (c.filter_shape[0], c.filters) for c in CONV_LAYERS}
    return all((s.in_channels, s.filters) == shapes[s.name] and s.out_channels == s.filters
               for s in compressed.specs)
