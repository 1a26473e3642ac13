"""ResNet20 for CIFAR-10 (He et al. 2016, "Deep Residual Learning for Image Recognition",
arXiv:1512.03385, section 4.2) and the registry of its conv layers.

The net is the CIFAR variant: a 3x3 stem conv with 16 filters, three stages of three
BasicBlocks with 16/32/64 filters (stride 2 at the start of stages 2 and 3), option-A
shortcuts (strided identity, zero-padded channels: no parameters), global average pool
and a 10-way linear classifier. 269,722 parameters, BatchNorm included.

Conv layers are addressed by their module paths, which are stable and documented:
``conv1`` (stem), then ``layer{1,2,3}.{0,1,2}.conv{1,2}`` - 19 in all, in forward order.
Each conv is followed by the BatchNorm with the same path but ``bn`` for ``conv``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 10
STAGE_WIDTHS = (16, 32, 64)
BLOCKS_PER_STAGE = 3


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and ReLU, plus an option-A shortcut.

    Input (N, in_planes, H, W) -> output (N, planes, H/stride, W/stride).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        # Option A keeps the parameter count at the paper's 0.27M: the shortcut
        # subsamples spatially and zero-pads the new channels.
        self.pad = planes - in_planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.pad // 2
        return F.pad(x, (0, 0, 0, 0, half, self.pad - half))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet20, CIFAR variant (He et al. 2016, section 4.2).

    forward: (N, 3, 32, 32) float -> (N, 10) logits.
    """

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, STAGE_WIDTHS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        in_planes = STAGE_WIDTHS[0]
        for stage, planes in enumerate(STAGE_WIDTHS, start=1):
            blocks = []
            for b in range(BLOCKS_PER_STAGE):
                stride = 2 if (stage > 1 and b == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.fc = nn.Linear(in_planes, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal convs and linear (He et al. 2015), BN weight 1 / bias 0."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out" if isinstance(m, nn.Conv2d) else "fan_in")
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 32, 32) -> pooled features (N, 64)."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def resnet20(num_classes: int = NUM_CLASSES) -> ResNet20:
    """A freshly initialised ResNet20 (269,722 parameters for 10 classes)."""
    return ResNet20(num_classes)


@dataclass(frozen=True)
class ConvLayer:
    """One conv layer of the registry.

    name: module path (``conv1``, ``layer2.0.conv1`` ...); bn: path of the BatchNorm after it;
    filters: Cout; filter_shape: (Cin, kh, kw); stride: spatial stride;
    residual: True when its output feeds the residual stream (stem and each block's conv2),
    so its channels are tied to the shortcut.
    """

    name: str
    bn: str
    filters: int
    filter_shape: tuple[int, int, int]
    stride: int
    residual: bool

    @property
    def stage(self) -> int:
        """0 for the stem, 1..3 for the stages."""
        return 0 if self.name == "conv1" else int(self.name[5])


def _build_registry() -> tuple[ConvLayer, ...]:
    layers = [ConvLayer("conv1", "bn1", STAGE_WIDTHS[0], (3, 3, 3), 1, True)]
    in_planes = STAGE_WIDTHS[0]
    for stage, planes in enumerate(STAGE_WIDTHS, start=1):
        for b in range(BLOCKS_PER_STAGE):
            stride = 2 if (stage > 1 and b == 0) else 1
            p = f"layer{stage}.{b}"
            layers.append(ConvLayer(f"{p}.conv1", f"{p}.bn1", planes, (in_planes, 3, 3), stride, False))
            layers.append(ConvLayer(f"{p}.conv2", f"{p}.bn2", planes, (planes, 3, 3), 1, True))
            in_planes = planes
    return tuple(layers)


CONV_LAYERS: tuple[ConvLayer, ...] = _build_registry()
CONV_LAYER_NAMES: tuple[str, ...] = tuple(layer.name for layer in CONV_LAYERS)
_BY_NAME = {layer.name: layer for layer in CONV_LAYERS}


def conv_layers() -> tuple[ConvLayer, ...]:
    """The 19 conv layers of ResNet20 in forward order, with filter count and filter shape."""
    return CONV_LAYERS


def conv_layer(name: str) -> ConvLayer:
    """Registry entry for ``name``.

    Raises KeyError naming the valid layer names when ``name`` is unknown.
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown conv layer {name!r}; valid names: {', '.join(CONV_LAYER_NAMES)}") from None


# ---------------------------------------------------------------- the residual stream

STREAM_STAGES: tuple[int, ...] = (1, 2, 3)


def stream_width(stage: int) -> int:
    """Channels of stage ``stage``'s residual stream (1..3): 16, 32, 64. Raises KeyError otherwise."""
    if stage not in STREAM_STAGES:
        raise KeyError(f"unknown stage {stage!r}; the residual stream has stages {STREAM_STAGES}")
    return STAGE_WIDTHS[stage - 1]


def stream_writers(stage: int) -> tuple[str, ...]:
    """The convs whose (BatchNorm-ed) output is added into stage ``stage``'s residual stream, in
    forward order: the stem ``conv1`` and ``layer1.{0,1,2}.conv2`` for stage 1, ``layer<s>.{0,1,2}.conv2``
    for stages 2 and 3. In Ding et al. 2019 (C-SGD) these are the "pacesetter" layers whose channels
    must be pruned together; Torch-Pruning calls such a set a dependency group."""
    stream_width(stage)
    head = ("conv1",) if stage == 1 else ()
    return head + tuple(f"layer{stage}.{b}.conv2" for b in range(BLOCKS_PER_STAGE))


def stream_stage_of(name: str) -> int | None:
    """The stage whose residual stream conv ``name`` writes (1..3), or None for a block's first conv."""
    layer = conv_layer(name)
    if not layer.residual:
        return None
    return max(layer.stage, 1)


def shortcut_source(stage: int) -> "torch.Tensor":
    """The option-A shortcut into stage ``stage`` (He et al. 2016, section 4.2) as an index map:
    (stream_width(stage),) int64, entry i the channel of stage ``stage - 1``'s stream that the
    shortcut copies (spatially subsampled by 2) into channel i, or -1 for the zero-padded channels
    (planes // 4 on each side). Stage 1 has no such map (its shortcuts are identities): raises
    KeyError for stage 1."""
    if stage not in STREAM_STAGES[1:]:
        raise KeyError(f"only stages 2 and 3 have a downsampling shortcut, not {stage!r}")
    planes, in_planes = stream_width(stage), stream_width(stage - 1)
    half = (planes - in_planes) // 2
    src = torch.full((planes,), -1, dtype=torch.long)
    src[half:half + in_planes] = torch.arange(in_planes)
    return src


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of any module (ResNet20: 269,722; BatchNorm affines included, running
    statistics and other buffers excluded). The project's only parameter counter: the compressed
    net's "unique parameters" are this count of :class:`explorer.compress.CompressedResNet20`."""
    return sum(p.numel() for p in model.parameters())
