"""Plain pruning baselines (explorer.pruning, Torch-Pruning importance): the masked net is the
physically pruned one, the criteria pick what they say, and the MACs match clustering's at the
same k. Small random models, CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from explorer import pruning
from explorer.clustering import Clustering, ClusteringConfig, prune as cluster_prune
from explorer.compress import compress, count_macs
from explorer.data import synthetic_cifar10
from explorer.evaluate import predict_logits
from explorer.recovery import lsq_recover, reference

from _models import positive_bn_model

torch.set_num_threads(1)
KS = {"layer1.1.conv1": 5, "layer2.0.conv1": 12, "layer3.2.conv1": 40}


@pytest.fixture(scope="module")
def model():
    return positive_bn_model(6)


@pytest.fixture(scope="module")
def data():
    return synthetic_cifar10(n_train=200, n_test=24, seed=4)


def test_l1_keeps_the_largest_filters(model):
    _, kept = pruning.prune(model, KS, "l1")
    for name, k in KS.items():
        w = dict(model.named_modules())[name].weight.detach()
        by_hand = np.sort(np.argsort(-w.abs().sum((1, 2, 3)).numpy(), kind="stable")[:k])
        assert np.array_equal(kept[name], by_hand)


@pytest.mark.parametrize("criterion", pruning.CRITERIA)
def test_masked_net_is_the_physically_pruned_net(model, data, criterion):
    masked, kept = pruning.prune(model, KS, criterion, data.train_images, data.train_labels)
    small = pruning.pruned_structure(masked, kept)
    assert {n: dict(small.named_modules())[n].out_channels for n in KS} == KS
    x = data.test_images
    torch.testing.assert_close(predict_logits(small, x), predict_logits(masked, x), rtol=1e-4, atol=1e-4)
    # the same MACs as clustering the same layers to the same k with merged clusters
    cm, cl = cluster_prune(model, ClusteringConfig(ks=KS, fold_bn=True))
    assert count_macs(small) == count_macs(compress(cm, cl))


def test_only_the_blocks_first_convs_and_valid_ks(model):
    with pytest.raises(pruning.PruningError, match="residual stream"):
        pruning.prune(model, {"layer1.0.conv2": 8}, "l1")
    with pytest.raises(pruning.PruningError, match="outside"):
        pruning.prune(model, {"layer1.0.conv1": 0}, "l1")
    with pytest.raises(pruning.PruningError, match="criterion"):
        pruning.prune(model, KS, "l2")
    with pytest.raises(pruning.PruningError, match="training images"):
        pruning.prune(model, KS, "taylor")


def test_lsq_keeps_pruned_channels_pruned_and_helps(model, data):
    masked, kept = pruning.prune(model, KS, "fpgm")
    net = pruning.copy.deepcopy(masked)
    ref = reference(model, data.train_images[:96], per_image=16)
    lsq_recover(net, Clustering(ClusteringConfig(), {}), ref, start=3)
    mods = dict(net.named_modules())
    for name, keep in kept.items():
        dead = np.setdiff1d(np.arange(mods[name].out_channels), keep)
        assert torch.count_nonzero(mods[name].weight[dead]) == 0
        bn = mods[name.replace("conv", "bn")]
        assert torch.count_nonzero(bn.weight[dead]) == 0 and torch.count_nonzero(bn.bias[dead]) == 0
    x, orig = data.train_images[:96], predict_logits(model, data.train_images[:96])
    assert ((predict_logits(net, x) - orig) ** 2).mean() < ((predict_logits(masked, x) - orig) ** 2).mean()
