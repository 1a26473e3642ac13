"""Real CPU latency of exported smaller nets against the original ResNet20, in PyTorch and in ONNX
Runtime (``python -m explorer.bench --latency EXPORT.pt ...``).

An export is what fine-tuning writes to ``<out>/compressed/<name>.{pt,json,onnx}``: a clustered
net (:class:`explorer.compress.CompressedResNet20`) or a pruned one (a ResNet20 whose blocks' first
convs are narrower, ``"architecture": "resnet20-pruned"`` in its JSON). Each net runs fp32 in eval
mode at each batch size, the original beside it in the same run; the figure is the median of
``repeats`` timed passes after warm-up, and the ratio original / smaller is the speed-up.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from .. import checkpoints as ckpt
from ..compress import count_macs, export_onnx, load_compressed, measure_latency
from ..model import resnet20
from ..pruning import pruned_structure


def load_export(path: str | Path) -> nn.Module:
    """The net of an export ``.pt`` (clustered or pruned, told by the JSON beside it). Raises
    CheckpointError for an unreadable file."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("architecture") == "resnet20-pruned":
        # The structure is Torch-Pruning's own (explorer.pruning.pruned_structure) for the kept
        # channels the export names; the weights are the export's.
        kept = {n: np.asarray(k) for n, k in meta["kept"].items()}
        net = pruned_structure(resnet20(), kept)
        net.load_state_dict(ckpt.load_torch(path))
        return net.eval()
    return load_compressed(path)


def onnx_latency(path: str | Path, batch: int, repeats: int = 10, warmup: int = 2, threads: int | None = None
                 ) -> float:
    """Median wall seconds of one ONNX Runtime pass (CPU execution provider) at ``batch`` images."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32), dtype=np.float32)
    times = []
    for i in range(warmup + repeats):
        t = time.perf_counter()
        sess.run(None, {"images": x})
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def latency_table(exports: list[str | Path], base_checkpoint: str | Path, batches=(1, 256), repeats: int = 10
                  ) -> list[dict]:
    """One row per export and batch: name, batch, MACs of both nets, PyTorch seconds and speed-up,
    ONNX Runtime seconds and speed-up (the export's ``.onnx`` against the original exported the
    same way)."""
    base = ckpt.load_model(base_checkpoint).eval()
    base_macs = count_macs(base)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base_onnx = export_onnx(base, Path(tmp) / "base.onnx")
        for e in exports:
            e = Path(e)
            net = load_export(e)
            macs = count_macs(net)
            onnx = e.with_suffix(".onnx")
            for b in batches:
                t_net, t_base = measure_latency(net, b, repeats), measure_latency(base, b, repeats)
                row = {"export": e.stem, "batch": b, "macs": macs, "baseline_macs": base_macs,
                       "mac_reduction": 1 - macs / base_macs, "torch_s": t_net, "torch_baseline_s": t_base,
                       "torch_speedup": t_base / t_net}
                if onnx.is_file():
                    o_net, o_base = onnx_latency(onnx, b, repeats), onnx_latency(base_onnx, b, repeats)
                    row.update(onnx_s=o_net, onnx_baseline_s=o_base, onnx_speedup=o_base / o_net)
                rows.append(row)
    return rows


def format_latency(rows: list[dict]) -> str:
    """The rows as a plain-text table (milliseconds, speed-ups as ratios)."""
    lines = [f"{'export':40} {'batch':>5} {'MACs saved':>10} {'torch ms':>9} {'base ms':>8} {'x':>5} "
             f"{'ORT ms':>8} {'base ms':>8} {'x':>5}"]
    for r in rows:
        ort = (f"{1e3 * r['onnx_s']:8.2f} {1e3 * r['onnx_baseline_s']:8.2f} {r['onnx_speedup']:5.2f}"
               if "onnx_s" in r else f"{'-':>8} {'-':>8} {'-':>5}")
        lines.append(f"{r['export']:40} {r['batch']:5d} {100 * r['mac_reduction']:9.1f}% {1e3 * r['torch_s']:9.2f} "
                     f"{1e3 * r['torch_baseline_s']:8.2f} {r['torch_speedup']:5.2f} {ort}")
    return "\n".join(lines)


# The residual-stream net's (resnet20_cifar10_stream50_merged_ft) stride-1 conv shapes, (map size,
# in channels, out channels), each beside the same conv with its odd width padded to the next
# multiple of 8: stage 1's 14-channel stream (stem, block conv1s reading it, conv2s writing it),
# stage 2's 28-channel stream, stage 3's 44-filter conv1s (their 56-channel stream is a multiple of 8).
CONV_WIDTHS = (((32, 3, 14), (32, 3, 16)), ((32, 14, 8), (32, 16, 8)), ((32, 8, 14), (32, 8, 16)),
               ((16, 28, 16), (16, 32, 16)), ((16, 16, 28), (16, 16, 32)),
               ((8, 56, 44), (8, 56, 48)), ((8, 44, 56), (8, 48, 56)))


def _conv_seconds(hw: int, cin: int, cout: int, batch: int, repeats: int) -> float:
    x = torch.randn(batch, cin, hw, hw).contiguous(memory_format=torch.channels_last)
    conv = nn.Conv2d(cin, cout, 3, 1, 1).eval().to(memory_format=torch.channels_last)
    for _ in range(3):
        conv(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        conv(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.inference_mode()
def conv_width_table(pairs=CONV_WIDTHS, batch: int = 256, repeats: int = 10) -> list[dict]:
    """Median CPU time of single 3x3 convs (stride 1, padding 1, fp32, channels_last: the layout the
    engine and the exports run in; torch's current thread count) for each pair of shapes
    ((H, Cin, Cout) as in the net, the same padded to multiples of 8), at ``batch``: whether a width
    that is not a multiple of 8 costs what its MACs say. One row per pair: both shapes, both times
    (seconds), both MAC counts (multiply-accumulates of the batch) and padded / as-is time."""
    rows = []
    for shape, padded in pairs:
        s, p = _conv_seconds(*shape, batch, repeats), _conv_seconds(*padded, batch, repeats)
        rows.append({"shape": list(shape), "padded": list(padded), "seconds": s, "padded_seconds": p,
                     "macs": batch * 9 * shape[0] ** 2 * shape[1] * shape[2],
                     "padded_macs": batch * 9 * padded[0] ** 2 * padded[1] * padded[2], "padded_over_as_is": p / s})
    return rows


def format_conv_widths(rows: list[dict]) -> str:
    """The rows of :func:`conv_width_table` as a plain-text table (milliseconds)."""
    lines = [f"{'map':>5} {'as in the net':>14} {'ms':>7} {'padded':>10} {'ms':>7} {'MACs x':>7} {'time x':>7}"]
    for r in rows:
        (hw, ci, co), (_, pi, po) = r["shape"], r["padded"]
        lines.append(f"{hw:>2}x{hw:<2} {ci:>6} -> {co:<4} {1e3 * r['seconds']:7.2f} {pi:>3} -> {po:<4} "
                     f"{1e3 * r['padded_seconds']:7.2f} {r['padded_macs'] / r['macs']:7.2f} {r['padded_over_as_is']:7.2f}")
    return "\n".join(lines)
