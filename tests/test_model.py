"""ResNet20 architecture and the conv-layer registry."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from explorer.model import (
    CONV_LAYER_NAMES,
    BasicBlock,
    ConvLayer,
    conv_layer,
    conv_layers,
    count_parameters,
    resnet20,
)

EXPECTED_NAMES = ["conv1"] + [f"layer{s}.{b}.conv{c}" for s in (1, 2, 3) for b in (0, 1, 2) for c in (1, 2)]

# name -> (filters, filter_shape, stride, residual), written out by hand from He et al. 2016, 4.2.
EXPECTED = {
    "conv1": (16, (3, 3, 3), 1, True),
    "layer1.0.conv1": (16, (16, 3, 3), 1, False),
    "layer1.0.conv2": (16, (16, 3, 3), 1, True),
    "layer1.1.conv1": (16, (16, 3, 3), 1, False),
    "layer1.1.conv2": (16, (16, 3, 3), 1, True),
    "layer1.2.conv1": (16, (16, 3, 3), 1, False),
    "layer1.2.conv2": (16, (16, 3, 3), 1, True),
    "layer2.0.conv1": (32, (16, 3, 3), 2, False),
    "layer2.0.conv2": (32, (32, 3, 3), 1, True),
    "layer2.1.conv1": (32, (32, 3, 3), 1, False),
    "layer2.1.conv2": (32, (32, 3, 3), 1, True),
    "layer2.2.conv1": (32, (32, 3, 3), 1, False),
    "layer2.2.conv2": (32, (32, 3, 3), 1, True),
    "layer3.0.conv1": (64, (32, 3, 3), 2, False),
    "layer3.0.conv2": (64, (64, 3, 3), 1, True),
    "layer3.1.conv1": (64, (64, 3, 3), 1, False),
    "layer3.1.conv2": (64, (64, 3, 3), 1, True),
    "layer3.2.conv1": (64, (64, 3, 3), 1, False),
    "layer3.2.conv2": (64, (64, 3, 3), 1, True),
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return resnet20().eval()


def test_parameter_count(model):
    assert count_parameters(model) == 269722
    assert sum(p.numel() for p in model.parameters()) == 269722
    # conv weights + BN affine + fc, by hand: the shortcuts contribute nothing.
    convs = sum(f * c * kh * kw for f, (c, kh, kw), _, _ in EXPECTED.values())
    bns = 2 * sum(f for f, _, _, _ in EXPECTED.values())
    fc = 64 * 10 + 10
    assert convs + bns + fc == 269722


@pytest.mark.parametrize("n", [1, 3])
def test_output_shape(model, n):
    with torch.no_grad():
        out = model(torch.randn(n, 3, 32, 32))
    assert out.shape == (n, 10)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    with torch.no_grad():
        assert model.features(torch.randn(n, 3, 32, 32)).shape == (n, 64)


def test_conv_layer_names_in_order():
    assert len(EXPECTED_NAMES) == 19
    assert list(CONV_LAYER_NAMES) == EXPECTED_NAMES
    assert [layer.name for layer in conv_layers()] == EXPECTED_NAMES
    assert list(EXPECTED) == EXPECTED_NAMES


def test_forward_order_matches_registry(model):
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: seen.append(name))
             for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
    finally:
        for h in hooks:
            h.remove()
    assert seen == EXPECTED_NAMES


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_registry_entry(model, name):
    filters, shape, stride, residual = EXPECTED[name]
    layer = conv_layer(name)
    assert isinstance(layer, ConvLayer)
    assert (layer.filters, layer.filter_shape, layer.stride, layer.residual) == (filters, shape, stride, residual)
    assert layer.bn == name.replace("conv", "bn")
    assert layer.stage == (0 if name == "conv1" else int(name[5]))
    # ... and the registry agrees with the real modules.
    modules = dict(model.named_modules())
    conv = modules[name]
    assert isinstance(conv, nn.Conv2d)
    assert tuple(conv.weight.shape) == (filters, *shape)
    assert conv.stride == (stride, stride)
    assert conv.bias is None
    bn = modules[layer.bn]
    assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == filters


def test_layer2_0_conv1_explicit():
    layer = conv_layer("layer2.0.conv1")
    assert layer.filters == 32
    assert layer.filter_shape == (16, 3, 3)
    assert layer.stride == 2


def test_conv_layer_unknown_name_raises_keyerror_listing_valid_names():
    with pytest.raises(KeyError) as info:
        conv_layer("bogus")
    msg = str(info.value)
    assert "bogus" in msg
    for name in EXPECTED_NAMES:
        assert name in msg


def test_option_a_shortcut_has_no_parameters():
    block = BasicBlock(16, 32, stride=2)
    names = {n.split(".")[0] for n, _ in block.named_parameters()}
    assert names == {"conv1", "bn1", "conv2", "bn2"}
    assert count_parameters(block) == 32 * 16 * 9 + 32 * 32 * 9 + 4 * 32
    assert list(block.children()) == [block.conv1, block.bn1, block.conv2, block.bn2]


def test_option_a_shortcut_subsamples_and_zero_pads_channels():
    block = BasicBlock(16, 32, stride=2)
    x = torch.arange(2 * 16 * 4 * 4, dtype=torch.float32).view(2, 16, 4, 4)
    s = block.shortcut(x)
    assert s.shape == (2, 32, 2, 2)
    # 16 new channels, split 8 before and 8 after the old ones.
    assert torch.equal(s[:, :8], torch.zeros(2, 8, 2, 2))
    assert torch.equal(s[:, 24:], torch.zeros(2, 8, 2, 2))
    assert torch.equal(s[:, 8:24], x[:, :, ::2, ::2])
    assert s[0, 8, 0, 1].item() == 2.0 and s[0, 8, 1, 0].item() == 8.0
    # Identity when shape is kept.
    same = BasicBlock(16, 16, stride=1)
    assert same.shortcut(x) is x


def test_block_output_is_relu_of_shortcut_when_convs_are_zero():
    block = BasicBlock(16, 32, stride=2).eval()
    with torch.no_grad():
        block.conv1.weight.zero_()
        block.conv2.weight.zero_()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        out = block(x)
    expected = torch.zeros(2, 32, 4, 4)
    expected[:, 8:24] = x[:, :, ::2, ::2].clamp(min=0)
    assert torch.equal(out, expected)


def test_init_is_seeded_and_bn_starts_at_identity():
    torch.manual_seed(1)
    a = resnet20()
    torch.manual_seed(1)
    b = resnet20()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert torch.equal(a.bn1.weight, torch.ones(16)) and torch.equal(a.bn1.bias, torch.zeros(16))
    assert torch.equal(a.fc.bias, torch.zeros(10))
