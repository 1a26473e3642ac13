"""Shared test models (a plain module, imported by the test files beside it)."""
from __future__ import annotations

import torch

from explorer.clustering import recalibrate_bn
from explorer.model import resnet20


def randomized_model(seed: int = 0) -> torch.nn.Module:
    """Random ResNet20 with non-trivial BatchNorms: running statistics re-estimated on 64 random
    images (so activations stay O(1)) and then perturbed, random affines with about 10% negative
    gammas, a random classifier bias. Eval mode; the same model for the same seed."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m = resnet20()
    recalibrate_bn(m, torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g))
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                c = mod.num_features
                gamma = 0.5 + torch.rand(c, generator=g)
                gamma[torch.rand(c, generator=g) < 0.1] *= -1
                mod.weight.copy_(gamma)
                mod.bias.copy_(0.2 * torch.randn(c, generator=g))
                mod.running_mean.add_(0.1 * torch.randn(c, generator=g))
                mod.running_var.mul_(0.8 + 0.45 * torch.rand(c, generator=g))
        m.fc.bias.copy_(0.1 * torch.randn(10, generator=g))
    return m.eval()


def positive_bn_model(seed: int) -> torch.nn.Module:
    """:func:`randomized_model` with every BatchNorm scale made positive, so that ``fold_bn``
    clusters merge (merging needs A_i > 0)."""
    m = randomized_model(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.abs_()
    return m
